/* y = x @ W.T (+ bias) for float32 x [M, K] and a GGUF Q4_1 or Q8_0 weight W [N, K] kept
 * quantized, float32 throughout: the float32 engine's decode GEMMs on CPUs with AVX2, FMA
 * and F16C (every x86-64 CPU of the last decade, AVX2-only ones such as AMD Zen 3
 * included). The bfloat16 kernel (quant_gemm.c) needs AVX512-BF16. Built and loaded by
 * engine/native.py. The w4a8 GEMM on the same packed Q4_1 (inputs rounded to int8, integer
 * dot products: `--quantization w4a8`) is quant_gemm_a8.c.
 *
 * Small-batch decode reads every weight once a step: 4 bytes a weight dense in float32, 5
 * bits in Q4_1, 8.5 in Q8_0, so the quantized weights cut the bytes 6.4x (3.8x). Each
 * weight is exact in float32 after conversion, and so are the file's fp16 scales, so the
 * result equals the dequantized (dense) GEMM up to float32 summation order.
 *
 * Q4_1 (w = d * q + m, q in 0..15, per group of 32 inputs of a row): for output n and group
 *     sum_k x_k w_k = d * sum_k x_k q_k + m * sum_k x_k.
 * Q8_0 (w = d * q, q an int8): d * sum_k x_k q_k.
 *
 * Packed layout, per tile of 8 output rows and group of 32 inputs (one sequential stream):
 *   Q4_1 (160 bytes): 4 vectors of 8 little-endian 32-bit words, word r of vector c holding
 *     q[row r][8c + j] in bits 4j..4j+3; then 8 fp16 d and 8 fp16 m;
 *   Q8_0 (272 bytes): 32 x 8 int8, q[row r][k] at byte 8k + r; then 8 fp16 d.
 * One AVX2 vector holds a tile's 8 outputs; two adjacent tiles share every broadcast of
 * an x value, 4 rows of x at a time (x copied once a call into blocks of 4 rows side by
 * side, k-major, so each load is a constant offset from one pointer). Each input's weights
 * are converted as they are used (a shift and a mask of one loaded vector, then a convert:
 * this layout measured 5-10 % faster than one 32-bit word of 8 rows broadcast and shifted
 * per input); converting a group once into an L1 buffer for many rows measured slower.
 * The weight stream is prefetched PF_AHEAD bytes ahead: with one row of x the kernel
 * otherwise waits on memory (a pass over SmolLM2's weights, ~96 MB, took 17 % less time
 * on an AVX2 EPYC). Pairs of tiles are split over OpenMP threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "quant_tiles8.h"

#define MB_MAX 4

int splitserve_quant_gemm_f32_available(void) { return QG32_SIMD; }

/* q: [N, K] uint8 (0..15), d, m: [N, K / 32] fp16 bits → out: ceil(N / 8) * (K / 32) * 160
 * bytes (quant_tiles8.h). */
void splitserve_pack_q4_1_f32(const uint8_t *q, const uint16_t *d, const uint16_t *m,
                              uint8_t *out, int64_t N, int64_t K) {
    pack_q4_1_tiles8(q, d, m, out, N, K);
}

/* q: [N, K] int8, d: [N, K / 32] fp16 bits → out: ceil(N / 8) * (K / 32) * 272 bytes. */
void splitserve_pack_q8_0_f32(const int8_t *q, const uint16_t *d, uint8_t *out, int64_t N,
                              int64_t K) {
    const int64_t tiles = (N + TILE_N - 1) / TILE_N, groups = K / GROUP;
    for (int64_t t = 0; t < tiles; t++)
        for (int64_t g = 0; g < groups; g++) {
            uint8_t *blk = out + (t * groups + g) * Q8_BYTES;
            memset(blk, 0, Q8_BYTES);
            uint16_t dd[TILE_N] = {0};
            for (int r = 0; r < TILE_N; r++) {
                const int64_t row = t * TILE_N + r;
                if (row >= N) continue;
                for (int k = 0; k < GROUP; k++)
                    blk[TILE_N * k + r] = (uint8_t)q[row * K + g * GROUP + k];
                dd[r] = d[row * groups + g];
            }
            memcpy(blk + 256, dd, sizeof dd);
        }
}

