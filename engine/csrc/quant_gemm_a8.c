/* y = x @ W.T (+ bias) for a GGUF Q4_1 weight W [N, K] kept quantized and x [M, K] (float32
 * or bfloat16) rounded to int8 per group of 32 inside the call: `--quantization w4a8`, on
 * CPUs with AVX2, FMA and F16C, with AVX512-VNNI where the CPU has it. Built and loaded by
 * engine/native.py; the weights are packed as quant_gemm_f32.c packs them (quant_tiles8.h).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "bf16.h"
#include "quant_tiles8.h"

/* Not exact (quant_gemm_f32.c is: it converts each weight to float32 and multiplies in
 * float32, ~4 vector instructions a weight per 8 outputs, so at one row an AVX2 CPU waits
 * on its ALUs, not on memory). Here each row of x is rounded per group of 32 inputs as
 * llama.cpp's Q8_1 does: dx = max|x| / 127, qx = round(x / dx) in -127..127, and
 * sx = dx * sum_k qx_k. For output n and group g (Q4_1: w = d * q + m)
 *     sum_k x_k w_k ~= sum_k w_k dx qx_k = d * dx * sum_k q_k qx_k + m * sx,
 * the exact dot of the dequantized weights with the rounded inputs (the rounded sum in the
 * m term too: the exact sum there would leave d * q, not w, multiplying the rounding, and
 * Q4_1's q has a mean of ~7.5, so the error doubled on zero-centred weights). The integer
 * dot in 8-bit multiplies: VPMADDUBSW multiplies 32 unsigned 4-bit weights by 32 signed
 * int8 inputs and adds pairs into 16 int16 lanes (|2 * 15 * 127| = 3,810, so a group's 8
 * such vectors add in int16 without overflow: 30,480), then one VPMADDWD by ones gives 8
 * int32 sums, one per output. About 3x fewer instructions a weight than the float32 path.
 *
 * The weights are the float32 kernel's packing (splitserve_pack_q4_1_a8, the same as
 * splitserve_pack_q4_1_f32): word r of vector c holds q[row r][8c + j] in bits 4j, so a
 * vector's low nibbles (a mask) are 8 rows x the even inputs 8c, 8c+2, 8c+4, 8c+6 and its
 * high nibbles (a shift and a mask) the odd ones.
 * The rounded x is stored with each 8 inputs reordered to match (evens, then odds), so one
 * 32-bit broadcast of 4 int8 inputs meets every row's 4 weights.
 */

int splitserve_quant_gemm_a8_available(void) { return QG32_SIMD; }

/* The float32 kernel's packing (quant_tiles8.h), exported by this library too. */
void splitserve_pack_q4_1_a8(const uint8_t *q, const uint16_t *d, const uint16_t *m,
                             uint8_t *out, int64_t N, int64_t K) {
    pack_q4_1_tiles8(q, d, m, out, N, K);
}

#if QG32_SIMD
/* The integer part of a group: s accumulates w (32 unsigned 4-bit weights, 4 per row) times x
 * (4 int8 inputs broadcast). With AVX512-VNNI (or AVX-VNNI) one VPDPBUSD adds each row's 4
 * products into an int32 lane; on AVX2 alone VPMADDUBSW adds pairs into int16 lanes and
 * a8_dot's VPMADDWD sums the pairs. The same exact integers either way (the int16 lanes
 * cannot overflow: see above), so both builds give the same outputs bit for bit. From 8
 * rows up a VNNI build also takes 8 rows x both tiles in 512-bit vectors (rows8_a8_512). */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define A8_VNNI 1
#define A8_VNNI512 1
static inline __m256i a8_acc(__m256i s, __m256i w, __m256i x) {
    return _mm256_dpbusd_epi32(s, w, x);
}
#elif defined(__AVXVNNI__)
#define A8_VNNI 1
#define A8_VNNI512 0
static inline __m256i a8_acc(__m256i s, __m256i w, __m256i x) {
    return _mm256_dpbusd_avx_epi32(s, w, x);
}
#else
#define A8_VNNI 0
#define A8_VNNI512 0
static inline __m256i a8_acc(__m256i s, __m256i w, __m256i x) {
    return _mm256_add_epi16(s, _mm256_maddubs_epi16(w, x));
}
#endif

