/* y = x @ W.T (+ bias) for float32 x [M, K] and a GGUF Q4_1 or Q8_0 weight W [N, K] kept
 * quantized, float32 throughout: the float32 engine's decode GEMMs on CPUs with AVX2, FMA
 * and F16C (every x86-64 CPU of the last decade, AVX2-only ones such as AMD Zen 3
 * included). The bfloat16 kernel (quant_gemm.c) needs AVX512-BF16. Built and loaded by
 * engine/native.py.
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
 *   Q4_1 (160 bytes): 32 little-endian 32-bit words, word k holding q[row r][k] in bits
 *     4r..4r+3; then 8 fp16 d and 8 fp16 m;
 *   Q8_0 (272 bytes): 32 x 8 int8, q[row r][k] at byte 8k + r; then 8 fp16 d.
 * One AVX2 vector holds the tile's 8 outputs: for each input k, the 8 weights are converted
 * once and multiplied into every row of x (up to MB_MAX at a time; more re-read the tile
 * from L1). Tiles are split over OpenMP threads.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define QG32_SIMD 1
#else
#define QG32_SIMD 0
#endif

#define TILE_N 8
#define GROUP 32
#define Q4_BYTES 160
#define Q8_BYTES 272
#define MB_MAX 4

int splitserve_quant_gemm_f32_available(void) { return QG32_SIMD; }

/* q: [N, K] uint8 (0..15), d, m: [N, K / 32] fp16 bits → out: ceil(N / 8) * (K / 32) * 160
 * bytes. Rows past N get q = d = m = 0. K must be a multiple of 32. */
void splitserve_pack_q4_1_f32(const uint8_t *q, const uint16_t *d, const uint16_t *m,
                              uint8_t *out, int64_t N, int64_t K) {
    const int64_t tiles = (N + TILE_N - 1) / TILE_N, groups = K / GROUP;
    for (int64_t t = 0; t < tiles; t++)
        for (int64_t g = 0; g < groups; g++) {
            uint8_t *blk = out + (t * groups + g) * Q4_BYTES;
            memset(blk, 0, Q4_BYTES);
            for (int k = 0; k < GROUP; k++) {
                uint32_t word = 0;
                for (int r = 0; r < TILE_N; r++) {
                    const int64_t row = t * TILE_N + r;
                    if (row < N) word |= (uint32_t)(q[row * K + g * GROUP + k] & 0xF) << (4 * r);
                }
                memcpy(blk + 4 * k, &word, 4);
            }
            uint16_t dm[2 * TILE_N] = {0};
            for (int r = 0; r < TILE_N; r++) {
                const int64_t row = t * TILE_N + r;
                if (row >= N) continue;
                dm[r] = d[row * groups + g];
                dm[TILE_N + r] = m[row * groups + g];
            }
            memcpy(blk + 128, dm, sizeof dm);
        }
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
/* acc[r] (8 outputs, float32) = x[r] @ one packed tile, for MB rows of x. */
static inline __attribute__((always_inline)) void tile_rows(
    const float *x, int64_t ldx, const float *xsum, const uint8_t *tp, int64_t groups,
    __m256 *acc, const int MB, const int Q8) {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i low4 = _mm256_set1_epi32(0xF);
    /* C independent sums per row (inputs k, k + C, ...): one FMA chain would wait on its
     * own latency every input; 8 chains in all keep both FMA pipes busy. */
    const int C = MB == 1 ? 8 : MB == 2 ? 4 : 2;
    __m256 a[MB_MAX];
    for (int r = 0; r < MB; r++) a[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *blk = tp + g * (Q8 ? Q8_BYTES : Q4_BYTES);
        __m256 s[8];
        for (int i = 0; i < MB * C; i++) s[i] = _mm256_setzero_ps();
#pragma GCC unroll 32
        for (int k = 0; k < GROUP; k++) {
            __m256 w;
            if (Q8) {
                w = _mm256_cvtepi32_ps(
                    _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 8 * k))));
            } else {
                int32_t word;
                memcpy(&word, blk + 4 * k, 4);
                w = _mm256_cvtepi32_ps(_mm256_and_si256(
                    _mm256_srlv_epi32(_mm256_set1_epi32(word), shifts), low4));
            }
            for (int r = 0; r < MB; r++)
                s[r * C + k % C] = _mm256_fmadd_ps(
                    _mm256_broadcast_ss(x + r * ldx + g * GROUP + k), w, s[r * C + k % C]);
        }
        for (int r = 0; r < MB; r++)
            for (int i = 1; i < C; i++) s[r * C] = _mm256_add_ps(s[r * C], s[r * C + i]);
        const uint8_t *scales = blk + (Q8 ? 256 : 128);
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)scales));
        for (int r = 0; r < MB; r++) a[r] = _mm256_fmadd_ps(s[r * C], d, a[r]);
        if (!Q8) {
            const __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + 16)));
            for (int r = 0; r < MB; r++)
                a[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(xsum + r * groups + g), mn, a[r]);
        }
    }
    for (int r = 0; r < MB; r++) acc[r] = a[r];
}

