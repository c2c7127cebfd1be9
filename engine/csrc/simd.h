/* AVX-512 and AVX2 helpers for the engine's C kernels (each guarded: the kernels keep
 * scalar paths). */
#ifndef SPLITSERVE_SIMD_H
#define SPLITSERVE_SIMD_H

#include <stdint.h>

#if defined(__AVX512F__)
#include <immintrin.h>

/* e^x (float32, ~1e-7 relative; x clamped at -87 below, inf past 88): 2^n * e^r with |r| <= ln2/2,
 * degree-6 Taylor. */
static inline __m512 exp_avx512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* 16 bf16 → 16 float32 (exact). */
static inline __m512 load_bf16x16(const uint16_t *p) {
    __m256i raw = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
#endif

#if defined(__AVX512BF16__)
/* 16 float32 → 16 bf16, rounded to nearest even (VCVTNEPS2BF16). */
static inline void store_bf16x16(uint16_t *p, __m512 v) {
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v));
}

static inline __m512 round_bf16x16(__m512 v) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
/* The float32 paths of the kernels (AVX2 + FMA, and F16C for a float8 cache: every x86-64
 * CPU since ~2013). */
#define SPLITSERVE_F32_SIMD 1

/* e^x as exp_avx512, 8 lanes (x clamped to [-87, 88]; 2^n built in the exponent bits). */
static inline __m256 exp_avx2(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
    __m256 p = _mm256_set1_ps(1.f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline float hsum8_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float hmax8_ps(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

/* The float32 quantized GEMMs' output: acc[r] (outputs n0..n0+7 of row row0 + r, for r <
 * mrows) into y [.., ldy], its first nn (<= 8) columns, plus bias[n0..] when given. */
static inline void store_rows8_f32(float *y, int64_t ldy, int64_t row0, int64_t n0,
                                   int64_t nn, const __m256 *acc, int mrows,
                                   const float *bias) {
    for (int r = 0; r < mrows; r++) {
        float *yr = y + (row0 + r) * ldy + n0;
        if (nn == 8 && !bias) {
            _mm256_storeu_ps(yr, acc[r]);
            continue;
        }
        float out[8];
        _mm256_storeu_ps(out, acc[r]);
        for (int64_t n = 0; n < nn; n++) yr[n] = out[n] + (bias ? bias[n0 + n] : 0.f);
    }
}

/* 8 float32 → 8 bfloat16, rounded to nearest even as torch rounds (a NaN stays a NaN;
 * VCVTNEPS2BF16, where the CPU has it, also flushes subnormals to zero, as the bfloat16
 * kernels' store_bf16x16 does). */
static inline __m128i f32x8_to_bf16(__m256 v) {
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
    return (__m128i)_mm256_cvtneps_pbh(v);
#else
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);
    r = _mm256_srli_epi32(r, 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
#endif
}

/* store_rows8_f32 for a bfloat16 y: each output (plus its float32 bias) rounded once. */
static inline void store_rows8_bf16(uint16_t *y, int64_t ldy, int64_t row0, int64_t n0,
                                    int64_t nn, const __m256 *acc, int mrows,
                                    const float *bias) {
    __m256 b = _mm256_setzero_ps();
    if (bias) {
        float bb[8] = {0};
        for (int64_t n = 0; n < nn; n++) bb[n] = bias[n0 + n];
        b = _mm256_loadu_ps(bb);
    }
    for (int r = 0; r < mrows; r++) {
        uint16_t *yr = y + (row0 + r) * ldy + n0;
        const __m128i h = f32x8_to_bf16(_mm256_add_ps(acc[r], b));
        if (nn == 8) {
            _mm_storeu_si128((__m128i *)yr, h);
            continue;
        }
        uint16_t out[8];
        _mm_storeu_si128((__m128i *)out, h);
        for (int64_t n = 0; n < nn; n++) yr[n] = out[n];
    }
}

/* What fills a chunk of at most 32 rows' accumulators for one or two (nt) adjacent tiles of
 * 8 outputs, from their packed weights tp0 and tp1 (tp1 == tp0 for one tile): the float32
 * and the w4a8 GEMMs (quant_gemm_f32.c, quant_gemm_a8.c). */
typedef void (*tile_rows_fn)(const void *ctx, int64_t m0, const uint8_t *tp0,
                             const uint8_t *tp1, __m256 *acc0, __m256 *acc1, int mrows, int nt);

/* One pair of adjacent tiles (the last tile alone when their count is odd) of
 * gemm_tile_pairs, every row, in chunks of 32 rows filled by `rows`; streamed (see below)
 * when `stream`. */
static inline void tile_pair(int64_t pr, int64_t M, int64_t N, int64_t groups,
                             int64_t group_bytes, const uint8_t *wp, const float *bias, void *yv,
                             int ybf16, int64_t ldy, int stream, tile_rows_fn rows,
                             const void *ctx) {
    float *y = (float *)yv;
    const int64_t tiles = (N + 7) / 8, t0 = 2 * pr;
    const int nt = t0 + 1 < tiles ? 2 : 1;
    const uint8_t *w0 = wp + t0 * groups * group_bytes;
    __m256 acc[2][32];
    for (int64_t m0 = 0; m0 < M; m0 += 32) {
        const int mrows = (int)(M - m0 < 32 ? M - m0 : 32);
        if (!stream) /* the chunk's output lines, for writing, while its sums are computed
                      * (a bfloat16 y's rows wait on reading them in otherwise: ~5 % of a
                      * w4a8 prefill) */
            for (int r = 0; r < mrows; r++)
                __builtin_prefetch((const char *)yv + ((m0 + r) * ldy + t0 * 8) * (ybf16 ? 2 : 4),
                                   1, 3);
        rows(ctx, m0, w0, w0 + (nt - 1) * groups * group_bytes, acc[0], acc[1], mrows, nt);
        if (ybf16) {
            for (int t = 0; t < nt; t++) {
                const int64_t n0 = (t0 + t) * 8;
                store_rows8_bf16((uint16_t *)yv, ldy, m0, n0, N - n0 < 8 ? N - n0 : 8, acc[t],
                                 mrows, bias);
            }
            continue;
        }
        float *y0 = y + m0 * ldy + t0 * 8;
        if (stream && nt == 2 && t0 * 8 + 16 <= N && ((uintptr_t)y0 & 63) == 0) {
            for (int r = 0; r < mrows; r++) { /* the pair's 16 outputs: one cache line */
                _mm256_stream_ps(y0 + r * ldy, acc[0][r]);
                _mm256_stream_ps(y0 + r * ldy + 8, acc[1][r]);
            }
            continue;
        }
        for (int t = 0; t < nt; t++) {
            const int64_t n0 = (t0 + t) * 8;
            store_rows8_f32(y, ldy, m0, n0, N - n0 < 8 ? N - n0 : 8, acc[t], mrows, bias);
        }
    }
}

/* y [M, N] (+ bias) of the float32 quantized GEMMs (bfloat16 y when `ybf16`): tiles of 8
 * outputs, each `group_bytes` a group for `groups` groups, taken two adjacent tiles at a
 * time (so two tiles share each load of x) and split over OpenMP threads.
 * Prefill-sized calls (256 rows or more) hand the pairs out 2 at a time, so a thread the
 * host slows takes fewer (w4a8 prefill of SmolLM2 5-10 % faster than an even share each,
 * alternating in one process on an AVX2 EPYC), and an output of 4 MB or more is written
 * with streaming stores: a normal store reads each line first, and these lines leave the
 * caches before anything reads them (~3.5 % more). Smaller calls (decode: tens of
 * microseconds each, ~120 a step) keep one even share a thread and one barrier. */
static inline void gemm_tile_pairs(int64_t M, int64_t N, int64_t groups, int64_t group_bytes,
                                   const uint8_t *wp, const float *bias, void *y, int ybf16,
                                   int64_t ldy, int num_threads, tile_rows_fn rows,
                                   const void *ctx) {
    const int64_t pairs = ((N + 7) / 8 + 1) / 2;
    if (M < 256) {
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1 && pairs > 1) schedule(static)
        for (int64_t pr = 0; pr < pairs; pr++)
            tile_pair(pr, M, N, groups, group_bytes, wp, bias, y, ybf16, ldy, 0, rows, ctx);
        return;
    }
    const int stream = !ybf16 && !bias && M * N >= (1 << 20) && ldy % 16 == 0;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && pairs > 1)
    {
#pragma omp for schedule(dynamic, 2) nowait
        for (int64_t pr = 0; pr < pairs; pr++)
            tile_pair(pr, M, N, groups, group_bytes, wp, bias, y, ybf16, ldy, stream, rows, ctx);
        if (stream) _mm_sfence(); /* this thread's streamed lines, visible past the barrier */
    }
}
#else
#define SPLITSERVE_F32_SIMD 0
#endif

/* int splitserve_<name>_available(void): 1 when the library was built with AVX512-BF16.
 * Without it the scalar paths lose to torch's vectorised ops, and engine/native.py does not
 * use the library. */
#if defined(__AVX512BF16__)
#define SPLITSERVE_BF16_PROBE(name) \
    int splitserve_##name##_available(void) { return 1; }
#else
#define SPLITSERVE_BF16_PROBE(name) \
    int splitserve_##name##_available(void) { return 0; }
#endif

/* int splitserve_<name>_f32_available(void): 1 when the library's float32 paths were built
 * with AVX2 and FMA (engine/native.py uses them only then). */
#define SPLITSERVE_F32_PROBE(name) \
    int splitserve_##name##_f32_available(void) { return SPLITSERVE_F32_SIMD; }

#endif
