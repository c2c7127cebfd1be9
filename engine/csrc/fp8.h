/* float8 e4m3 (`torch.float8_e4m3fn`: 1 sign, 4 exponent bits biased by 7, 3 mantissa bits,
 * no infinities, 0x7F / 0xFF NaN, largest finite 448) <-> float32 for the engine's C
 * kernels: the `--kv-cache-dtype fp8` cache, no scale (a cached value is the value). */
#ifndef SPLITSERVE_FP8_H
#define SPLITSERVE_FP8_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#define FP8_E4M3_MAX 448.f

static inline float fp8_e4m3_to_f32(uint8_t x) {
    const int e = (x >> 3) & 15, m = x & 7;
    const float mag = e ? ldexpf((float)(8 + m), e - 10) : ldexpf((float)m, -9);
    if (e == 15 && m == 7) return NAN;
    return x & 0x80 ? -mag : mag;
}

/* Round to nearest even after clamping to +-448 (the cache saturates, infinities
 * included), bit for bit what engine/kv_dtype.py's to_cache_dtype gives
 * (`x.clamp(-448, 448).to(torch.float8_e4m3fn)`; the rounding is c10's
 * fp8e4m3fn_from_fp32_value); NaN stays NaN. */
static inline uint8_t f32_to_fp8_e4m3(float f) {
    if (f > FP8_E4M3_MAX) f = FP8_E4M3_MAX;
    if (f < -FP8_E4M3_MAX) f = -FP8_E4M3_MAX;
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t sign = u & 0x80000000u;
    u ^= sign;
    uint8_t r;
    if (u > 0x7f800000u) {
        r = 0x7f;
    } else if (u < (121u << 23)) { /* below 2^-6: a subnormal or zero, rounded by an add */
        const uint32_t denorm = 141u << 23;
        float a, b;
        memcpy(&a, &u, sizeof a);
        memcpy(&b, &denorm, sizeof b);
        a += b;
        memcpy(&u, &a, sizeof u);
        r = (uint8_t)(u - denorm);
    } else {
        const uint32_t odd = (u >> 20) & 1u;
        u += ((uint32_t)(7 - 127) << 23) + 0x7ffffu + odd;
        r = (uint8_t)(u >> 20);
    }
    return (uint8_t)(r | (sign >> 24));
}

#endif