#if QG32_SIMD
/* The 8 weights (one per output of the tile) of input k of a packed group, as float32. */
static inline __attribute__((always_inline)) __m256 weights_at(const uint8_t *blk, int k,
                                                               const int Q8) {
    if (Q8)
        return _mm256_cvtepi32_ps(
            _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 8 * k))));
    const __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 32 * (k / 8)));
    const int j = k % 8; /* a constant once the caller's loop over k is unrolled */
    if (j == 7) return _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 28));
    const __m256i nib = j ? _mm256_srli_epi32(v, 4 * j) : v;
    return _mm256_cvtepi32_ps(_mm256_and_si256(nib, _mm256_set1_epi32(0xF)));
}

/* One group of NT (1 or 2) adjacent tiles for MB rows of x: a[t][r] += d_t * sum_k x[r][k]
 * w_tk (+ m_t * xsum[r] for Q4_1), x[r][k] at xb[4k + r] and xsum[r] at xsb[r] (the rows
 * interleaved in blocks of 4, so every load is a constant offset from one pointer). Two
 * tiles share each broadcast of x; MB * NT * C = 8 independent FMA chains (C sums per row
 * and tile over inputs k, k + C, ...) keep both FMA pipes busy. */
static inline __attribute__((always_inline)) void group_rows(
    const float *xb, const float *xsb, const uint8_t *blk0, const uint8_t *blk1,
    __m256 *a0, __m256 *a1, const int MB, const int NT, const int Q8) {
    const int C = 8 / (MB * NT) > 0 ? 8 / (MB * NT) : 1;
    __m256 s[2][8];
    for (int t = 0; t < NT; t++)
        for (int i = 0; i < MB * C; i++) s[t][i] = _mm256_setzero_ps();
#pragma GCC unroll 32
    for (int k = 0; k < GROUP; k++) {
        const __m256 w0 = weights_at(blk0, k, Q8);
        const __m256 w1 = NT == 2 ? weights_at(blk1, k, Q8) : w0;
        for (int r = 0; r < MB; r++) {
            const __m256 xv = _mm256_broadcast_ss(xb + k * MB_MAX + r);
            s[0][r * C + k % C] = _mm256_fmadd_ps(xv, w0, s[0][r * C + k % C]);
            if (NT == 2) s[1][r * C + k % C] = _mm256_fmadd_ps(xv, w1, s[1][r * C + k % C]);
        }
    }
    for (int t = 0; t < NT; t++) {
        const uint8_t *scales = (t ? blk1 : blk0) + (Q8 ? 256 : 128);
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)scales));
        const __m256 mn = Q8 ? d : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + 16)));
        __m256 *a = t ? a1 : a0;
        for (int r = 0; r < MB; r++) {
            for (int i = 1; i < C; i++) s[t][r * C] = _mm256_add_ps(s[t][r * C], s[t][r * C + i]);
            a[r] = _mm256_fmadd_ps(s[t][r * C], d, a[r]);
            if (!Q8) a[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(xsb + r), mn, a[r]);
        }
    }
}

#define GROUP_CASES(mb, NT, Q8, ...)                                 \
    switch (mb) {                                                    \
    case 1: group_rows(__VA_ARGS__, 1, NT, Q8); break;               \
    case 2: group_rows(__VA_ARGS__, 2, NT, Q8); break;               \
    case 3: group_rows(__VA_ARGS__, 3, NT, Q8); break;               \
    default: group_rows(__VA_ARGS__, 4, NT, Q8); break;              \
    }

/* acc0[r], acc1[r] (8 outputs each) = x[r] @ packed tiles tp0 (and tp1 when nt is 2), for
 * mrows rows of x (at most 32) in the interleaved layout, MB_MAX rows at a time. */
static void tile_rows(const float *xi, const float *si, int64_t K, int64_t groups,
                      const uint8_t *tp0, const uint8_t *tp1, __m256 *acc0, __m256 *acc1,
                      int mrows, const int nt, const int q8) {
    const int64_t bytes = q8 ? Q8_BYTES : Q4_BYTES;
    for (int r = 0; r < mrows; r++) acc0[r] = acc1[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *b0 = tp0 + g * bytes, *b1 = tp1 + g * bytes;
        prefetch_ahead(b0, b1, bytes);
        for (int r0 = 0; r0 < mrows; r0 += MB_MAX) {
            const int mb = mrows - r0 < MB_MAX ? mrows - r0 : MB_MAX;
            const float *xb = xi + (r0 / MB_MAX) * K * MB_MAX + g * GROUP * MB_MAX;
            const float *xsb = si + (r0 / MB_MAX) * groups * MB_MAX + g * MB_MAX;
            if (q8 && nt == 2) {
                GROUP_CASES(mb, 2, 1, xb, xsb, b0, b1, acc0 + r0, acc1 + r0)
            } else if (q8) {
                GROUP_CASES(mb, 1, 1, xb, xsb, b0, b1, acc0 + r0, acc1 + r0)
            } else if (nt == 2) {
                GROUP_CASES(mb, 2, 0, xb, xsb, b0, b1, acc0 + r0, acc1 + r0)
            } else {
                GROUP_CASES(mb, 1, 0, xb, xsb, b0, b1, acc0 + r0, acc1 + r0)
            }
        }
    }
}