/* A buffer of at least `bytes` (64-byte aligned) kept by the calling thread across calls
 * (*buf, *have: its address and size), grown when a call needs more: a fresh allocation
 * of a prefill's size every call came back from the kernel as zeroed pages (~4 % of a
 * w4a8 run). NULL when out of memory. */
static void *kept_buffer(void **buf, size_t *have, size_t bytes) {
    if (bytes > *have) {
        free(*buf);
        *buf = aligned_alloc(64, (bytes + 63) / 64 * 64);
        *have = *buf ? bytes : 0;
    }
    return *buf;
}

/* A group's integer sums (a8_acc's lanes) as 8 float32 dot products, one per row. */
static inline __m256 a8_dot(__m256i s) {
#if A8_VNNI
    return _mm256_cvtepi32_ps(s);
#else
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(s, _mm256_set1_epi16(1)));
#endif
}

/* 8 inputs of row r from x (float32, or bfloat16 when `bf16`: its top half) as float32. */
static inline __attribute__((always_inline)) __m256 load_in8(const void *x, int64_t i,
                                                             const int bf16) {
    if (bf16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + i))),
            16));
    return _mm256_loadu_ps((const float *)x + i);
}

/* Row r of x [M, K] → int8 qx[r * K ..] (each 8 inputs even ones first), and per group g
 * dx[r * groups + g] and the sum of the quantized inputs sx[r * groups + g] = dx * sum qx
 * (see the top of the file). An all-zero group gets dx = 0, qx = 0. */
static inline __attribute__((always_inline)) void quantize_rows(
    const void *x, int64_t ldx, int64_t r0, int64_t r1, int64_t K, int8_t *qx, float *dx,
    float *sx, const int bf16, const int inter) {
    const int64_t groups = K / GROUP;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t r = r0; r < r1; r++)
        for (int64_t g = 0; g < groups; g++) {
            const int64_t xg = r * ldx + g * GROUP;
            __m256 v[4], amax = _mm256_setzero_ps();
            for (int i = 0; i < 4; i++) {
                v[i] = load_in8(x, xg + 8 * i, bf16);
                amax = _mm256_max_ps(amax, _mm256_and_ps(v[i], absmask));
            }
            const float m = hmax8_ps(amax);
            const float d = m / 127.f, inv = m > 0.f ? 127.f / m : 0.f;
            /* round to nearest even (the default MXCSR mode), then narrow 32 → 8 bits */
            __m256i i32[4], total = _mm256_setzero_si256();
            for (int i = 0; i < 4; i++) {
                i32[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(inv)));
                total = _mm256_add_epi32(total, i32[i]);
            }
            int32_t t[8], qsum = 0;
            _mm256_storeu_si256((__m256i *)t, total);
            for (int i = 0; i < 8; i++) qsum += t[i];
            /* row-major, or in blocks of 8 rows (interleave_rows8's layout) */
            const int64_t at = inter ? ((r / 8) * groups + g) * 8 + r % 8 : r * groups + g;
            dx[at] = d;
            sx[at] = d * (float)qsum;
            const __m256i i16 = _mm256_packs_epi32(i32[0], i32[1]);
            const __m256i j16 = _mm256_packs_epi32(i32[2], i32[3]);
            __m256i i8 = _mm256_packs_epi16(i16, j16);
            /* the packs interleave 128-bit lanes: dwords 0 4 1 5 2 6 3 7 → 0..7; then each
             * 8 inputs as the even ones, then the odd ones (the packed weights' low and high
             * nibbles, see below) */
            i8 = _mm256_permutevar8x32_epi32(i8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            i8 = _mm256_shuffle_epi8(i8, _mm256_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14,
                                                          9, 11, 13, 15, 0, 2, 4, 6, 1, 3, 5, 7,
                                                          8, 10, 12, 14, 9, 11, 13, 15));
#if A8_VNNI512
            if (inter) { /* word j (4 inputs) of the group to its row's slot of vector j
                          * (stores of 4 bytes: VPSCATTERDD took 3x the time) */
                int32_t words[8];
                _mm256_storeu_si256((__m256i *)words, i8);
                int8_t *dst = qx + ((r / 8) * groups + g) * 256 + (r % 8) * 4;
                for (int j = 0; j < 8; j++) memcpy(dst + 32 * j, &words[j], 4);
                continue;
            }
