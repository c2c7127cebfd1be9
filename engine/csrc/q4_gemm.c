/* y = x @ W.T (+ bias) for bfloat16 x [M, K] and a GGUF Q4_1 weight W [N, K] kept 4-bit,
 * float32 accumulation, bfloat16 output rounded once. Built and loaded by engine/native.py.
 *
 * Q4_1: each group of 32 consecutive weights of a row has an fp16 scale d and minimum m,
 * w = d * q + m with q in 0..15. So for one output n and group g,
 *     sum_k x_k w_k = d * sum_k x_k q_k + m * sum_k x_k,
 * and sum_k x_k q_k is a bfloat16 dot product with exact operands (q is a small integer):
 * the kernel turns nibbles into bfloat16 with one table lookup (VPERMW) per 32 weights and
 * feeds AVX512-BF16 dot products, then applies d and m once per group in float32. d and m
 * are the file's fp16 values, unrounded (torch's int4 kernel holds them in bfloat16).
 *
 * Packed layout, per tile of 16 output rows and group of 32 inputs (320 bytes, one
 * sequential stream over the matrix):
 *   4 x 64 bytes of nibbles: 16-bit lane j of block L holds, in its nibble s (bits 4s..4s+3),
 *     q[row j / 2][input 2 * (4L + s) + j % 2] -- after the lookup, the (k, k + 1) pairs of
 *     the 16 rows side by side, as the dot-product instruction wants them;
 *   16 fp16 d, then 16 fp16 m.
 * That is 5 bits a weight: decode, which reads every weight once a step, reads 3.2x fewer
 * bytes than from bfloat16. Tiles are split over OpenMP threads; rows of x go through in
 * groups of up to 8 that share each converted weight vector.
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
#define TILE_GROUP_BYTES 320
#define MAX_ROWS 8

int splitserve_q4_gemm_available(void) {
#if defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

/* q: [N, K] uint8 (0..15), d, m: [N, K / 32] fp16 bits → out: ceil(N / 16) * (K / 32) * 320
 * bytes. Rows past N get q = d = m = 0. K must be a multiple of 32. */
void splitserve_pack_q4_1(const uint8_t *q, const uint16_t *d, const uint16_t *m, uint8_t *out,
                          int64_t N, int64_t K) {
    const int64_t tiles = (N + TILE_N - 1) / TILE_N, groups = K / GROUP;
    for (int64_t t = 0; t < tiles; t++)
        for (int64_t g = 0; g < groups; g++) {
            uint8_t *blk = out + (t * groups + g) * TILE_GROUP_BYTES;
            uint16_t *lanes = (uint16_t *)blk;
            memset(blk, 0, TILE_GROUP_BYTES);
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

#if defined(__AVX512BF16__)
/* out (MB rows x 16 outputs, float32) = x[MB rows] @ one packed tile; xsum[r * groups + g]
 * is row r's sum over group g. */
static inline __attribute__((always_inline)) void tile_rows(
    const uint16_t *x, int64_t ldx, const float *xsum, const uint8_t *tp, int64_t groups,
    float *out, const int MB) {
    /* bf16 of 0..15, twice: VPERMW reads 5 index bits, and the 5th is the next nibble's. */
    static const uint16_t table[32] = {
        0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,
        0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170,
        0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,
        0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};
    const __m512i lut = _mm512_loadu_si512(table);
    const int NC = MB == 1 ? 4 : MB <= 3 ? 2 : 1;
    __m512 y[MAX_ROWS];
#pragma GCC unroll 8
    for (int r = 0; r < MB; r++) y[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *blk = tp + g * TILE_GROUP_BYTES;
        /* NC independent accumulator chains a row (each dot product waits on the last one
         * of its chain: one row alone would be latency-bound), summed per group. */
        __m512 acc[MAX_ROWS][4];
#pragma GCC unroll 8
        for (int r = 0; r < MB; r++)
            for (int c = 0; c < NC; c++) acc[r][c] = _mm512_setzero_ps();
#pragma GCC unroll 4
        for (int L = 0; L < 4; L++) {
            const __m512i v = _mm512_loadu_si512(blk + 64 * L);
            const __m512bh w0 = (__m512bh)_mm512_permutexvar_epi16(v, lut);
            const __m512bh w1 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), lut);
            const __m512bh w2 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), lut);
            const __m512bh w3 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), lut);
            const int64_t k0 = g * GROUP + 8 * L; /* inputs of pair 4L + s start at k0 + 2s */
