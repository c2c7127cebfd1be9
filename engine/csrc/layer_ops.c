/* Elementwise pieces of a Llama-family layer in bfloat16 and in float32, one call each
 * instead of several torch ops (at decode, eager dispatch of ~40 small ops a layer costs
 * about as much as the arithmetic). The bfloat16 ones round to bfloat16 where the torch
 * code they replace does, so the results equal that code's up to float32 summation order
 * (the RMS statistic); the float32 ones round each product and sum where torch does
 * (no fused multiply-adds: see the pragma below), but for the RMS sum's order and SiLU's
 * exponential (its own polynomial). Built and loaded by engine/native.py.
 */
#include <math.h>
#include <stdint.h>

#include "bf16.h"
#include "simd.h"

/* Rows are split over threads only when there is enough work to pay for it. */
#define PAR_MIN_ELEMS 65536

/* If delta: h += delta (rounded to bf16, as `h + delta`). Then
 * out = weight * bf16(h * rsqrt(mean(h^2) + eps)), statistics in float32 (HF's RMSNorm).
 * h, delta, out: [T, H] contiguous; weight: [H]. */
void splitserve_add_rms_norm_bf16(uint16_t *h, const uint16_t *delta, const uint16_t *weight,
                                  uint16_t *out, int64_t T, int64_t H, float eps,
                                  int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1 && T * H >= PAR_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++) {
        uint16_t *row = h + t * H;
        float ss = 0.f;
#if defined(__AVX512BF16__)
        if (H % 16 == 0) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t i = 0; i < H; i += 16) {
                __m512 v = load_bf16x16(row + i);
                if (delta) {
                    v = round_bf16x16(_mm512_add_ps(v, load_bf16x16(delta + t * H + i)));
                    store_bf16x16(row + i, v);
                }
                acc = _mm512_fmadd_ps(v, v, acc);
            }
            const __m512 r = _mm512_set1_ps(1.f / sqrtf(_mm512_reduce_add_ps(acc) / (float)H + eps));
            for (int64_t i = 0; i < H; i += 16) {
                __m512 n = round_bf16x16(_mm512_mul_ps(load_bf16x16(row + i), r));
                store_bf16x16(out + t * H + i, _mm512_mul_ps(load_bf16x16(weight + i), n));
            }
            continue;
        }
#endif
        if (delta) {
            const uint16_t *d = delta + t * H;
            for (int64_t i = 0; i < H; i++) {
                row[i] = f32_to_bf16(bf16_to_f32(row[i]) + bf16_to_f32(d[i]));
                float v = bf16_to_f32(row[i]);
                ss += v * v;
            }
        } else {
            for (int64_t i = 0; i < H; i++) {
                float v = bf16_to_f32(row[i]);
                ss += v * v;
            }
        }
        const float r = 1.f / sqrtf(ss / (float)H + eps);
        uint16_t *o = out + t * H;
        for (int64_t i = 0; i < H; i++) {
            float n = bf16_to_f32(f32_to_bf16(bf16_to_f32(row[i]) * r));
            o[i] = f32_to_bf16(bf16_to_f32(weight[i]) * n);
        }
    }
}

/* HF's rotate-half RoPE in place on the first `heads` heads of each row of x (row stride
 * x_stride elements, heads of d contiguous): x = bf16(bf16(x * cos) + bf16(rot(x) * sin)),
 * rot(x) = (-x2, x1). cos, sin: [positions, d] bf16 tables; positions: [T] int64. */
void splitserve_rope_bf16(uint16_t *x, int64_t T, int64_t x_stride, int heads, int d,
                          const int64_t *positions, const uint16_t *cos, const uint16_t *sin,
                          int num_threads) {
    const int half = d / 2;
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1 && T * heads * d >= PAR_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++) {
        const uint16_t *c = cos + positions[t] * d, *s = sin + positions[t] * d;
        for (int hd = 0; hd < heads; hd++) {
            uint16_t *v = x + t * x_stride + (int64_t)hd * d;
            int i = 0;
#if defined(__AVX512BF16__)
            for (; i + 16 <= half; i += 16) {
                const __m512 x1 = load_bf16x16(v + i), x2 = load_bf16x16(v + i + half);
                const __m512 a1 = round_bf16x16(_mm512_mul_ps(x1, load_bf16x16(c + i)));
                const __m512 b1 = round_bf16x16(
                    _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2), load_bf16x16(s + i)));
                const __m512 a2 = round_bf16x16(_mm512_mul_ps(x2, load_bf16x16(c + i + half)));
                const __m512 b2 = round_bf16x16(_mm512_mul_ps(x1, load_bf16x16(s + i + half)));
                store_bf16x16(v + i, _mm512_add_ps(a1, b1));
                store_bf16x16(v + i + half, _mm512_add_ps(a2, b2));
            }
#endif
            for (; i < half; i++) {
                const float x1 = bf16_to_f32(v[i]), x2 = bf16_to_f32(v[i + half]);
                const float a1 = bf16_to_f32(f32_to_bf16(x1 * bf16_to_f32(c[i])));
                const float b1 = bf16_to_f32(f32_to_bf16(-x2 * bf16_to_f32(s[i])));
                const float a2 = bf16_to_f32(f32_to_bf16(x2 * bf16_to_f32(c[i + half])));
                const float b2 = bf16_to_f32(f32_to_bf16(x1 * bf16_to_f32(s[i + half])));
                v[i] = f32_to_bf16(a1 + b1);
                v[i + half] = f32_to_bf16(a2 + b2);
            }
        }
    }
}