#endif
            _mm256_storeu_si256((__m256i *)(qx + r * K + g * GROUP), i8);
        }
}

/* 4 int8 inputs as one 32-bit word (memcpy: the bytes were stored as int8). */
static inline int32_t four_inputs(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* One group of NT (1 or 2) adjacent tiles for mrows rows of x (row r's int8 group at
 * xq + r * K, its dx and sx at dxg[r * groups], sxg[r * groups]):
 * a[t][r] += d_t * dx[r] * sum_k q_tk qx_rk + m_t * sx[r]. The group's weights are unpacked
 * once (to registers or L1) and every row reads them there. */
static inline __attribute__((always_inline)) void group_rows_a8(
    const int8_t *xq, int64_t K, const float *dxg, const float *sxg, int64_t groups,
    const uint8_t *blk0, const uint8_t *blk1, __m256 *a0, __m256 *a1, int mrows,
    const int NT) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256i w[2][8];
    __m256 d[2], mn[2];
    for (int t = 0; t < NT; t++) {
        const uint8_t *blk = t ? blk1 : blk0;
        for (int c = 0; c < GROUP / 8; c++) {
            const __m256i p = _mm256_loadu_si256((const __m256i *)(blk + 32 * c));
            w[t][2 * c] = _mm256_and_si256(p, low);
            w[t][2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(p, 4), low);
        }
        d[t] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 128)));
        mn[t] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 144)));
    }
    for (int r = 0; r < mrows; r++) {
        const int8_t *xr = xq + r * K;
        __m256i s[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            const __m256i xb = _mm256_set1_epi32(four_inputs(xr + 4 * j));
            for (int t = 0; t < NT; t++)
                s[t] = a8_acc(s[t], w[t][j], xb);
        }
        const __m256 dxr = _mm256_broadcast_ss(dxg + r * groups);
        const __m256 sxr = _mm256_broadcast_ss(sxg + r * groups);
        for (int t = 0; t < NT; t++) {
            __m256 *a = t ? a1 : a0;
            a[r] = _mm256_fmadd_ps(a8_dot(s[t]), _mm256_mul_ps(d[t], dxr), a[r]);
            a[r] = _mm256_fmadd_ps(sxr, mn[t], a[r]);
        }
    }
}

/* Rows two at a time: a chunk of A8_CHUNK groups of both tiles is unpacked once into
 * nibbles (and its scales and minimums into float32) in a buffer on the stack, and each pair
 * of rows runs over it with its 2 x 2 float accumulators and 2 x 2 int16 sums in registers
 * (12 of AVX2's 16), each weight vector loaded once for two rows and each broadcast input
 * used by two tiles. The group_rows_a8 loop above keeps its accumulators in memory (32 rows
 * do not fit in registers) and its 16 unpacked weight vectors spill to the stack, so every
 * row reloads them: on an AVX2 EPYC (Zen 3), 2 threads, this took SmolLM2's projections at
 * 2,048 rows from ~90 to ~110 G multiply-adds a second (1.2-1.35x, interleaved runs), and
 * 16-32 rows streamed from memory (a decode step's 120 matrices) 1.12-1.18x. Fewer than
 * A8_PAIR_ROWS rows stay on group_rows_a8, which reads its weights straight from the packed
 * stream: there the weights' reads bound the call, and the buffer's extra pass was 10-18 %
 * slower at 2-4 rows. The asm statement keeps GCC 12 from reordering the sums of a group
 * into 32 spilled products (~25 % slower). */
#define A8_CHUNK 16
#define A8_PAIR_ROWS 8
typedef struct {
    /* [group][input vector][tile]: nibbles as bytes, the two tiles' vectors side by side
     * (one 512-bit load takes both: rows_a8_512) */
    __m256i w[A8_CHUNK][8][2];
    __m256 dm[A8_CHUNK][2][2]; /* [group][d, m][tile] */
} a8_chunk;

