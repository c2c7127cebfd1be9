/* y = x @ W.T (+ bias) for bfloat16 x [M, K] and a GGUF Q4_1 or Q8_0 weight W [N, K] kept
 * quantized, float32 accumulation, bfloat16 output rounded once. Built and loaded by
 * engine/native.py.
 *
 * Q4_1: each group of 32 consecutive weights of a row has an fp16 scale d and minimum m,
 * w = d * q + m with q in 0..15. So for one output n and group g,
 *     sum_k x_k w_k = d * sum_k x_k q_k + m * sum_k x_k,
 * and sum_k x_k q_k is a bfloat16 dot product with exact operands (q is a small integer):
 * the kernel turns nibbles into bfloat16 with one table lookup (VPERMW) per 32 weights and
 * feeds AVX512-BF16 dot products, then applies d and m once per group in float32. d and m
 * are the file's fp16 values, unrounded (torch's int4 kernel holds them in bfloat16).
 * Q8_0: w = d * q with q an int8, split as q = 16 * (q >> 4) + (q & 15): two nibble
 * lookups (the high one into a table of 16 * its signed value), both exact in bfloat16,
 * into the same dot products, then d once per group.
 *
 * Packed layout, per tile of 16 output rows and group of 32 inputs (one sequential stream
 * over the matrix):
 *   Q4_1 (320 bytes): 4 x 64 bytes of nibbles: 16-bit lane j of block L holds, in its
 *     nibble s (bits 4s..4s+3), q[row j / 2][input 2 * (4L + s) + j % 2] -- after the
 *     lookup, the (k, k + 1) pairs of the 16 rows side by side, as the dot-product
 *     instruction wants them; then 16 fp16 d and 16 fp16 m;
 *   Q8_0 (544 bytes): 8 x 64 bytes: lane j of block L holds q[row j / 2][4L + j % 2] in
 *     its low byte and q[row j / 2][4L + 2 + j % 2] in its high byte; then 16 fp16 d.
 * Q4_1 is 5 bits a weight, Q8_0 8.5: decode, which reads every weight once a step, reads
 * 3.2x (1.9x) fewer bytes than from bfloat16. Tiles are split over OpenMP threads; rows of
 * x go through in groups of up to 8 that share each converted weight vector.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "bf16.h"
#include "simd.h"

#define TILE_N 16
#define GROUP 32
#define Q4_BYTES 320 /* a tile's group, packed */
#define Q8_BYTES 544
#define MAX_ROWS 8

SPLITSERVE_BF16_PROBE(quant_gemm)

/* q: [N, K] uint8 (0..15), d, m: [N, K / 32] fp16 bits → out: ceil(N / 16) * (K / 32) * 320
 * bytes. Rows past N get q = d = m = 0. K must be a multiple of 32. */
void splitserve_pack_q4_1(const uint8_t *q, const uint16_t *d, const uint16_t *m, uint8_t *out,
                          int64_t N, int64_t K) {
    const int64_t tiles = (N + TILE_N - 1) / TILE_N, groups = K / GROUP;
    for (int64_t t = 0; t < tiles; t++)
        for (int64_t g = 0; g < groups; g++) {
            uint8_t *blk = out + (t * groups + g) * Q4_BYTES;
            uint16_t *lanes = (uint16_t *)blk;
            memset(blk, 0, Q4_BYTES);
            for (int L = 0; L < 4; L++)
                for (int j = 0; j < 32; j++) {
                    const int64_t row = t * TILE_N + j / 2;
                    if (row >= N) continue;
                    uint16_t v = 0;
                    for (int s = 0; s < 4; s++) {
                        const int64_t k = g * GROUP + 2 * (4 * L + s) + j % 2;
                        v |= (uint16_t)((q[row * K + k] & 0xF) << (4 * s));
                    }
                    lanes[L * 32 + j] = v;
                }
            uint16_t *dm = (uint16_t *)(blk + 256);
            for (int r = 0; r < TILE_N; r++) {
                const int64_t row = t * TILE_N + r;
                if (row >= N) continue;
                dm[r] = d[row * groups + g];
                dm[16 + r] = m[row * groups + g];
            }
        }
}

/* q: [N, K] int8, d: [N, K / 32] fp16 bits → out: ceil(N / 16) * (K / 32) * 544 bytes. */
void splitserve_pack_q8_0(const int8_t *q, const uint16_t *d, uint8_t *out, int64_t N,
                          int64_t K) {
    const int64_t tiles = (N + TILE_N - 1) / TILE_N, groups = K / GROUP;
    for (int64_t t = 0; t < tiles; t++)
        for (int64_t g = 0; g < groups; g++) {
            uint8_t *blk = out + (t * groups + g) * Q8_BYTES;
            memset(blk, 0, Q8_BYTES);
            for (int L = 0; L < 8; L++)
                for (int j = 0; j < 32; j++) {
                    const int64_t row = t * TILE_N + j / 2;
                    if (row >= N) continue;
                    const int8_t *qr = q + row * K + g * GROUP + 4 * L + j % 2;
                    blk[L * 64 + 2 * j] = (uint8_t)qr[0];
                    blk[L * 64 + 2 * j + 1] = (uint8_t)qr[2];
                }
            uint16_t *dd = (uint16_t *)(blk + 512);
            for (int r = 0; r < TILE_N; r++) {
                const int64_t row = t * TILE_N + r;
                if (row < N) dd[r] = d[row * groups + g];
            }
        }
}