#define TILE_CASES(Q8)                                                   \
    switch (mb) {                                                        \
    case 1: tile_rows(xs, ldx, ss, w, groups, acc, 1, Q8); break;        \
    case 2: tile_rows(xs, ldx, ss, w, groups, acc, 2, Q8); break;        \
    case 3: tile_rows(xs, ldx, ss, w, groups, acc, 3, Q8); break;        \
    default: tile_rows(xs, ldx, ss, w, groups, acc, 4, Q8); break;       \
    }

static int quant_gemm_f32(const float *x, int64_t ldx, int64_t M, const uint8_t *wp,
                          int64_t N, int64_t K, const float *bias, float *y, int64_t ldy,
                          int num_threads, const int q8) {
    if (K % GROUP) return -1;
    const int64_t tiles = (N + TILE_N - 1) / TILE_N, groups = K / GROUP;
    const int64_t bytes = q8 ? Q8_BYTES : Q4_BYTES;
    float *xsum = NULL;
    if (!q8) {
        xsum = (float *)malloc(sizeof(float) * (M * groups + 1));
        if (!xsum) return -2;
        for (int64_t r = 0; r < M; r++)
            for (int64_t g = 0; g < groups; g++) {
                const float *p = x + r * ldx + g * GROUP;
                __m256 v = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)),
                                         _mm256_add_ps(_mm256_loadu_ps(p + 16), _mm256_loadu_ps(p + 24)));
                __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                h = _mm_add_ps(h, _mm_movehl_ps(h, h));
                h = _mm_add_ss(h, _mm_movehdup_ps(h));
                xsum[r * groups + g] = _mm_cvtss_f32(h);
            }
    }
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1 && tiles > 1) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        __m256 acc[MB_MAX];
        float out[TILE_N];
        const uint8_t *w = wp + t * groups * bytes;
        const int64_t n0 = t * TILE_N, nn = N - n0 < TILE_N ? N - n0 : TILE_N;
        for (int64_t m0 = 0; m0 < M; m0 += MB_MAX) {
            const int mb = (int)(M - m0 < MB_MAX ? M - m0 : MB_MAX);
            const float *xs = x + m0 * ldx;
            const float *ss = q8 ? NULL : xsum + m0 * groups;
            if (q8) {
                TILE_CASES(1)
            } else {
                TILE_CASES(0)
            }
            for (int r = 0; r < mb; r++) {
                float *yr = y + (m0 + r) * ldy + n0;
                if (nn == TILE_N && !bias) {
                    _mm256_storeu_ps(yr, acc[r]);
                    continue;
                }
                _mm256_storeu_ps(out, acc[r]);
                for (int64_t n = 0; n < nn; n++) yr[n] = out[n] + (bias ? bias[n0 + n] : 0.f);
            }
        }
    }
    free(xsum);
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