/* Groups g0 .. g0 + gn of both tiles → w[g], dm[g] (g from 0). */
static void unpack_a8(const uint8_t *tp0, const uint8_t *tp1, int64_t g0, int64_t gn,
                      __m256i (*w)[8][2], __m256 (*dm)[2][2]) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int64_t g = 0; g < gn; g++) {
        prefetch_ahead(tp0 + (g0 + g) * Q4_BYTES, tp1 + (g0 + g) * Q4_BYTES, Q4_BYTES);
        for (int t = 0; t < 2; t++) {
            const uint8_t *blk = (t ? tp1 : tp0) + (g0 + g) * Q4_BYTES;
            for (int c = 0; c < GROUP / 8; c++) {
                const __m256i p = _mm256_loadu_si256((const __m256i *)(blk + 32 * c));
                w[g][2 * c][t] = _mm256_and_si256(p, low);
                w[g][2 * c + 1][t] = _mm256_and_si256(_mm256_srli_epi16(p, 4), low);
            }
            dm[g][0][t] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 128)));
            dm[g][1][t] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 144)));
        }
    }
}

/* Rows x0 and x1 (int8, their dx and sx at dx0/dx1, sx0/sx1 for group 0 of the chunk)
 * against the chunk's gn groups, added to a[row][tile]. */
static inline __attribute__((always_inline)) void rows2_a8(const int8_t *x0, const int8_t *x1,
                                                          const float *dx0, const float *dx1,
                                                          const float *sx0, const float *sx1,
                                                          const a8_chunk *u, int gn,
                                                          __m256 a[2][2]) {
    __m256 a00 = a[0][0], a01 = a[0][1], a10 = a[1][0], a11 = a[1][1];
    for (int g = 0; g < gn; g++) {
        const int8_t *xa = x0 + g * GROUP, *xb = x1 + g * GROUP;
        const __m256i(*w)[2] = u->w[g];
        __m256i s00 = _mm256_setzero_si256(), s01 = s00, s10 = s00, s11 = s00;
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            const __m256i w0 = w[j][0], w1 = w[j][1];
            const __m256i bx = _mm256_set1_epi32(four_inputs(xa + 4 * j));
            const __m256i by = _mm256_set1_epi32(four_inputs(xb + 4 * j));
            s00 = a8_acc(s00, w0, bx);
            s01 = a8_acc(s01, w1, bx);
            s10 = a8_acc(s10, w0, by);
            s11 = a8_acc(s11, w1, by);
            __asm__("" : "+x"(s00), "+x"(s01), "+x"(s10), "+x"(s11));
        }
        const __m256 dxa = _mm256_broadcast_ss(dx0 + g), dxb = _mm256_broadcast_ss(dx1 + g);
        const __m256 sxa = _mm256_broadcast_ss(sx0 + g), sxb = _mm256_broadcast_ss(sx1 + g);
        const __m256 d0 = u->dm[g][0][0], m0 = u->dm[g][1][0];
        const __m256 d1 = u->dm[g][0][1], m1 = u->dm[g][1][1];
        a00 = _mm256_fmadd_ps(sxa, m0, _mm256_fmadd_ps(a8_dot(s00), _mm256_mul_ps(d0, dxa), a00));
        a01 = _mm256_fmadd_ps(sxa, m1, _mm256_fmadd_ps(a8_dot(s01), _mm256_mul_ps(d1, dxa), a01));
        a10 = _mm256_fmadd_ps(sxb, m0, _mm256_fmadd_ps(a8_dot(s10), _mm256_mul_ps(d0, dxb), a10));
        a11 = _mm256_fmadd_ps(sxb, m1, _mm256_fmadd_ps(a8_dot(s11), _mm256_mul_ps(d1, dxb), a11));
    }
    a[0][0] = a00, a[0][1] = a01, a[1][0] = a10, a[1][1] = a11;
}

#if A8_VNNI512
/* With AVX512-VNNI: a block of 8 rows against both tiles at once, each 512-bit vector
 * holding the two tiles' 16 outputs: one VPDPBUSD adds 4 inputs' products for 16 outputs,
 * each unpacked weight vector is loaded once for 8 rows, and the 8 rows' int32 sums are 8
 * independent chains (a VPDPBUSD waits several cycles for its sum). The block's x is
 * interleaved (interleave_rows8: every broadcast a constant offset from one pointer; with 8
 * row pointers GCC spilled them). xb, dxb, sxb: the block at group 0 of the chunk. On an
 * AMD EPYC (Zen 4), 2 threads, SmolLM2's projections at 16-512 rows: ~0.6x the time of
 * the AVX2 code (rows2_a8) built for the same CPU. */
