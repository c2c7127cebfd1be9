/* y = x @ W.T (+ bias) for float32 x [M, K] and a GGUF Q4_1 weight W [N, K] kept 4-bit,
 * with x quantized to int8 on the fly: `--quantization w4a8`, the float32 engine's decode
 * GEMMs on CPUs with AVX2, FMA and F16C. Built and loaded by engine/native.py.
 *
 * Not exact (quant_gemm_f32.c is: it converts each weight to float32 and multiplies in
 * float32, ~4 vector instructions a weight per 8 outputs, so on an AVX2 CPU a batch-1 step
 * waits on the ALUs, not on memory). Here each row of x is quantized per group of 32 inputs
 * as llama.cpp's Q8_1 does: dx = max|x| / 127, qx = round(x / dx) in -127..127, and
 * sx = dx * sum_k qx_k. For output n and group g (Q4_1: w = d * q + m)
 *     sum_k x_k w_k ~= sum_k w_k dx qx_k = d * dx * sum_k q_k qx_k + m * sx,
 * the exact dot of the dequantized weights with the rounded inputs (the rounded sum in the
 * m term too: the exact sum there would leave d * q, not w, multiplying the rounding, and
 * Q4_1's q has a mean of ~7.5, so the error doubled on zero-centred weights).
 * the integer dot in 8-bit multiplies: VPMADDUBSW multiplies 32 unsigned 4-bit weights by
 * 32 signed int8 inputs and adds pairs into 16 int16 lanes (|2 * 15 * 127| = 3,810, so a
 * whole group's 8 such vectors add in int16 without overflow: 30,480), then one VPMADDWD
 * by ones gives 8 int32 sums, one per output. About 3x fewer instructions a weight than the
 * float32 kernel. The error is x's rounding: at most dx / 2 an input, ~0.2 % of the
 * group's largest.
 *
 * Packed layout, per tile of 8 output rows and group of 32 inputs (160 bytes, one stream):
 * 4 vectors of 32 bytes, byte 4r + b of vector c holding q[row r][8c + b] in its low nibble
 * and q[row r][8c + 4 + b] in its high one; then 8 fp16 d and 8 fp16 m. A vector's low
 * nibbles are 8 rows x 4 consecutive inputs (k = 8c..8c+3), the high ones the next 4, so
 * one 32-bit broadcast of x's 4 int8 inputs meets every row's 4 weights.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#include "simd.h"
#define QA8_SIMD 1
#else
#define QA8_SIMD 0
#endif

#define TILE_N 8
#define GROUP 32
#define Q4_BYTES 160
#define PF_AHEAD 8192

int splitserve_quant_gemm_a8_available(void) { return QA8_SIMD; }

/* q: [N, K] uint8 (0..15), d, m: [N, K / 32] fp16 bits → out: ceil(N / 8) * (K / 32) * 160
 * bytes. Rows past N get q = d = m = 0. K must be a multiple of 32. */
void splitserve_pack_q4_1_a8(const uint8_t *q, const uint16_t *d, const uint16_t *m,
                             uint8_t *out, int64_t N, int64_t K) {
    const int64_t tiles = (N + TILE_N - 1) / TILE_N, groups = K / GROUP;
    for (int64_t t = 0; t < tiles; t++)
        for (int64_t g = 0; g < groups; g++) {
            uint8_t *blk = out + (t * groups + g) * Q4_BYTES;
            memset(blk, 0, Q4_BYTES);
            uint16_t dm[2 * TILE_N] = {0};
            for (int r = 0; r < TILE_N; r++) {
                const int64_t row = t * TILE_N + r;
                if (row >= N) continue;
                const uint8_t *qr = q + row * K + g * GROUP;
                for (int c = 0; c < GROUP / 8; c++)
                    for (int b = 0; b < 4; b++)
                        blk[32 * c + 4 * r + b] =
                            (uint8_t)((qr[8 * c + b] & 0xF) | (qr[8 * c + 4 + b] & 0xF) << 4);
                dm[r] = d[row * groups + g];
                dm[TILE_N + r] = m[row * groups + g];
            }
            memcpy(blk + 128, dm, sizeof dm);
        }
}

