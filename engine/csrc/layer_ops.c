/* Elementwise pieces of a Llama-family layer in bfloat16, one call each instead of several
 * torch ops (at decode, eager dispatch of ~40 small ops a layer costs about as much as the
 * arithmetic). Each rounds to bfloat16 where the torch code it replaces does, so the
 * results equal that code's up to float32 summation order (the RMS statistic).
 * Built and loaded by engine/native.py.
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
