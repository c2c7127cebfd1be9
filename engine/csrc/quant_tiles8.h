/* What the float32 quantized GEMM (quant_gemm_f32.c) and the w4a8 GEMM (quant_gemm_a8.c)
 * share: their packed layout of a Q4_1 weight in tiles of 8 output rows, and the weight
 * stream's prefetch. Each library exports its own packing entry over pack_q4_1_tiles8. */
#ifndef SPLITSERVE_QUANT_TILES8_H
#define SPLITSERVE_QUANT_TILES8_H

#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#include "simd.h"
#define QG32_SIMD 1
#else
#define QG32_SIMD 0
#endif

#define TILE_N 8
#define GROUP 32
#define Q4_BYTES 160
#define Q8_BYTES 272

/* q: [N, K] uint8 (0..15), d, m: [N, K / 32] fp16 bits → out: ceil(N / 8) * (K / 32) * 160
 * bytes. Rows past N get q = d = m = 0. K must be a multiple of 32. */
static inline void pack_q4_1_tiles8(const uint8_t *q, const uint16_t *d, const uint16_t *m,
                                    uint8_t *out, int64_t N, int64_t K) {
    const int64_t tiles = (N + TILE_N - 1) / TILE_N, groups = K / GROUP;
    for (int64_t t = 0; t < tiles; t++)
        for (int64_t g = 0; g < groups; g++) {
            uint8_t *blk = out + (t * groups + g) * Q4_BYTES;
            memset(blk, 0, Q4_BYTES);
            for (int c = 0; c < GROUP / 8; c++)
                for (int r = 0; r < TILE_N; r++) {
                    const int64_t row = t * TILE_N + r;
                    uint32_t word = 0;
                    for (int j = 0; j < 8 && row < N; j++)
                        word |= (uint32_t)(q[row * K + g * GROUP + 8 * c + j] & 0xF) << (4 * j);
                    memcpy(blk + 32 * c + 4 * r, &word, 4);
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

#if QG32_SIMD
#define PF_AHEAD 8192
/* The group PF_AHEAD bytes ahead in both tiles' weight streams, into L1. */
static inline void prefetch_ahead(const uint8_t *b0, const uint8_t *b1, int64_t bytes) {
    for (int64_t off = PF_AHEAD; off < PF_AHEAD + bytes; off += 64) {
        _mm_prefetch((const char *)(b0 + off), _MM_HINT_T0);
        _mm_prefetch((const char *)(b1 + off), _MM_HINT_T0);
    }
}
#endif

#endif
