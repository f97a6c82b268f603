// A stand-in for the CUDA driver (libcuda.so) over the kernel emulator in emu.cpp, so that the
// CUDA backend itself (kernels/src/cuda.rs through cudarc: context, NVRTC-compiled module,
// streams, events, pinned staging, device buffers, launches) runs in CI without a GPU
// (kernels/tests/cuda_on_emulator.rs). Device memory is host memory; every call completes
// before it returns, so streams and events only order what is already done. A launch runs the
// named kernel of experts.cu on the emulator with the driver's own parameter array. Each
// allocation is followed by a guard band checked at every synchronisation and free: a kernel
// or copy that writes past an allocation fails with CUDA_ERROR_ILLEGAL_ADDRESS.
//
// Built by the test with: g++ -std=c++20 -O1 -shared -fPIC -fno-strict-aliasing
//   -DEXPERTMESH_EMU -Wl,-soname,libcuda.so kernels/cuda/emu/fake_driver.cpp -o libcuda.so
// and loaded (RTLD_GLOBAL) before cudarc opens `libcuda.so`, which then resolves to it.

#include "emu.cpp"

#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void* CUcontext;
typedef void* CUstream;
typedef void* CUevent;
typedef void* CUmodule;
typedef void* CUfunction;

enum : int {
    SUCCESS = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    INVALID_DEVICE = 101,
    NOT_FOUND = 500,
    ILLEGAL_ADDRESS = 700,
};

static const size_t GUARD = 256;
static const unsigned char GUARD_BYTE = 0xa5;
static std::mutex mem_lock;
static std::map<unsigned long long, size_t> device_allocs;  // address -> requested bytes
static int ctx_token, stream_token, event_token, module_token;

static bool guard_ok(unsigned long long a, size_t n) {
    const unsigned char* g = (const unsigned char*)a + n;
    for (size_t i = 0; i < GUARD; i++)
        if (g[i] != GUARD_BYTE) return false;
    return true;
}

// Every live allocation's guard band intact.
static CUresult check_guards() {
    std::lock_guard<std::mutex> l(mem_lock);
    for (auto& [a, n] : device_allocs)
        if (!guard_ok(a, n)) {
            std::fprintf(stderr, "fake CUDA driver: a write past the %zu-byte allocation at %#llx\n", n, a);
            return ILLEGAL_ADDRESS;
        }
    return SUCCESS;
}

static void* alloc_guarded(size_t n) {
    size_t total = (n + GUARD + 255) / 256 * 256;
    void* p = std::aligned_alloc(256, total);
    if (p) std::memset((unsigned char*)p + n, GUARD_BYTE, GUARD);
    return p;
}

extern "C" {

CUresult cuInit(unsigned) { return SUCCESS; }
CUresult cuDriverGetVersion(int* v) { *v = 13000; return SUCCESS; }
CUresult cuDeviceGetCount(int* n) { *n = 1; return SUCCESS; }
CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal != 0) return INVALID_DEVICE;
    *d = 0;
    return SUCCESS;
}
CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    std::snprintf(name, (size_t)len, "ExpertMesh CUDA emulator");
    return SUCCESS;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) { *bytes = (size_t)8 << 30; return SUCCESS; }
CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice) {
    switch (attr) {
        case 75: *v = 9; break;   // compute capability major
        case 76: *v = 0; break;   // minor
        case 16: *v = 132; break; // multiprocessors
        default: *v = 0;          // memory pools, unified addressing, ...: not offered
    }
    return SUCCESS;
}
CUresult cuDeviceGetUuid(void* uuid, CUdevice) { std::memset(uuid, 0x42, 16); return SUCCESS; }
CUresult cuDeviceGetUuid_v2(void* uuid, CUdevice) { std::memset(uuid, 0x42, 16); return SUCCESS; }
CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice) { *c = &ctx_token; return SUCCESS; }
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return SUCCESS; }
CUresult cuDevicePrimaryCtxRelease(CUdevice) { return SUCCESS; }
CUresult cuCtxSetCurrent(CUcontext) { return SUCCESS; }
CUresult cuCtxGetCurrent(CUcontext* c) { *c = &ctx_token; return SUCCESS; }
CUresult cuCtxGetDevice(CUdevice* d) { *d = 0; return SUCCESS; }
CUresult cuCtxSynchronize() { return check_guards(); }
CUresult cuMemGetInfo_v2(size_t* free_b, size_t* total) {
    *free_b = (size_t)7 << 30;
    *total = (size_t)8 << 30;
    return SUCCESS;
}

CUresult cuModuleLoadData(CUmodule* m, const void*) { *m = &module_token; return SUCCESS; }
CUresult cuModuleUnload(CUmodule) { return SUCCESS; }
CUresult cuModuleGetFunction(CUfunction* f, CUmodule, const char* name) {
    static const char* known[] = {"gateup_mma", "down_mma", "gateup_simt", "down_simt", "gather_rows", "combine_rows"};
    for (const char* k : known)
        if (std::strcmp(k, name) == 0) {
            *f = (void*)k;
            return SUCCESS;
        }
    return NOT_FOUND;
}
CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned, CUstream, void** params, void** extra) {
    if (gz != 1 || by != 1 || bz != 1 || extra != nullptr || params == nullptr) return INVALID_VALUE;
    if (gx == 0 || gy == 0 || bx == 0 || bx > 1024) return INVALID_VALUE;
    if (emu_launch((const char*)f, gx, gy, bx, params) != 0) return NOT_FOUND;
    return check_guards();
}

