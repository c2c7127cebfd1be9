/* Elementwise pieces of a Llama-family layer in bfloat16, one call each instead of several
 * torch ops (at decode, eager dispatch of ~40 small ops a layer costs about as much as the
 * arithmetic). Each rounds to bfloat16 where the torch code it replaces does, so the
 * results equal that code's up to float32 summation order (the RMS statistic).
 * Built and loaded by engine/native.py.
 */
#include <math.h>
#include <stdint.h>

#include "bf16.h"

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
            for (int i = 0; i < half; i++) {
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
        for (int64_t i = 0; i < I; i++) {
            const float x = bf16_to_f32(g[i]);
            const float act = bf16_to_f32(f32_to_bf16(x / (1.f + expf(-x))));
            o[i] = f32_to_bf16(act * bf16_to_f32(u[i]));
        }
    }
}