#if QA8_SIMD
/* Row r of x [M, K] → int8 qx[r * K ..], and per group g dx[r * groups + g] and the sum of
 * the quantized inputs sx[r * groups + g] = dx * sum qx (see the top of the file). An
 * all-zero group gets dx = 0, qx = 0. */
static void quantize_rows(const float *x, int64_t ldx, int64_t M, int64_t K, int8_t *qx,
                          float *dx, float *sx) {
    const int64_t groups = K / GROUP;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t r = 0; r < M; r++)
        for (int64_t g = 0; g < groups; g++) {
            const float *xg = x + r * ldx + g * GROUP;
            __m256 v[4], amax = _mm256_setzero_ps();
            for (int i = 0; i < 4; i++) {
                v[i] = _mm256_loadu_ps(xg + 8 * i);
                amax = _mm256_max_ps(amax, _mm256_and_ps(v[i], absmask));
            }
            const float m = hmax8_ps(amax);
            const float d = m / 127.f, inv = m > 0.f ? 127.f / m : 0.f;
            /* round to nearest even (the default MXCSR mode), then narrow 32 → 8 bits */
            __m256i i32[4], total = _mm256_setzero_si256();
            for (int i = 0; i < 4; i++) {
                i32[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(inv)));
                total = _mm256_add_epi32(total, i32[i]);
            }
            int32_t t[8], qsum = 0;
            _mm256_storeu_si256((__m256i *)t, total);
            for (int i = 0; i < 8; i++) qsum += t[i];
            dx[r * groups + g] = d;
            sx[r * groups + g] = d * (float)qsum;
            const __m256i i16 = _mm256_packs_epi32(i32[0], i32[1]);
            const __m256i j16 = _mm256_packs_epi32(i32[2], i32[3]);
            __m256i i8 = _mm256_packs_epi16(i16, j16);
            /* the packs interleave 128-bit lanes: dwords 0 4 1 5 2 6 3 7 → 0..7 */
            i8 = _mm256_permutevar8x32_epi32(i8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)(qx + r * K + g * GROUP), i8);
        }
}

/* One group of NT (1 or 2) adjacent tiles for mrows rows of x (row r's int8 group at
 * xq + r * K, its dx and sx at dxg[r * groups], sxg[r * groups]):
 * a[t][r] += d_t * dx[r] * sum_k q_tk qx_rk + m_t * sx[r]. The group's weights are unpacked
 * once (to registers or L1) and every row reads them there. */
static inline __attribute__((always_inline)) void group_rows(
    const int8_t *xq, int64_t K, const float *dxg, const float *sxg, int64_t groups,
    const uint8_t *blk0, const uint8_t *blk1, __m256 *a0, __m256 *a1, int mrows,
    const int NT) {
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256i w[2][8];
    __m256 d[2], mn[2];
    for (int t = 0; t < NT; t++) {
        const uint8_t *blk = t ? blk1 : blk0;
        for (int c = 0; c < GROUP / 8; c++) {
            const __m256i p = _mm256_loadu_si256((const __m256i *)(blk + 32 * c));
            w[t][2 * c] = _mm256_and_si256(p, low);
            w[t][2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(p, 4), low);
        }
        d[t] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 128)));
        mn[t] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 144)));
    }
    for (int r = 0; r < mrows; r++) {
        const int8_t *xr = xq + r * K;
        __m256i s[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            int32_t xj;
            memcpy(&xj, xr + 4 * j, 4);
            const __m256i xb = _mm256_set1_epi32(xj);
            for (int t = 0; t < NT; t++)
                s[t] = _mm256_add_epi16(s[t], _mm256_maddubs_epi16(w[t][j], xb));
        }
        const __m256 dxr = _mm256_broadcast_ss(dxg + r * groups);
        const __m256 sxr = _mm256_broadcast_ss(sxg + r * groups);
        for (int t = 0; t < NT; t++) {
            __m256 *a = t ? a1 : a0;
            const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(s[t], ones));
            a[r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(d[t], dxr), a[r]);
            a[r] = _mm256_fmadd_ps(sxr, mn[t], a[r]);
        }
    }
}