CUresult cuStreamCreate(CUstream* s, unsigned) { *s = &stream_token; return SUCCESS; }
CUresult cuStreamCreateWithPriority(CUstream* s, unsigned, int) { *s = &stream_token; return SUCCESS; }
CUresult cuCtxGetStreamPriorityRange(int* lo, int* hi) { *lo = 0; *hi = 0; return SUCCESS; }
CUresult cuStreamSynchronize(CUstream) { return check_guards(); }
CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned) { return SUCCESS; }
CUresult cuStreamDestroy_v2(CUstream) { return SUCCESS; }
CUresult cuEventCreate(CUevent* e, unsigned) { *e = &event_token; return SUCCESS; }
CUresult cuEventRecord(CUevent, CUstream) { return SUCCESS; }
CUresult cuEventSynchronize(CUevent) { return check_guards(); }
CUresult cuEventQuery(CUevent) { return SUCCESS; }
CUresult cuEventDestroy_v2(CUevent) { return SUCCESS; }
CUresult cuEventElapsedTime(float* ms, CUevent, CUevent) { *ms = 0.0f; return SUCCESS; }
CUresult cuEventElapsedTime_v2(float* ms, CUevent, CUevent) { *ms = 0.0f; return SUCCESS; }

CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t n) {
    void* a = alloc_guarded(n);
    if (!a) return OUT_OF_MEMORY;
    std::lock_guard<std::mutex> l(mem_lock);
    device_allocs[(unsigned long long)a] = n;
    *p = (CUdeviceptr)a;
    return SUCCESS;
}
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t n, CUstream) { return cuMemAlloc_v2(p, n); }
CUresult cuMemFree_v2(CUdeviceptr p) {
    std::lock_guard<std::mutex> l(mem_lock);
    auto it = device_allocs.find(p);
    if (it == device_allocs.end()) return INVALID_VALUE;
    bool ok = guard_ok(p, it->second);
    device_allocs.erase(it);
    std::free((void*)p);
    if (!ok) std::fprintf(stderr, "fake CUDA driver: a write past an allocation freed at %#llx\n", p);
    return ok ? SUCCESS : ILLEGAL_ADDRESS;
}
CUresult cuMemFreeAsync(CUdeviceptr p, CUstream) { return cuMemFree_v2(p); }

// A device range [p, p + n) inside one live allocation.
static bool in_alloc(CUdeviceptr p, size_t n) {
    std::lock_guard<std::mutex> l(mem_lock);
    auto it = device_allocs.upper_bound(p);
    if (it == device_allocs.begin()) return false;
    --it;
    return p >= it->first && p + n <= it->first + it->second;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* h, size_t n, CUstream) {
    if (n && !in_alloc(d, n)) return ILLEGAL_ADDRESS;
    std::memcpy((void*)d, h, n);
    return SUCCESS;
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* h, size_t n) { return cuMemcpyHtoDAsync_v2(d, h, n, nullptr); }
CUresult cuMemcpyDtoHAsync_v2(void* h, CUdeviceptr d, size_t n, CUstream) {
    if (n && !in_alloc(d, n)) return ILLEGAL_ADDRESS;
    std::memcpy(h, (const void*)d, n);
    return SUCCESS;
}
CUresult cuMemcpyDtoH_v2(void* h, CUdeviceptr d, size_t n) { return cuMemcpyDtoHAsync_v2(h, d, n, nullptr); }
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, CUstream) {
    if (n && (!in_alloc(d, n) || !in_alloc(s, n))) return ILLEGAL_ADDRESS;
    std::memmove((void*)d, (const void*)s, n);
    return SUCCESS;
}
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, CUstream) {
    if (n && !in_alloc(d, n)) return ILLEGAL_ADDRESS;
    std::memset((void*)d, v, n);
    return SUCCESS;
}
CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) { return cuMemsetD8Async(d, v, n, nullptr); }
CUresult cuMemHostAlloc(void** p, size_t n, unsigned) {
    *p = std::aligned_alloc(256, (n + 255) / 256 * 256);
    return *p ? SUCCESS : OUT_OF_MEMORY;
}
CUresult cuMemAllocHost_v2(void** p, size_t n) { return cuMemHostAlloc(p, n, 0); }
CUresult cuMemFreeHost(void* p) { std::free(p); return SUCCESS; }

CUresult cuGetErrorString(CUresult e, const char** s) {
    *s = e == ILLEGAL_ADDRESS ? "an illegal memory access (the fake driver's guard bands)" : "fake CUDA driver error";
    return SUCCESS;
}
CUresult cuGetErrorName(CUresult e, const char** s) {
    *s = e == ILLEGAL_ADDRESS ? "CUDA_ERROR_ILLEGAL_ADDRESS" : "CUDA_ERROR_FAKE_DRIVER";
    return SUCCESS;
}

}  // extern "C"