#pragma GCC unroll 8
            for (int r = 0; r < MB; r++) {
                const uint16_t *xr = x + r * ldx + k0;
                int32_t p0, p1, p2, p3;
                memcpy(&p0, xr, 4);
                memcpy(&p1, xr + 2, 4);
                memcpy(&p2, xr + 4, 4);
                memcpy(&p3, xr + 6, 4);
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
        const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 256)));
        const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 288)));
#pragma GCC unroll 8
        for (int r = 0; r < MB; r++) {
            y[r] = _mm512_fmadd_ps(acc[r][0], dv, y[r]);
            y[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xsum[r * groups + g]), y[r]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MB; r++) _mm512_storeu_ps(out + r * TILE_N, y[r]);
}
#endif

/* y [M, N] (row stride ldy) = x [M, K] (row stride ldx) @ W.T + bias (bias may be NULL).
 * Returns 0, -1 when built without AVX512-BF16 or K is not a multiple of 32, -2 when out
 * of memory. */
int splitserve_q4_gemm_bf16(const uint16_t *x, int64_t ldx, int64_t M, const uint8_t *wp,
                            int64_t N, int64_t K, const uint16_t *bias, uint16_t *y,
                            int64_t ldy, int num_threads) {
#if defined(__AVX512BF16__)
    if (K % GROUP) return -1;
    const int64_t tiles = (N + TILE_N - 1) / TILE_N, groups = K / GROUP;
    float xsum_stack[MAX_ROWS * 64];
    float *xsum = M * groups <= MAX_ROWS * 64 ? xsum_stack
                                               : (float *)malloc(sizeof(float) * M * groups);
    if (!xsum) return -2;
    for (int64_t r = 0; r < M; r++)
        for (int64_t g = 0; g < groups; g++) {
            __m512 a = _mm512_add_ps(load_bf16x16(x + r * ldx + g * GROUP),
                                     load_bf16x16(x + r * ldx + g * GROUP + 16));
            xsum[r * groups + g] = _mm512_reduce_add_ps(a);
        }
    /* Rows in balanced groups of at most MAX_ROWS (12 rows run as 6 + 6, not 8 + 4). */
    const int64_t rgroups = (M + MAX_ROWS - 1) / MAX_ROWS;
    const int64_t per = rgroups ? (M + rgroups - 1) / rgroups : 0;
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1 && tiles > 1) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        float acc[MAX_ROWS * TILE_N];
        const uint8_t *w = wp + t * groups * TILE_GROUP_BYTES;
        const int64_t n0 = t * TILE_N, nn = N - n0 < TILE_N ? N - n0 : TILE_N;
        for (int64_t m0 = 0; m0 < M; m0 += per) {
            const int mb = (int)(M - m0 < per ? M - m0 : per);
            const uint16_t *xs = x + m0 * ldx;
            const float *ss = xsum + m0 * groups;
            switch (mb) {
            case 1: tile_rows(xs, ldx, ss, w, groups, acc, 1); break;
            case 2: tile_rows(xs, ldx, ss, w, groups, acc, 2); break;
            case 3: tile_rows(xs, ldx, ss, w, groups, acc, 3); break;
            case 4: tile_rows(xs, ldx, ss, w, groups, acc, 4); break;
            case 5: tile_rows(xs, ldx, ss, w, groups, acc, 5); break;
            case 6: tile_rows(xs, ldx, ss, w, groups, acc, 6); break;
            case 7: tile_rows(xs, ldx, ss, w, groups, acc, 7); break;
            default: tile_rows(xs, ldx, ss, w, groups, acc, 8); break;
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
#else
    (void)x; (void)ldx; (void)M; (void)wp; (void)N; (void)K; (void)bias; (void)y; (void)ldy;
    (void)num_threads;
    return -1;
#endif
}