/* acc0[r], acc1[r] (8 outputs each) = x[r] @ packed tiles tp0 (and tp1 when nt is 2), for
 * mrows rows (at most 32). */
static void tile_rows(const int8_t *xq, const float *dx, const float *sx, int64_t K,
                      int64_t groups, const uint8_t *tp0, const uint8_t *tp1, __m256 *acc0,
                      __m256 *acc1, int mrows, const int nt) {
    for (int r = 0; r < mrows; r++) acc0[r] = acc1[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *b0 = tp0 + g * Q4_BYTES, *b1 = tp1 + g * Q4_BYTES;
        for (int64_t off = PF_AHEAD; off < PF_AHEAD + Q4_BYTES; off += 64) {
            _mm_prefetch((const char *)(b0 + off), _MM_HINT_T0);
            _mm_prefetch((const char *)(b1 + off), _MM_HINT_T0);
        }
        if (nt == 2)
            group_rows(xq + g * GROUP, K, dx + g, sx + g, groups, b0, b1, acc0, acc1, mrows, 2);
        else
            group_rows(xq + g * GROUP, K, dx + g, sx + g, groups, b0, b1, acc0, acc1, mrows, 1);
    }
}

/* tile_rows for gemm_tile_pairs: the quantized x, its scales and sums. */
struct a8_rows {
    const int8_t *qx;
    const float *dx, *sx;
    int64_t K, groups;
};

static void a8_tile_rows(const void *ctx, int64_t m0, const uint8_t *tp0, const uint8_t *tp1,
                         __m256 *acc0, __m256 *acc1, int mrows, int nt) {
    const struct a8_rows *c = ctx;
    tile_rows(c->qx + m0 * c->K, c->dx + m0 * c->groups, c->sx + m0 * c->groups, c->K,
              c->groups, tp0, tp1, acc0, acc1, mrows, nt);
}

static int gemm_a8(const float *x, int64_t ldx, int64_t M, const uint8_t *wp, int64_t N,
                   int64_t K, const float *bias, float *y, int64_t ldy, int num_threads) {
    if (K % GROUP) return -1;
    if (M <= 0) return 0;
    const int64_t groups = K / GROUP;
    int8_t *qx = (int8_t *)malloc((size_t)(M * K + 2 * M * groups * (int64_t)sizeof(float)));
    if (!qx) return -2;
    float *dx = (float *)(void *)(qx + M * K), *sx = dx + M * groups;
    /* M * K is a multiple of 32, so dx is 4-byte aligned */
    quantize_rows(x, ldx, M, K, qx, dx, sx);
    const struct a8_rows ctx = {qx, dx, sx, K, groups};
    gemm_tile_pairs(M, N, groups, Q4_BYTES, wp, bias, y, ldy, num_threads, a8_tile_rows, &ctx);
    free(qx);
    return 0;
}
#else
static int gemm_a8(const float *x, int64_t ldx, int64_t M, const uint8_t *wp, int64_t N,
                   int64_t K, const float *bias, float *y, int64_t ldy, int num_threads) {
    (void)x; (void)ldx; (void)M; (void)wp; (void)N; (void)K; (void)bias; (void)y; (void)ldy;
    (void)num_threads;
    return -1;
}
#endif

/* y [M, N] (row stride ldy) = x [M, K] (row stride ldx) @ W.T + bias (bias may be NULL),
 * W packed by splitserve_pack_q4_1_a8. Return 0, -1 when built without AVX2/FMA/F16C or K
 * is not a multiple of 32, -2 when out of memory. */
int splitserve_q4_1_gemm_a8(const float *x, int64_t ldx, int64_t M, const uint8_t *wp,
                            int64_t N, int64_t K, const float *bias, float *y, int64_t ldy,
                            int num_threads) {
    return gemm_a8(x, ldx, M, wp, N, K, bias, y, ldy, num_threads);
}