/* tile_rows for gemm_tile_pairs: x interleaved, its group sums, the format. */
struct f32_rows {
    const float *xi, *si;
    int64_t K, groups;
    int q8;
};

static void f32_tile_rows(const void *ctx, int64_t m0, const uint8_t *tp0, const uint8_t *tp1,
                          __m256 *acc0, __m256 *acc1, int mrows, int nt) {
    const struct f32_rows *c = ctx;
    tile_rows(c->xi + m0 * c->K, c->si + m0 * c->groups, c->K, c->groups, tp0, tp1, acc0, acc1,
              mrows, nt, c->q8);
}

static int quant_gemm_f32(const float *x, int64_t ldx, int64_t M, const uint8_t *wp,
                          int64_t N, int64_t K, const float *bias, float *y, int64_t ldy,
                          int num_threads, const int q8) {
    if (K % GROUP) return -1;
    const int64_t groups = K / GROUP;
    const int64_t bytes = q8 ? Q8_BYTES : Q4_BYTES;
    /* x as blocks of MB_MAX rows, each k-major with its rows side by side (xi[blk][k][r],
     * rows past M zero), and each row's sum over each group likewise (si[blk][g][r]). */
    const int64_t nblk = (M + MB_MAX - 1) / MB_MAX;
    float *xi = (float *)calloc((size_t)(nblk * MB_MAX * (K + groups)), sizeof(float));
    if (!xi) return -2;
    float *si = xi + nblk * MB_MAX * K;
    for (int64_t r = 0; r < M; r++) {
        float *dst = xi + (r / MB_MAX) * K * MB_MAX + r % MB_MAX;
        float *sums = si + (r / MB_MAX) * groups * MB_MAX + r % MB_MAX;
        for (int64_t g = 0; g < groups; g++) {
            float sum = 0.f;
            for (int k = 0; k < GROUP; k++) {
                const float v = x[r * ldx + g * GROUP + k];
                dst[(g * GROUP + k) * MB_MAX] = v;
                sum += v;
            }
            sums[g * MB_MAX] = sum;
        }
    }
    const struct f32_rows ctx = {xi, si, K, groups, q8};
    gemm_tile_pairs(M, N, groups, bytes, wp, bias, y, 0, ldy, num_threads, f32_tile_rows, &ctx);
    free(xi);
    return 0;
}
#else
static int quant_gemm_f32(const float *x, int64_t ldx, int64_t M, const uint8_t *wp,
                          int64_t N, int64_t K, const float *bias, float *y, int64_t ldy,
                          int num_threads, const int q8) {
    (void)x; (void)ldx; (void)M; (void)wp; (void)N; (void)K; (void)bias; (void)y; (void)ldy;
    (void)num_threads; (void)q8;
    return -1;
}
#endif

/* y [M, N] (row stride ldy) = x [M, K] (row stride ldx) @ W.T + bias (bias may be NULL),
 * W packed by splitserve_pack_q4_1_f32 / splitserve_pack_q8_0_f32. Return 0, -1 when built
 * without AVX2/FMA/F16C or K is not a multiple of 32, -2 when out of memory. */
int splitserve_q4_1_gemm_f32(const float *x, int64_t ldx, int64_t M, const uint8_t *wp,
                             int64_t N, int64_t K, const float *bias, float *y, int64_t ldy,
                             int num_threads) {
    return quant_gemm_f32(x, ldx, M, wp, N, K, bias, y, ldy, num_threads, 0);
}

int splitserve_q8_0_gemm_f32(const float *x, int64_t ldx, int64_t M, const uint8_t *wp,
                             int64_t N, int64_t K, const float *bias, float *y, int64_t ldy,
                             int num_threads) {
    return quant_gemm_f32(x, ldx, M, wp, N, K, bias, y, ldy, num_threads, 1);
}