#if defined(__AVX512BF16__)
/* bf16 of a nibble read as 0..15, and of 16 x the nibble read as a signed -8..7 (Q8_0's
 * high nibble); twice each: VPERMW reads 5 index bits, and the 5th is the next nibble's. */
static const uint16_t NIBBLE_BF16[32] = {
    0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,
    0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170,
    0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,
    0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};
static const uint16_t HIGH_NIBBLE_BF16[32] = {
    0x0000, 0x4180, 0x4200, 0x4240, 0x4280, 0x42a0, 0x42c0, 0x42e0,
    0xc300, 0xc2e0, 0xc2c0, 0xc2a0, 0xc280, 0xc240, 0xc200, 0xc180,
    0x0000, 0x4180, 0x4200, 0x4240, 0x4280, 0x42a0, 0x42c0, 0x42e0,
    0xc300, 0xc2e0, 0xc2c0, 0xc2a0, 0xc280, 0xc240, 0xc200, 0xc180};

/* out (MB rows x 16 outputs, float32) = x[MB rows] @ one packed tile (Q8 selects the
 * format); xsum[r * groups + g] is row r's sum over group g (Q4_1's minimum term). */
static inline __attribute__((always_inline)) void tile_rows(
    const uint16_t *x, int64_t ldx, const float *xsum, const uint8_t *tp, int64_t groups,
    float *out, const int MB, const int Q8) {
    const __m512i lut_a = _mm512_loadu_si512(NIBBLE_BF16);
    const __m512i lut_b = _mm512_loadu_si512(Q8 ? HIGH_NIBBLE_BF16 : NIBBLE_BF16);
    const int NC = MB == 1 ? 4 : MB <= 3 ? 2 : 1;
    const int loads = Q8 ? 8 : 4, bytes = Q8 ? Q8_BYTES : Q4_BYTES;
    __m512 y[MAX_ROWS];
#pragma GCC unroll 8
    for (int r = 0; r < MB; r++) y[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *blk = tp + g * bytes;
        /* NC independent accumulator chains a row (each dot product waits on the last one
         * of its chain: one row alone would be latency-bound), summed per group. */
        __m512 acc[MAX_ROWS][4];
#pragma GCC unroll 8
        for (int r = 0; r < MB; r++)
            for (int c = 0; c < NC; c++) acc[r][c] = _mm512_setzero_ps();
#pragma GCC unroll 8
        for (int L = 0; L < loads; L++) {
            const __m512i v = _mm512_loadu_si512(blk + 64 * L);
            const __m512bh w0 = (__m512bh)_mm512_permutexvar_epi16(v, lut_a);
            const __m512bh w1 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), lut_b);
            const __m512bh w2 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), lut_a);
            const __m512bh w3 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), lut_b);
            /* the input pair each vector multiplies: Q4_1 4L + s, Q8_0 2L (w0, w1: both
             * nibbles of the low bytes) and 2L + 1 (w2, w3) */
            const int64_t k0 = g * GROUP + (Q8 ? 4 * L : 8 * L);
            const int o1 = Q8 ? 0 : 2, o2 = Q8 ? 2 : 4, o3 = Q8 ? 2 : 6;
#pragma GCC unroll 8
            for (int r = 0; r < MB; r++) {
                const uint16_t *xr = x + r * ldx + k0;
                int32_t p0, p1, p2, p3;
                memcpy(&p0, xr, 4);
                memcpy(&p1, xr + o1, 4);
                memcpy(&p2, xr + o2, 4);
                memcpy(&p3, xr + o3, 4);
                const int c0 = (2 * L) % NC, c1 = (2 * L + 1) % NC;
                acc[r][c0] = _mm512_dpbf16_ps(acc[r][c0], w0, (__m512bh)_mm512_set1_epi32(p0));
                acc[r][c1] = _mm512_dpbf16_ps(acc[r][c1], w1, (__m512bh)_mm512_set1_epi32(p1));
                acc[r][c0] = _mm512_dpbf16_ps(acc[r][c0], w2, (__m512bh)_mm512_set1_epi32(p2));
                acc[r][c1] = _mm512_dpbf16_ps(acc[r][c1], w3, (__m512bh)_mm512_set1_epi32(p3));
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < MB; r++)
            for (int c = 1; c < NC; c++) acc[r][0] = _mm512_add_ps(acc[r][0], acc[r][c]);
        /* float32 lane o of acc: output o's sum over the group (each dot product adds
         * the pair 2o, 2o + 1 of the weight vector). */
        const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + bytes - (Q8 ? 32 : 64))));
#pragma GCC unroll 8
        for (int r = 0; r < MB; r++) y[r] = _mm512_fmadd_ps(acc[r][0], dv, y[r]);
        if (!Q8) {
            const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 288)));