static inline void rows8_a8_512(const int8_t *xb, const float *dxb, const float *sxb,
                                const __m256i (*uw)[8][2], const __m256 (*udm)[2][2],
                                int64_t groups, __m256 *acc) {
    __m512 a[8];
    for (int r = 0; r < 8; r++) a[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512i s[8];
        for (int r = 0; r < 8; r++) s[r] = _mm512_setzero_si512();
        const int8_t *xg = xb + g * 256;
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            const __m512i w = _mm512_load_si512((const void *)uw[g][j]);
            for (int r = 0; r < 8; r++)
                s[r] = _mm512_dpbusd_epi32(s[r], w,
                                           _mm512_set1_epi32(four_inputs(xg + 32 * j + 4 * r)));
        }
        const __m512 d = _mm512_load_ps((const void *)udm[g][0]);
        const __m512 m = _mm512_load_ps((const void *)udm[g][1]);
        for (int r = 0; r < 8; r++) {
            const __m512 dxr = _mm512_set1_ps(dxb[g * 8 + r]);
            const __m512 sxr = _mm512_set1_ps(sxb[g * 8 + r]);
            a[r] = _mm512_fmadd_ps(sxr, m, _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r]),
                                                           _mm512_mul_ps(d, dxr), a[r]));
        }
    }
    for (int r = 0; r < 8; r++) _mm512_storeu_ps((float *)(acc + 2 * r), a[r]);
}

#endif

/* tile_rows_a8 for A8_PAIR_ROWS rows or more. */
static __attribute__((noinline)) void tile_rows_a8_pairs(const int8_t *xq, const float *dx,
                                                          const float *sx, int64_t K,
                                                          int64_t groups, const uint8_t *tp0,
                                                          const uint8_t *tp1, __m256 *acc0,
                                                          __m256 *acc1, int mrows) {
    a8_chunk u __attribute__((aligned(64)));
    for (int64_t g0 = 0; g0 < groups; g0 += A8_CHUNK) {
        const int gn = (int)(groups - g0 < A8_CHUNK ? groups - g0 : A8_CHUNK);
        unpack_a8(tp0, tp1, g0, gn, u.w, u.dm);
        for (int r = 0; r < mrows; r += 2) {
            const int r1 = r + 1 < mrows ? r + 1 : r; /* an odd last row: computed twice */
            __m256 a[2][2] = {{acc0[r], acc1[r]}, {acc0[r1], acc1[r1]}};
            rows2_a8(xq + r * K + g0 * GROUP, xq + r1 * K + g0 * GROUP, dx + r * groups + g0,
                     dx + r1 * groups + g0, sx + r * groups + g0, sx + r1 * groups + g0, &u, gn,
                     a);
            acc0[r] = a[0][0], acc1[r] = a[0][1], acc0[r1] = a[1][0], acc1[r1] = a[1][1];
        }
    }
}

#if A8_VNNI512
/* The calling thread's unpacked copy of one tile pair's weights over the whole K (640 bytes
 * a group), and what it holds: the GEMM call (a8_calls when it began) and the pair. The
 * rows of a pair come in chunks of 32 (tile_pair), all on one thread: unpacked once a pair
 * instead of once a chunk (for a 2,048-row prefill, 64 times). */
static uint64_t a8_calls;
static __thread void *a8_unpacked;
static __thread size_t a8_unpacked_bytes;
static __thread uint64_t a8_unpacked_call;
static __thread const uint8_t *a8_unpacked_pair;

/* tile_rows_a8_pairs with VNNI: blocks of 8 rows of the interleaved x (padded rows
 * computed, not stored), each over the whole K with its sums in registers. Returns 0, or
 * -2 out of memory. */
