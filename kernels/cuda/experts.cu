// ExpertMesh CUDA kernels: the grouped expert FFN of one layer, and row permute/combine.
//
// Compiled at run time with NVRTC for the device's architecture (sm_80 and newer); CI compiles
// this file for sm_80 and sm_90 with NVRTC 13.0 from PyPI. It includes no header, so NVRTC
// needs no CUDA include directory: bf16, f16 and FP8 e4m3 are handled as bits.
//
// The FFN of a batch grouped by expert is two launches:
//   gateup: h[r, :] = silu(min(x[r] W1^T, limit)) * clamp(x[r] W3^T, -limit, limit)
//   down:   out[r, :] = h[r] W2^T
// over a tile table built on the host: tile i covers rows tiles[4i+1] .. tiles[4i+2] (at most
// BM of them) of the batch, all of one expert, whose weights are described by
// experts[tiles[4i]]. grid.x walks the output columns in BN steps, grid.y the tiles.
//
// Two families:
//   *_mma:  bf16 activations on bf16 or FP8 weights. Tensor cores (mma.sync m16n8k16, bf16 in,
//           f32 accumulate); FP8 weights are widened to bf16 (exactly) while staged in shared
//           memory, and their 128x128 block scale multiplies each stage's f32 sums (block
//           shapes that do not tile the stages are scaled while staged instead). h is bf16.
//   *_simt: every other combination (f32 activations, f32 or f16 weights): f32 math on CUDA
//           cores; h is f32.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define DT_F32 0
#define DT_BF16 1
#define DT_F16 2
#define DT_FP8 3

// One weight matrix [rows = outputs, cols = inputs], row-major, in its stored dtype.
struct Mat {
    u64 data;    // device pointer
    u64 scales;  // FP8: [ceil(rows / sbr), ceil(cols / sbc)] f32 block scales; else 0
    int dtype;
    int sbr;
    int sbc;
    int pad;
};

// One expert: gate (w1) and up (w3) [ffn, hidden], down (w2) [hidden, ffn].
struct Expert {
    Mat w1;
    Mat w3;
    Mat w2;
};

__device__ __forceinline__ float bf16_to_f32(u16 x) { return __uint_as_float(((u32)x) << 16); }

__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);                       // round to nearest even
    return (u16)(u >> 16);
}

#ifdef EXPERTMESH_EMU
// kernels/cuda/emu/emu.cpp (the host emulator the CPU tests run these kernels on) defines the
// two functions that are PTX here.
float f16_to_f32(u16 x);
#else
__device__ __forceinline__ float f16_to_f32(u16 x) {
    float f;
    asm("{ .reg .f16 h; mov.b16 h, %1; cvt.f32.f16 %0, h; }" : "=f"(f) : "h"(x));
    return f;
}
#endif

// e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities; 0x7f/0xff are NaN
// (refused at load). Every value is exact in bf16 and f32.
__device__ __forceinline__ float fp8_to_f32(u32 b) {
    u32 sign = (b & 0x80u) << 24;
    u32 e = (b >> 3) & 0xfu;
    u32 m = b & 7u;
    if (e == 0) {
        float v = (float)m * 0.001953125f;  // m * 2^-9
        return sign ? -v : v;
    }
    return __uint_as_float(sign | ((e + 120u) << 23) | (m << 20));
}

__device__ __forceinline__ float scale_at(const Mat& w, int n, int k, int cols) {
    const float* s = (const float*)w.scales;
    int per_row = (cols + w.sbc - 1) / w.sbc;
    return s[(n / w.sbr) * per_row + k / w.sbc];
}

// Element (n, k) of a weight matrix with `cols` columns, as f32 (block scale applied).
__device__ __forceinline__ float weight_at(const Mat& w, int n, int k, int cols) {
    size_t i = (size_t)n * cols + k;
    switch (w.dtype) {
        case DT_F32: return ((const float*)w.data)[i];
        case DT_BF16: return bf16_to_f32(((const u16*)w.data)[i]);
        case DT_F16: return f16_to_f32(((const u16*)w.data)[i]);
        default: return fp8_to_f32(((const unsigned char*)w.data)[i]) * scale_at(w, n, k, cols);
    }
}

__device__ __forceinline__ float act_at(const void* x, int dtype, size_t i) {
    return dtype == DT_F32 ? ((const float*)x)[i] : bf16_to_f32(((const u16*)x)[i]);
}

