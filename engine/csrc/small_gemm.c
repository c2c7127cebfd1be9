/* y = x @ W.T (+ bias) for bfloat16 x [M, K] and W [N, K], float32 accumulation, bfloat16
 * output rounded once (as oneDNN's bf16 linear does). Built and loaded by engine/native.py.
 *
 * W is packed once at load into [ceil(N / 64)][K / 2][64][2]: for each tile of 64 output
 * columns, the 64 columns' (k, k + 1) pairs side by side, so one 512-bit load feeds an
 * AVX512-BF16 dot-product instruction for 16 columns and no horizontal sums are needed.
 * A tile's weights are read once per group of up to 6 rows of x (the 6 x 4 accumulators
 * stay in registers), in one sequential stream over the packed matrix. Tiles are split
 * over OpenMP threads. On a Zen 4 core this reads SmolLM2's bf16 weights at ~22 GB/s for
 * 1-6 rows, where oneDNN's packed linear reached ~12.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "bf16.h"
#include "simd.h"

#define TILE_N 64
#define MAX_ROWS 6

SPLITSERVE_BF16_PROBE(small_gemm)

/* out: ceil(N / 64) * 64 * K bf16; rows past N are zero. K must be even. */
void splitserve_pack_bf16(const uint16_t *w, uint16_t *out, int64_t N, int64_t K) {
    const int64_t tiles = (N + TILE_N - 1) / TILE_N, pairs = K / 2;
    for (int64_t nt = 0; nt < tiles; nt++)
        for (int64_t kp = 0; kp < pairs; kp++)
            for (int n = 0; n < TILE_N; n++) {
                uint16_t *o = out + ((nt * pairs + kp) * TILE_N + n) * 2;
                int64_t row = nt * TILE_N + n;
                o[0] = row < N ? w[row * K + 2 * kp] : 0;
                o[1] = row < N ? w[row * K + 2 * kp + 1] : 0;
            }
}

#if defined(__AVX512BF16__)
/* acc (MB rows x 64 columns, float32) = x[MB rows] @ one packed tile. */
static inline __attribute__((always_inline)) void tile_rows(const uint16_t *x, int64_t ldx,
                                                            const uint16_t *wp, int64_t pairs,
                                                            float *acc_out, const int MB) {
    __m512 acc[MAX_ROWS][4];
#pragma GCC unroll 6
    for (int m = 0; m < MB; m++)
        for (int c = 0; c < 4; c++) acc[m][c] = _mm512_setzero_ps();
    for (int64_t kp = 0; kp < pairs; kp++) {
        const uint16_t *w = wp + kp * 2 * TILE_N;
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(w), w1 = (__m512bh)_mm512_loadu_si512(w + 32),
                 w2 = (__m512bh)_mm512_loadu_si512(w + 64), w3 = (__m512bh)_mm512_loadu_si512(w + 96);
#pragma GCC unroll 6
        for (int m = 0; m < MB; m++) {
            int32_t pair;
            memcpy(&pair, x + m * ldx + 2 * kp, sizeof pair);
            __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, xb);
            acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, xb);
            acc[m][2] = _mm512_dpbf16_ps(acc[m][2], w2, xb);
            acc[m][3] = _mm512_dpbf16_ps(acc[m][3], w3, xb);
        }
    }
#pragma GCC unroll 6
    for (int m = 0; m < MB; m++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(acc_out + m * TILE_N + c * 16, acc[m][c]);
}
#endif

/* y [M, N] (row stride ldy) = x [M, K] (row stride ldx) @ W.T + bias (bias may be NULL).
 * Returns 0, or -1 when the kernel was built without AVX512-BF16 or K is odd. */
int splitserve_small_gemm_bf16(const uint16_t *x, int64_t ldx, int64_t M, const uint16_t *wp,
                               int64_t N, int64_t K, const uint16_t *bias, uint16_t *y,
                               int64_t ldy, int num_threads) {
#if defined(__AVX512BF16__)
    if (K % 2) return -1;
    const int64_t tiles = (N + TILE_N - 1) / TILE_N, pairs = K / 2;
    /* Rows in balanced groups of at most MAX_ROWS (8 rows run as 4 + 4, not 6 + 2). */
    const int64_t groups = (M + MAX_ROWS - 1) / MAX_ROWS;
    const int64_t per = groups ? (M + groups - 1) / groups : 0;
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1 && tiles > 1) schedule(static)
    for (int64_t nt = 0; nt < tiles; nt++) {
        float acc[MAX_ROWS * TILE_N];
        const uint16_t *w = wp + nt * pairs * 2 * TILE_N;
        const int64_t n0 = nt * TILE_N, nn = N - n0 < TILE_N ? N - n0 : TILE_N;
        for (int64_t m0 = 0; m0 < M; m0 += per) {
            const int mb = (int)(M - m0 < per ? M - m0 : per);
            const uint16_t *xs = x + m0 * ldx;
            switch (mb) {
            case 1: tile_rows(xs, ldx, w, pairs, acc, 1); break;
            case 2: tile_rows(xs, ldx, w, pairs, acc, 2); break;
            case 3: tile_rows(xs, ldx, w, pairs, acc, 3); break;
            case 4: tile_rows(xs, ldx, w, pairs, acc, 4); break;
            case 5: tile_rows(xs, ldx, w, pairs, acc, 5); break;
            default: tile_rows(xs, ldx, w, pairs, acc, 6); break;
            }
            for (int m = 0; m < mb; m++)
                for (int64_t n = 0; n < nn; n++) {
                    float v = acc[m * TILE_N + n] + (bias ? bf16_to_f32(bias[n0 + n]) : 0.f);
                    y[(m0 + m) * ldy + n0 + n] = f32_to_bf16(v);
                }
        }
    }
    return 0;
#else
    (void)x; (void)ldx; (void)M; (void)wp; (void)N; (void)K; (void)bias; (void)y; (void)ldy;
    (void)num_threads;
    return -1;
#endif
}