static __attribute__((noinline)) int tile_rows_a8_512(const int8_t *qxi, const float *dxi,
                                                       const float *sxi, int64_t groups,
                                                       const uint8_t *tp0, const uint8_t *tp1,
                                                       __m256 *acc0, __m256 *acc1, int mrows,
                                                       uint64_t call) {
    uint8_t *u = kept_buffer(&a8_unpacked, &a8_unpacked_bytes, (size_t)groups * 640);
    if (!u) return -2;
    __m256i(*w)[8][2] = (__m256i(*)[8][2])(void *)u;
    __m256(*dm)[2][2] = (__m256(*)[2][2])(void *)(u + groups * 512);
    if (a8_unpacked_call != call || a8_unpacked_pair != tp0) {
        unpack_a8(tp0, tp1, 0, groups, w, dm);
        a8_unpacked_call = call, a8_unpacked_pair = tp0;
    }
    __m256 out[16];
    for (int b = 0; b < (mrows + 7) / 8; b++) {
        rows8_a8_512(qxi + b * groups * 256, dxi + b * groups * 8, sxi + b * groups * 8,
                     (const __m256i(*)[8][2])w, (const __m256(*)[2][2])dm, groups, out);
        for (int r = 0; r < 8; r++) acc0[8 * b + r] = out[2 * r], acc1[8 * b + r] = out[2 * r + 1];
    }
    return 0;
}
#endif

/* tile_rows_a8 for fewer rows: the weights' reads bound the call (see above). */
static __attribute__((noinline)) void tile_rows_a8_few(const int8_t *xq, const float *dx,
                                                        const float *sx, int64_t K,
                                                        int64_t groups, const uint8_t *tp0,
                                                        const uint8_t *tp1, __m256 *acc0,
                                                        __m256 *acc1, int mrows, const int nt) {
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *b0 = tp0 + g * Q4_BYTES, *b1 = tp1 + g * Q4_BYTES;
        prefetch_ahead(b0, b1, Q4_BYTES);
        if (nt == 2)
            group_rows_a8(xq + g * GROUP, K, dx + g, sx + g, groups, b0, b1, acc0, acc1, mrows,
                          2);
        else
            group_rows_a8(xq + g * GROUP, K, dx + g, sx + g, groups, b0, b1, acc0, acc1, mrows,
                          1);
    }
}

/* acc0[r], acc1[r] (8 outputs each) = x[r] @ packed tiles tp0 (and tp1 when nt is 2), for
 * mrows rows (at most 32). With one tile, gemm_tile_pairs passes tp1 == tp0 (its acc1 is not
 * stored). */
static void tile_rows_a8(const int8_t *xq, const float *dx, const float *sx, int64_t K,
                         int64_t groups, const uint8_t *tp0, const uint8_t *tp1, __m256 *acc0,
                         __m256 *acc1, int mrows, const int nt) {
    for (int r = 0; r < mrows; r++) acc0[r] = acc1[r] = _mm256_setzero_ps();
    if (mrows >= A8_PAIR_ROWS)
        tile_rows_a8_pairs(xq, dx, sx, K, groups, tp0, tp1, acc0, acc1, mrows);
    else
        tile_rows_a8_few(xq, dx, sx, K, groups, tp0, tp1, acc0, acc1, mrows, nt);
}

/* tile_rows for gemm_tile_pairs: the quantized x, its scales and sums, row-major or (inter)
 * in blocks of 8 rows. */
struct a8_rows {
    const int8_t *qx;
    const float *dx, *sx;
    int64_t K, groups;
    int inter;
    uint64_t call; /* this call's number (tile_rows_a8_512's unpacked weights) */
    int *rc;       /* set to -2 when a thread runs out of memory */
};

static void a8_tile_rows(const void *ctx, int64_t m0, const uint8_t *tp0, const uint8_t *tp1,
                         __m256 *acc0, __m256 *acc1, int mrows, int nt) {
    const struct a8_rows *c = ctx;
#if A8_VNNI512
    if (c->inter) { /* m0: a multiple of 32, so of 8 */
        if (tile_rows_a8_512(c->qx + m0 * c->K, c->dx + m0 * c->groups,
                             c->sx + m0 * c->groups, c->groups, tp0, tp1, acc0, acc1, mrows,
                             c->call)) {
            *c->rc = -2;
            for (int r = 0; r < mrows; r++) acc0[r] = acc1[r] = _mm256_setzero_ps();
        }
        return;
    }
#endif
    tile_rows_a8(c->qx + m0 * c->K, c->dx + m0 * c->groups, c->sx + m0 * c->groups, c->K,
              c->groups, tp0, tp1, acc0, acc1, mrows, nt);
}

/* The calling thread's scratch for the quantized x (kept_buffer). */
static __thread void *a8_scratch;
static __thread size_t a8_scratch_bytes;