#pragma GCC unroll 8
            for (int r = 0; r < MB; r++)
                y[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xsum[r * groups + g]), y[r]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MB; r++) _mm512_storeu_ps(out + r * TILE_N, y[r]);
}

#define TILE_CASES(Q8)                                                       \
    switch (mb) {                                                            \
    case 1: tile_rows(xs, ldx, ss, w, groups, acc, 1, Q8); break;            \
    case 2: tile_rows(xs, ldx, ss, w, groups, acc, 2, Q8); break;            \
    case 3: tile_rows(xs, ldx, ss, w, groups, acc, 3, Q8); break;            \
    case 4: tile_rows(xs, ldx, ss, w, groups, acc, 4, Q8); break;            \
    case 5: tile_rows(xs, ldx, ss, w, groups, acc, 5, Q8); break;            \
    case 6: tile_rows(xs, ldx, ss, w, groups, acc, 6, Q8); break;            \
    case 7: tile_rows(xs, ldx, ss, w, groups, acc, 7, Q8); break;            \
    default: tile_rows(xs, ldx, ss, w, groups, acc, 8, Q8); break;           \
    }

static int quant_gemm(const uint16_t *x, int64_t ldx, int64_t M, const uint8_t *wp,
                      int64_t N, int64_t K, const uint16_t *bias, uint16_t *y, int64_t ldy,
                      int num_threads, const int q8) {
    if (K % GROUP) return -1;
    const int64_t tiles = (N + TILE_N - 1) / TILE_N, groups = K / GROUP;
    const int64_t bytes = q8 ? Q8_BYTES : Q4_BYTES;
    float xsum_stack[MAX_ROWS * 64];
    float *xsum = xsum_stack;
    if (!q8) {
        if (M * groups > MAX_ROWS * 64) xsum = (float *)malloc(sizeof(float) * M * groups);
        if (!xsum) return -2;
        for (int64_t r = 0; r < M; r++)
            for (int64_t g = 0; g < groups; g++) {
                __m512 a = _mm512_add_ps(load_bf16x16(x + r * ldx + g * GROUP),
                                         load_bf16x16(x + r * ldx + g * GROUP + 16));
                xsum[r * groups + g] = _mm512_reduce_add_ps(a);
            }
    }
    /* Rows in balanced groups of at most MAX_ROWS (12 rows run as 6 + 6, not 8 + 4). */
    const int64_t rgroups = (M + MAX_ROWS - 1) / MAX_ROWS;
    const int64_t per = rgroups ? (M + rgroups - 1) / rgroups : 0;
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1 && tiles > 1) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        float acc[MAX_ROWS * TILE_N];
        const uint8_t *w = wp + t * groups * bytes;
        const int64_t n0 = t * TILE_N, nn = N - n0 < TILE_N ? N - n0 : TILE_N;
        for (int64_t m0 = 0; m0 < M; m0 += per) {
            const int mb = (int)(M - m0 < per ? M - m0 : per);
            const uint16_t *xs = x + m0 * ldx;
            const float *ss = xsum + (q8 ? 0 : m0 * groups);
            if (q8) {
                TILE_CASES(1)
            } else {
                TILE_CASES(0)
            }
            for (int r = 0; r < mb; r++)
                for (int64_t n = 0; n < nn; n++) {
                    float v = acc[r * TILE_N + n] + (bias ? bf16_to_f32(bias[n0 + n]) : 0.f);
                    y[(m0 + r) * ldy + n0 + n] = f32_to_bf16(v);
                }
        }
    }
    if (xsum != xsum_stack) free(xsum);
    return 0;
}
#else
static int quant_gemm(const uint16_t *x, int64_t ldx, int64_t M, const uint8_t *wp,
                      int64_t N, int64_t K, const uint16_t *bias, uint16_t *y, int64_t ldy,
                      int num_threads, const int q8) {
    (void)x; (void)ldx; (void)M; (void)wp; (void)N; (void)K; (void)bias; (void)y; (void)ldy;
    (void)num_threads; (void)q8;
    return -1;
}
#endif

/* y [M, N] (row stride ldy) = x [M, K] (row stride ldx) @ W.T + bias (bias may be NULL),
 * W packed by splitserve_pack_q4_1 / splitserve_pack_q8_0. Return 0, -1 when built without
 * AVX512-BF16 or K is not a multiple of 32, -2 when out of memory. */
int splitserve_q4_1_gemm_bf16(const uint16_t *x, int64_t ldx, int64_t M, const uint8_t *wp,
                              int64_t N, int64_t K, const uint16_t *bias, uint16_t *y,
                              int64_t ldy, int num_threads) {
    return quant_gemm(x, ldx, M, wp, N, K, bias, y, ldy, num_threads, 0);
}

int splitserve_q8_0_gemm_bf16(const uint16_t *x, int64_t ldx, int64_t M, const uint8_t *wp,
                              int64_t N, int64_t K, const uint16_t *bias, uint16_t *y,
                              int64_t ldy, int num_threads) {
    return quant_gemm(x, ldx, M, wp, N, K, bias, y, ldy, num_threads, 1);
}