/* out = bf16(bf16(silu(gate)) * up), gate and up the two halves of each row of gu [T, 2I]. */
void splitserve_silu_mul_bf16(const uint16_t *gu, uint16_t *out, int64_t T, int64_t I,
                              int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1 && T * I >= PAR_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++) {
        const uint16_t *g = gu + t * 2 * I, *u = g + I;
        uint16_t *o = out + t * I;
        int64_t i = 0;
#if defined(__AVX512BF16__)
        for (; i + 16 <= I; i += 16) {
            const __m512 x = load_bf16x16(g + i);
            const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), x));
            const __m512 act = round_bf16x16(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), e)));
            store_bf16x16(o + i, _mm512_mul_ps(act, load_bf16x16(u + i)));
        }
#endif
        for (; i < I; i++) {
            const float x = bf16_to_f32(g[i]);
            const float act = bf16_to_f32(f32_to_bf16(x / (1.f + expf(-x))));
            o[i] = f32_to_bf16(act * bf16_to_f32(u[i]));
        }
    }
}

SPLITSERVE_BF16_PROBE(layer_ops)

/* ---- float32 ------------------------------------------------------------------------- */

/* GCC fuses a vector multiply and the add after it into one FMA (one rounding instead of
 * torch's two) unless told not to. */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

/* As splitserve_add_rms_norm_bf16 in float32: h += delta; out = weight * (h * r),
 * r = 1 / sqrt(mean(h^2) + eps) (the torch code's order of multiplies). */
void splitserve_add_rms_norm_f32(float *h, const float *delta, const float *weight, float *out,
                                 int64_t T, int64_t H, float eps, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1 && T * H >= PAR_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++) {
        float *row = h + t * H, *o = out + t * H;
        const float *d = delta ? delta + t * H : 0;
        int64_t i = 0;
        float ss = 0.f;
#if SPLITSERVE_F32_SIMD
        __m256 acc = _mm256_setzero_ps();
        for (; i + 8 <= H; i += 8) {
            __m256 v = _mm256_loadu_ps(row + i);
            if (d) {
                v = _mm256_add_ps(v, _mm256_loadu_ps(d + i));
                _mm256_storeu_ps(row + i, v);
            }
            acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
        }
        ss = hsum8_ps(acc);
#endif
        for (; i < H; i++) {
            if (d) row[i] += d[i];
            ss += row[i] * row[i];
        }
        const float r = 1.f / sqrtf(ss / (float)H + eps);
        i = 0;
#if SPLITSERVE_F32_SIMD
        const __m256 vr = _mm256_set1_ps(r);
        for (; i + 8 <= H; i += 8)
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_loadu_ps(weight + i),
                                                  _mm256_mul_ps(_mm256_loadu_ps(row + i), vr)));
#endif
        for (; i < H; i++) o[i] = weight[i] * (row[i] * r);
    }
}

/* As splitserve_rope_bf16 in float32: x = x * cos + rot(x) * sin, each product rounded. */
void splitserve_rope_f32(float *x, int64_t T, int64_t x_stride, int heads, int d,
                         const int64_t *positions, const float *cos, const float *sin,
                         int num_threads) {
    const int half = d / 2;
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1 && T * heads * d >= PAR_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos + positions[t] * d, *s = sin + positions[t] * d;
        for (int hd = 0; hd < heads; hd++) {
            float *v = x + t * x_stride + (int64_t)hd * d;
            int i = 0;
#if SPLITSERVE_F32_SIMD
            for (; i + 8 <= half; i += 8) {
                const __m256 x1 = _mm256_loadu_ps(v + i), x2 = _mm256_loadu_ps(v + i + half);
                const __m256 nx2 = _mm256_sub_ps(_mm256_setzero_ps(), x2);
                _mm256_storeu_ps(v + i, _mm256_add_ps(_mm256_mul_ps(x1, _mm256_loadu_ps(c + i)),
                                                      _mm256_mul_ps(nx2, _mm256_loadu_ps(s + i))));
                _mm256_storeu_ps(v + i + half,
                                 _mm256_add_ps(_mm256_mul_ps(x2, _mm256_loadu_ps(c + i + half)),
                                               _mm256_mul_ps(x1, _mm256_loadu_ps(s + i + half))));
            }
#endif
            for (; i < half; i++) {
                const float x1 = v[i], x2 = v[i + half];
                v[i] = x1 * c[i] + -x2 * s[i];
                v[i + half] = x2 * c[i + half] + x1 * s[i + half];
            }
        }
    }
}

/* out = silu(gate) * up in float32, gate and up the two halves of each row of gu [T, 2I]. */
void splitserve_silu_mul_f32(const float *gu, float *out, int64_t T, int64_t I,
                             int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1 && T * I >= PAR_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++) {
        const float *g = gu + t * 2 * I, *u = g + I;
        float *o = out + t * I;
        int64_t i = 0;
#if SPLITSERVE_F32_SIMD
        for (; i + 8 <= I; i += 8) {
            const __m256 x = _mm256_loadu_ps(g + i);
            const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), x));
            const __m256 act = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), e));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(act, _mm256_loadu_ps(u + i)));
        }
#endif
        for (; i < I; i++) o[i] = g[i] / (1.f + expf(-g[i])) * u[i];
    }
}

#pragma GCC pop_options

SPLITSERVE_F32_PROBE(layer_ops)