/* x, y: float32, or bfloat16 when `bf16` (bias: float32 either way, or NULL). */
static int gemm_a8(const void *x, int64_t ldx, int64_t M, const uint8_t *wp, int64_t N,
                   int64_t K, const float *bias, void *y, int64_t ldy, int num_threads,
                   const int bf16) {
    if (K % GROUP) return -1;
    if (M <= 0) return 0;
    const int64_t groups = K / GROUP;
    /* With VNNI, A8_PAIR_ROWS rows or more are quantized straight into blocks of 8 rows
     * (rows past M zero) for rows8_a8_512. */
    const int inter = A8_VNNI512 && M >= A8_PAIR_ROWS;
    const int64_t rows = inter ? (M + 7) / 8 * 8 : M;
    int8_t *qx = kept_buffer(&a8_scratch, &a8_scratch_bytes,
                             (size_t)(rows * K + 2 * rows * groups * (int64_t)sizeof(float)));
    if (!qx) return -2;
    float *dx = (float *)(void *)(qx + rows * K), *sx = dx + rows * groups;
    if (rows > M) { /* the last block's padding rows: zero x, dx and sx */
        memset(qx + (rows - 8) * K, 0, (size_t)(8 * K));
        memset(dx + (rows - 8) * groups, 0, (size_t)(8 * groups) * sizeof(float));
        memset(sx + (rows - 8) * groups, 0, (size_t)(8 * groups) * sizeof(float));
    }
    /* rows * K is a multiple of 32, so dx is 4-byte aligned. Prefill-sized x is rounded on
     * every thread (else the others wait: ~1.5 % of a w4a8 prefill on 2 threads). */
#pragma omp parallel for num_threads(num_threads) if (M >= 64 && num_threads > 1) schedule(static)
    for (int64_t r0 = 0; r0 < M; r0 += 16) {
        const int64_t r1 = M - r0 < 16 ? M : r0 + 16;
        if (bf16 && inter)
            quantize_rows(x, ldx, r0, r1, K, qx, dx, sx, 1, 1);
        else if (bf16)
            quantize_rows(x, ldx, r0, r1, K, qx, dx, sx, 1, 0);
        else if (inter)
            quantize_rows(x, ldx, r0, r1, K, qx, dx, sx, 0, 1);
        else
            quantize_rows(x, ldx, r0, r1, K, qx, dx, sx, 0, 0);
    }
    int rc = 0;
#if A8_VNNI512
    const uint64_t call = __atomic_add_fetch(&a8_calls, 1, __ATOMIC_RELAXED);
#else
    const uint64_t call = 0;
#endif
    const struct a8_rows ctx = {qx, dx, sx, K, groups, inter, call, &rc};
    gemm_tile_pairs(M, N, groups, Q4_BYTES, wp, bias, y, bf16, ldy, num_threads, a8_tile_rows,
                    &ctx);
    return rc;
}
#else
#define gemm_a8(...) (-1) /* built without AVX2/FMA/F16C: the entries refuse every call */
#endif

/* y [M, N] (row stride ldy) = x [M, K] (row stride ldx) @ W.T + bias (bias may be NULL),
 * W packed by splitserve_pack_q4_1_a8. Return 0, -1 when built without AVX2/FMA/F16C or K
 * is not a multiple of 32, -2 when out of memory. */
int splitserve_q4_1_gemm_a8(const float *x, int64_t ldx, int64_t M, const uint8_t *wp,
                            int64_t N, int64_t K, const float *bias, float *y, int64_t ldy,
                            int num_threads) {
    return gemm_a8(x, ldx, M, wp, N, K, bias, y, ldy, num_threads, 0);
}

/* The same for a bfloat16 model: x, bias and y bfloat16 (each output rounded once, after
 * the bias). */
int splitserve_q4_1_gemm_a8_bf16(const uint16_t *x, int64_t ldx, int64_t M, const uint8_t *wp,
                                 int64_t N, int64_t K, const uint16_t *bias, uint16_t *y,
                                 int64_t ldy, int num_threads) {
    float *b = NULL;
    if (bias) {
        if (!(b = (float *)malloc((size_t)N * sizeof(float)))) return -2;
        for (int64_t n = 0; n < N; n++) b[n] = bf16_to_f32(bias[n]);
    }
    const int rc = gemm_a8(x, ldx, M, wp, N, K, b, y, ldy, num_threads, 1);
    free(b);
    return rc;
}
