// A host emulator for kernels/cuda/experts.cu, so that CI (no GPU) runs the CUDA kernels
// themselves, not only compiles them. fake_driver.cpp puts it behind the CUDA driver API, and
// kernels/tests/cuda_on_emulator.rs runs the CUDA backend (cudarc, the NVRTC-compiled module)
// on it: the backend conformance suite and permute/combine.
//
// A block's threads are blockDim.x OS threads (blocks one after another, so `__shared__`
// arrays are plain statics); `__syncthreads()` is a barrier of the block's threads. The two PTX
// pieces are emulated from the PTX ISA's definitions, not from the kernels' use of them:
//   - cvt.f32.f16: IEEE half to float;
//   - mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: the warp's 32 lanes hand in their
//     fragments (PTX ISA 9.7.14.5.8: groupID = lane >> 2, threadID_in_group = lane % 4;
//     A a_i at row groupID (+8 for i in 2,3,6,7), column 2 threadID_in_group + (i & 1)
//     (+8 for i >= 4); B b_i at row 2 threadID_in_group + (i & 1) (+8 for i >= 2), column
//     groupID; C/D c_i at row groupID (+8 for i >= 2), column 2 threadID_in_group + (i & 1)),
//     the barrier's completion step multiplies the 16x16 by 16x8 tile in f32, and each lane
//     takes its four results back.

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

struct EmuDim3 {
    unsigned x, y, z;
};
static thread_local EmuDim3 threadIdx;
static thread_local EmuDim3 blockIdx;
static EmuDim3 blockDim;
static EmuDim3 gridDim;

struct uint4 {
    unsigned x, y, z, w;
};
struct uint2 {
    unsigned x, y;
};
static inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }

static inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
static inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}

static std::barrier<>* block_barrier = nullptr;
static inline void __syncthreads() { block_barrier->arrive_and_wait(); }

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __expf(x) std::exp(x)

#include "../experts.cu"

float f16_to_f32(u16 h) {
    u32 sign = (u32)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) {
        float v = std::ldexp((float)m, -24);
        return sign ? -v : v;
    }
    if (e == 31) return __uint_as_float(sign | 0x7f800000u | (m << 13));
    return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}

// One warp's exchange for mma_bf16: fragments in, results out.
struct Warp {
    u32 a[32][4];
    u32 b[32][2];
    float c[32][4];
    void compute() {
        float A[16][16], B[16][8], C[16][8];
        auto lo = [](u32 r) { return bf16_to_f32((u16)(r & 0xffffu)); };
        auto hi = [](u32 r) { return bf16_to_f32((u16)(r >> 16)); };
        for (int lane = 0; lane < 32; lane++) {
            int g = lane >> 2, t = lane % 4;
            for (int i = 0; i < 8; i++) {
                int row = g + ((i == 2 || i == 3 || i == 6 || i == 7) ? 8 : 0);
                int col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
                u32 reg = a[lane][i / 2];
                A[row][col] = (i & 1) ? hi(reg) : lo(reg);
            }
            for (int i = 0; i < 4; i++) {
                int row = 2 * t + (i & 1) + (i >= 2 ? 8 : 0);
                u32 reg = b[lane][i / 2];
                B[row][g] = (i & 1) ? hi(reg) : lo(reg);
            }
            for (int i = 0; i < 4; i++) C[g + (i >= 2 ? 8 : 0)][2 * t + (i & 1)] = c[lane][i];
        }
        for (int lane = 0; lane < 32; lane++) {
            int g = lane >> 2, t = lane % 4;
            for (int i = 0; i < 4; i++) {
                int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
                float acc = C[row][col];
                for (int k = 0; k < 16; k++) acc = std::fma(A[row][k], B[k][col], acc);
                c[lane][i] = acc;
            }
        }
    }
};

struct WarpSync {
    Warp w;
    std::barrier<std::function<void()>> bar{32, [this] { w.compute(); }};
};
static std::vector<WarpSync*> warps;

void mma_bf16(float* c, const u32* a, u32 b0, u32 b1) {
    unsigned lane = threadIdx.x % 32;
    WarpSync* ws = warps[threadIdx.x / 32];
    std::memcpy(ws->w.a[lane], a, 16);
    ws->w.b[lane][0] = b0;
    ws->w.b[lane][1] = b1;
    std::memcpy(ws->w.c[lane], c, 16);
    ws->bar.arrive_and_wait();
    std::memcpy(c, ws->w.c[lane], 16);
}

template <typename... A, std::size_t... I>
static void call(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*static_cast<A*>(args[I])...);
}

// Run kernel `k` over grid (gx, gy) with bx threads a block; args as cuLaunchKernel takes them.
// The bx threads run every block in turn, meeting at a barrier between blocks (a block's
// `__shared__` statics are the next block's).
template <typename... A>
static void run(void (*k)(A...), unsigned gx, unsigned gy, unsigned bx, void** args) {
    gridDim = EmuDim3{gx, gy, 1};
    blockDim = EmuDim3{bx, 1, 1};
    std::barrier<> bar((std::ptrdiff_t)bx);
    std::barrier<> between((std::ptrdiff_t)bx);
    block_barrier = &bar;
    warps.clear();
    for (unsigned w = 0; w < (bx + 31) / 32; w++) warps.push_back(new WarpSync());
    std::vector<std::thread> threads;
    threads.reserve(bx);
    for (unsigned t = 0; t < bx; t++)
        threads.emplace_back([=, &between] {
            threadIdx = EmuDim3{t, 0, 0};
            for (unsigned y = 0; y < gy; y++)
                for (unsigned x = 0; x < gx; x++) {
                    blockIdx = EmuDim3{x, y, 0};
                    call(k, args, std::index_sequence_for<A...>{});
                    between.arrive_and_wait();
                }
        });
    for (auto& th : threads) th.join();
    for (auto* w : warps) delete w;
    warps.clear();
    block_barrier = nullptr;
}

// Launch kernel `name` of experts.cu; 0 on success, -1 for an unknown name. Launches run one at
// a time (the emulator's launch state is global), each to completion.
extern "C" int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned bx, void** args) {
    static std::mutex one_at_a_time;
    std::lock_guard<std::mutex> lock(one_at_a_time);
    std::string n(name);
    if (n == "gateup_mma") run(gateup_mma, gx, gy, bx, args);
    else if (n == "down_mma") run(down_mma, gx, gy, bx, args);
    else if (n == "gateup_simt") run(gateup_simt, gx, gy, bx, args);
    else if (n == "down_simt") run(down_simt, gx, gy, bx, args);
    else if (n == "gather_rows") run(gather_rows, gx, gy, bx, args);
    else if (n == "combine_rows") run(combine_rows, gx, gy, bx, args);
    else return -1;
    return 0;
}