__device__ __forceinline__ float silu_mul(float g, float u, float limit) {
    if (limit > 0.0f) {
        g = fminf(g, limit);
        u = fminf(fmaxf(u, -limit), limit);
    }
    return g / (1.0f + __expf(-g)) * u;
}

// ---------------------------------------------------------------------------------------------
// Tensor-core path.

#define BM 64
#define BN 64
#define BK 32
#define SK (BK + 8)  // padded row of a shared tile, in bf16: conflict-free fragment loads

#ifdef EXPERTMESH_EMU
void mma_bf16(float* c, const u32* a, u32 b0, u32 b1);
#else
__device__ __forceinline__ void mma_bf16(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

// Stage rows r0..r1 (at most BM) x columns k0..k0+BK of bf16 activations [*, K] into s.
__device__ __forceinline__ void stage_act(u16 (*s)[SK], const u16* x, int r0, int r1, int k0, int K) {
    const int tid = threadIdx.x;
    if ((K & 7) == 0) {
        for (int v = tid; v < BM * BK / 8; v += blockDim.x) {
            int r = v / (BK / 8), kv = (v % (BK / 8)) * 8;
            uint4 q = make_uint4(0, 0, 0, 0);
            if (r0 + r < r1 && k0 + kv < K) q = *(const uint4*)(x + (size_t)(r0 + r) * K + k0 + kv);
            *(uint4*)&s[r][kv] = q;
        }
    } else {
        for (int v = tid; v < BM * BK; v += blockDim.x) {
            int r = v / BK, k = v % BK;
            s[r][k] = (r0 + r < r1 && k0 + k < K) ? x[(size_t)(r0 + r) * K + k0 + k] : (u16)0;
        }
    }
}

// FP8 weights whose block scale is constant over each BN x BK stage (block rows a multiple of
// BN, block columns of BK: DeepSeek's 128 x 128 blocks) are staged exactly (every e4m3 value is
// a bf16 value) and their scale is applied to the f32 partial sums of each stage. Other block
// shapes are scaled while staged, which rounds each weight once more to bf16.
__device__ __forceinline__ bool exact_fp8(const Mat& w) {
    return w.dtype == DT_FP8 && w.sbr % BN == 0 && w.sbc % BK == 0;
}

// Stage weight rows n0..n0+BN (of N) x columns k0..k0+BK (of K) as bf16 into s. bf16 weights
// are copied; FP8 weights are widened, and scaled unless `exact` (see exact_fp8).
template <bool EXACT>
__device__ __forceinline__ void stage_weight(u16 (*s)[SK], const Mat& w, int n0, int N, int k0, int K) {
    const int tid = threadIdx.x;
    if (w.dtype == DT_BF16 && (K & 7) == 0) {
        const u16* d = (const u16*)w.data;
        for (int v = tid; v < BN * BK / 8; v += blockDim.x) {
            int n = v / (BK / 8), kv = (v % (BK / 8)) * 8;
            uint4 q = make_uint4(0, 0, 0, 0);
            if (n0 + n < N && k0 + kv < K) q = *(const uint4*)(d + (size_t)(n0 + n) * K + k0 + kv);
            *(uint4*)&s[n][kv] = q;
        }
    } else if (w.dtype == DT_FP8 && (K & 7) == 0 && (w.sbc & 7) == 0) {
        const unsigned char* d = (const unsigned char*)w.data;
        for (int v = tid; v < BN * BK / 8; v += blockDim.x) {
            int n = v / (BK / 8), kv = (v % (BK / 8)) * 8;
            u16 o[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            if (n0 + n < N && k0 + kv < K) {
                uint2 q = *(const uint2*)(d + (size_t)(n0 + n) * K + k0 + kv);
                float sc = EXACT ? 1.0f : scale_at(w, n0 + n, k0 + kv, K);
                u32 lo = q.x, hi = q.y;
                #pragma unroll
                for (int j = 0; j < 4; j++) {
                    o[j] = f32_to_bf16(fp8_to_f32((lo >> (8 * j)) & 0xffu) * sc);
                    o[4 + j] = f32_to_bf16(fp8_to_f32((hi >> (8 * j)) & 0xffu) * sc);
                }
            }
            #pragma unroll
            for (int j = 0; j < 8; j++) s[n][kv + j] = o[j];
        }
    } else {
        for (int v = tid; v < BN * BK; v += blockDim.x) {
            int n = v / BK, k = v % BK;
            float f = 0.0f;
            if (n0 + n < N && k0 + k < K)
                f = EXACT ? fp8_to_f32(((const unsigned char*)w.data)[(size_t)(n0 + n) * K + k0 + k])
                          : weight_at(w, n0 + n, k0 + k, K);
            s[n][k] = f32_to_bf16(f);
        }
    }
}

// Zero a warp's accumulators (and the gated product's).
template <bool GATED>
__device__ __forceinline__ void zero_tiles(float (*a)[4][4], float (*b)[4][4]) {
    #pragma unroll
    for (int i = 0; i < 2; i++)
        #pragma unroll
        for (int j = 0; j < 4; j++)
            #pragma unroll
            for (int c = 0; c < 4; c++) {
                a[i][j][c] = 0.0f;
                if (GATED) b[i][j][c] = 0.0f;
            }
}

// One BM x BN output tile of x W^T (and of x W3^T when gated) for 4 warps in a 2 x 2 grid, each
// warp 32 x 32 (2 x 4 mma tiles). acc[i][j][4]: mma tile (i, j) of the warp. EXACT: the weights
// are FP8 staged unscaled (exact_fp8), each stage's sums scaled into acc.
template <bool GATED, bool EXACT>
__device__ __forceinline__ void mma_tile_as(const u16* x, int r0, int r1, const Mat& wa, const Mat& wb, int n0, int N,
                                            int K, float (*acc_a)[4][4], float (*acc_b)[4][4]) {
    __shared__ __align__(16) u16 xs[BM][SK];
    __shared__ __align__(16) u16 as[BN][SK];
    __shared__ __align__(16) u16 bs[GATED ? BN : 1][SK];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
    const int g = lane / 4, t = lane % 4;
    zero_tiles<GATED>(acc_a, acc_b);
    // EXACT: this stage's sums, before its block scale.
    float part_a[2][4][4], part_b[2][4][4];
    float (*pa)[4][4] = EXACT ? part_a : acc_a;
    float (*pb)[4][4] = EXACT ? part_b : acc_b;
    for (int k0 = 0; k0 < K; k0 += BK) {
        stage_act(xs, x, r0, r1, k0, K);
        stage_weight<EXACT>(as, wa, n0, N, k0, K);
        if (GATED) stage_weight<EXACT>(bs, wb, n0, N, k0, K);
        __syncthreads();
        if (EXACT) zero_tiles<GATED>(pa, pb);
        #pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            u32 a[2][4];
            #pragma unroll
            for (int i = 0; i < 2; i++) {
                int r = wm + i * 16 + g;
                a[i][0] = *(const u32*)&xs[r][kk + 2 * t];
                a[i][1] = *(const u32*)&xs[r + 8][kk + 2 * t];
                a[i][2] = *(const u32*)&xs[r][kk + 2 * t + 8];
                a[i][3] = *(const u32*)&xs[r + 8][kk + 2 * t + 8];
            }
            #pragma unroll
            for (int j = 0; j < 4; j++) {
                int n = wn + j * 8 + g;
                u32 b0 = *(const u32*)&as[n][kk + 2 * t];
                u32 b1 = *(const u32*)&as[n][kk + 2 * t + 8];
                #pragma unroll
                for (int i = 0; i < 2; i++) mma_bf16(pa[i][j], a[i], b0, b1);
                if (GATED) {
                    u32 c0 = *(const u32*)&bs[n][kk + 2 * t];
                    u32 c1 = *(const u32*)&bs[n][kk + 2 * t + 8];
                    #pragma unroll
                    for (int i = 0; i < 2; i++) mma_bf16(pb[i][j], a[i], c0, c1);
                }
            }
        }
        if (EXACT) {
            // One block scale covers the whole stage (exact_fp8).
            const float sa = scale_at(wa, n0, k0, K), sb = GATED ? scale_at(wb, n0, k0, K) : 0.0f;
            #pragma unroll
            for (int i = 0; i < 2; i++)
                #pragma unroll
                for (int j = 0; j < 4; j++)
                    #pragma unroll
                    for (int c = 0; c < 4; c++) {
                        acc_a[i][j][c] = fmaf(sa, pa[i][j][c], acc_a[i][j][c]);
                        if (GATED) acc_b[i][j][c] = fmaf(sb, pb[i][j][c], acc_b[i][j][c]);
                    }
        }
        __syncthreads();
    }
}

template <bool GATED>
__device__ __forceinline__ void mma_tile(const u16* x, int r0, int r1, const Mat& wa, const Mat& wb, int n0, int N,
                                         int K, float (*acc_a)[4][4], float (*acc_b)[4][4]) {
    if (exact_fp8(wa) && (!GATED || exact_fp8(wb)))
        mma_tile_as<GATED, true>(x, r0, r1, wa, wb, n0, N, K, acc_a, acc_b);
    else
        mma_tile_as<GATED, false>(x, r0, r1, wa, wb, n0, N, K, acc_a, acc_b);
}

// Row and column of accumulator element c of mma tile (i, j) in the block's output tile.
__device__ __forceinline__ int acc_row(int i, int c) {
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    return (warp / 2) * 32 + i * 16 + lane / 4 + (c >= 2 ? 8 : 0);
}
__device__ __forceinline__ int acc_col(int j, int c) {
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    return (warp % 2) * 32 + j * 8 + 2 * (lane % 4) + (c & 1);
}

extern "C" __global__ void __launch_bounds__(128) gateup_mma(const u32* tiles, const Expert* experts,
                                                             const u16* x, int hidden, int ffn, float limit, u16* h) {
    const u32* tile = tiles + 4 * blockIdx.y;
    const Expert& e = experts[tile[0]];
    const int r0 = (int)tile[1], r1 = (int)tile[2], n0 = blockIdx.x * BN;
    float acc_g[2][4][4], acc_u[2][4][4];
    mma_tile<true>(x, r0, r1, e.w1, e.w3, n0, ffn, hidden, acc_g, acc_u);
    #pragma unroll
    for (int i = 0; i < 2; i++)
        #pragma unroll
        for (int j = 0; j < 4; j++)
            #pragma unroll
            for (int c = 0; c < 4; c++) {
                int r = r0 + acc_row(i, c), n = n0 + acc_col(j, c);
                if (r < r1 && n < ffn) h[(size_t)r * ffn + n] = f32_to_bf16(silu_mul(acc_g[i][j][c], acc_u[i][j][c], limit));
            }
}

extern "C" __global__ void __launch_bounds__(128) down_mma(const u32* tiles, const Expert* experts, const u16* h,
                                                           int hidden, int ffn, void* out, int out_dtype) {
    const u32* tile = tiles + 4 * blockIdx.y;
    const Expert& e = experts[tile[0]];
    const int r0 = (int)tile[1], r1 = (int)tile[2], n0 = blockIdx.x * BN;
    float acc[2][4][4];
    mma_tile<false>(h, r0, r1, e.w2, e.w2, n0, hidden, ffn, acc, acc);
    #pragma unroll
    for (int i = 0; i < 2; i++)
        #pragma unroll
        for (int j = 0; j < 4; j++)
            #pragma unroll
            for (int c = 0; c < 4; c++) {
                int r = r0 + acc_row(i, c), n = n0 + acc_col(j, c);
                if (r < r1 && n < hidden) {
                    size_t o = (size_t)r * hidden + n;
                    if (out_dtype == DT_F32) ((float*)out)[o] = acc[i][j][c];
                    else ((u16*)out)[o] = f32_to_bf16(acc[i][j][c]);
                }
            }
}

// ---------------------------------------------------------------------------------------------
// f32 path: 16 x 16 threads, each 4 x 4 outputs of a 64 x 64 tile, k in steps of 16.

#define SB 16

template <bool GATED>
__device__ __forceinline__ void simt_tile(const void* x, int x_dtype, int r0, int r1, const Mat& wa, const Mat& wb,
                                          int n0, int N, int K, float (*acc_a)[4], float (*acc_b)[4]) {
    __shared__ float xs[SB][BM + 4];
    __shared__ float as[SB][BN + 4];
    __shared__ float bs[GATED ? SB : 1][BN + 4];
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    #pragma unroll
    for (int i = 0; i < 4; i++)
        #pragma unroll
        for (int j = 0; j < 4; j++) {
            acc_a[i][j] = 0.0f;
            if (GATED) acc_b[i][j] = 0.0f;
        }
    for (int k0 = 0; k0 < K; k0 += SB) {
        for (int v = threadIdx.x; v < BM * SB; v += blockDim.x) {
            int r = v / SB, k = v % SB;
            xs[k][r] = (r0 + r < r1 && k0 + k < K) ? act_at(x, x_dtype, (size_t)(r0 + r) * K + k0 + k) : 0.0f;
            as[k][r] = (n0 + r < N && k0 + k < K) ? weight_at(wa, n0 + r, k0 + k, K) : 0.0f;
            if (GATED) bs[k][r] = (n0 + r < N && k0 + k < K) ? weight_at(wb, n0 + r, k0 + k, K) : 0.0f;
        }
        __syncthreads();
        #pragma unroll
        for (int k = 0; k < SB; k++) {
            float xv[4], av[4], bv[4];
            #pragma unroll
            for (int i = 0; i < 4; i++) xv[i] = xs[k][ty + 16 * i];
            #pragma unroll
            for (int j = 0; j < 4; j++) {
                av[j] = as[k][tx + 16 * j];
                if (GATED) bv[j] = bs[k][tx + 16 * j];
            }
            #pragma unroll
            for (int i = 0; i < 4; i++)
                #pragma unroll
                for (int j = 0; j < 4; j++) {
                    acc_a[i][j] = fmaf(xv[i], av[j], acc_a[i][j]);
                    if (GATED) acc_b[i][j] = fmaf(xv[i], bv[j], acc_b[i][j]);
                }
        }
        __syncthreads();
    }
}

extern "C" __global__ void __launch_bounds__(256) gateup_simt(const u32* tiles, const Expert* experts, const void* x,
                                                              int x_dtype, int hidden, int ffn, float limit, float* h) {
    const u32* tile = tiles + 4 * blockIdx.y;
    const Expert& e = experts[tile[0]];
    const int r0 = (int)tile[1], r1 = (int)tile[2], n0 = blockIdx.x * BN;
    float acc_g[4][4], acc_u[4][4];
    simt_tile<true>(x, x_dtype, r0, r1, e.w1, e.w3, n0, ffn, hidden, acc_g, acc_u);
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    #pragma unroll
    for (int i = 0; i < 4; i++)
        #pragma unroll
        for (int j = 0; j < 4; j++) {
            int r = r0 + ty + 16 * i, n = n0 + tx + 16 * j;
            if (r < r1 && n < ffn) h[(size_t)r * ffn + n] = silu_mul(acc_g[i][j], acc_u[i][j], limit);
        }
}

extern "C" __global__ void __launch_bounds__(256) down_simt(const u32* tiles, const Expert* experts, const float* h,
                                                            int hidden, int ffn, void* out, int out_dtype) {
    const u32* tile = tiles + 4 * blockIdx.y;
    const Expert& e = experts[tile[0]];
    const int r0 = (int)tile[1], r1 = (int)tile[2], n0 = blockIdx.x * BN;
    float acc[4][4];
    simt_tile<false>(h, DT_F32, r0, r1, e.w2, e.w2, n0, hidden, ffn, acc, acc);
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    #pragma unroll
    for (int i = 0; i < 4; i++)
        #pragma unroll
        for (int j = 0; j < 4; j++) {
            int r = r0 + ty + 16 * i, n = n0 + tx + 16 * j;
            if (r < r1 && n < hidden) {
                size_t o = (size_t)r * hidden + n;
                if (out_dtype == DT_F32) ((float*)out)[o] = acc[i][j];
                else ((u16*)out)[o] = f32_to_bf16(acc[i][j]);
            }
        }
}

// ---------------------------------------------------------------------------------------------
// Permute and combine.

// dst row i = src row idx[i]; rows of row_bytes bytes. One block per row.
extern "C" __global__ void gather_rows(const unsigned char* src, unsigned char* dst, const u32* idx, u32 rows,
                                       u32 row_bytes) {
    const u32 i = blockIdx.x;
    if (i >= rows) return;
    const unsigned char* s = src + (size_t)idx[i] * row_bytes;
    unsigned char* d = dst + (size_t)i * row_bytes;
    if ((row_bytes & 15) == 0) {
        for (u32 b = threadIdx.x * 16; b < row_bytes; b += blockDim.x * 16) *(uint4*)(d + b) = *(const uint4*)(s + b);
    } else {
        for (u32 b = threadIdx.x; b < row_bytes; b += blockDim.x) d[b] = s[b];
    }
}

// out[t, c] = sum over j < k of weight[t k + j] * src[slot[t k + j], c], f32 out; a slot of
// 0xffffffff contributes nothing. Deterministic: no atomics. One block per token.
extern "C" __global__ void combine_rows(const void* src, int src_dtype, const u32* slot, const float* weight,
                                        u32 tokens, u32 k, u32 hidden, float* out) {
    const u32 t = blockIdx.x;
    if (t >= tokens) return;
    for (u32 c = threadIdx.x; c < hidden; c += blockDim.x) {
        float acc = 0.0f;
        for (u32 j = 0; j < k; j++) {
            u32 s = slot[(size_t)t * k + j];
            if (s != 0xffffffffu) acc = fmaf(weight[(size_t)t * k + j], act_at(src, src_dtype, (size_t)s * hidden + c), acc);
        }
        out[(size_t)t * hidden + c] = acc;
    }
}
