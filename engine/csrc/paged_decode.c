/* Paged decode attention on CPU, bfloat16 or float32 cache: one query token per request,
 * read straight from the paged KV cache (no gathered copy), softmax in float32.
 *
 * Built and loaded by engine/native.py (plain C, no Python or torch headers:
 * it is called through ctypes with tensor data pointers).
 *
 * Layout (the engine's): cache[num_blocks, layers, 2, block_size, kv_heads, head_dim].
 * The caller passes a pointer to this layer's K of block 0, the stride between blocks and
 * the offset from K to V inside a block, in elements.
 *
 * Per request (the unit split over OpenMP threads): every query head scores every cached
 * token in one pass over K (AVX512-BF16 dot products where the CPU has them; AVX2 FMAs for
 * a float32 cache), softmax over those scores in float32, then one pass over V accumulates
 * the weighted rows in float32, each kv head's rows read once for its whole group of query
 * heads. The bfloat16 entry point is used where the CPU has AVX512-BF16, the float32 ones
 * (float32 q over a float32, bfloat16 or float8 e4m3 cache) where it has AVX2, FMA and
 * F16C (engine/native.py asks the probes at the end).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "bf16.h"
#include "fp8.h"
#include "simd.h"

/* Prefetching. A part reads a stream of 2 x its blocks (its K blocks, then its V blocks:
 * runs of block_size x kv_heads x head_dim that lie a whole block of every layer apart);
 * while it reads block i it prefetches block i + PREFETCH_BLOCKS into L2, a few lines
 * between each group of loads. Measured on this project's Zen 4 VM (SmolLM2's cache, 64
 * requests x 600 tokens, 30 layers, random block ids, 2 threads): a whole block's prefetches
 * issued at once stall the loads queued behind them (~13-15 GB/s); spread out they reach
 * ~20 (4 KB pages) to ~23 GB/s (huge pages), against ~28 for a loop that only reads the same
 * bytes. Distance 2-6 blocks measured alike; into L1 or non-temporal: ~15 GB/s. */
#define PREFETCH_BLOCKS 3

typedef struct {
    const char *p, *end;
} pf_cursor;

/* Prefetch the next `lines` cache lines of the cursor's block (none past its end). */
static inline void pf_take(pf_cursor *c, int lines) {
    for (int i = 0; i < lines && c->p < c->end; i++, c->p += 64) __builtin_prefetch(c->p, 0, 1);
}

/* Point the cursor at stream block i of a part (K block i, or V block i - nblocks), after
 * prefetching what is left of the block it pointed at; past the stream's end: at nothing. */
static inline void pf_seek(pf_cursor *c, const char *layer_k, const int64_t *table,
                           int64_t stride, int64_t v_off, int64_t nblocks, int64_t i,
                           int64_t bytes) {
    pf_take(c, 1 << 30);
    if (i >= 2 * nblocks) {
        c->p = c->end = 0;
        return;
    }
    c->p = i < nblocks ? layer_k + table[i] * stride : layer_k + table[i - nblocks] * stride + v_off;
    c->end = c->p + bytes;
}

/* s[:n] = e^(s - max) in place (not normalised); *max_out = max, returns the sum. */
static float exp_shifted(float *s, int64_t n, float *max_out) {
    float m = -INFINITY, sum = 0.f;
    int64_t t = 0;
#if defined(__AVX512F__)
    __m512 vm = _mm512_set1_ps(-INFINITY);
    for (; t + 16 <= n; t += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(s + t));
    m = _mm512_reduce_max_ps(vm);
#elif SPLITSERVE_F32_SIMD
    __m256 vm = _mm256_set1_ps(-INFINITY);
    for (; t + 8 <= n; t += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(s + t));
    m = hmax8_ps(vm);
#endif
    for (; t < n; t++) m = s[t] > m ? s[t] : m;
    t = 0;
#if defined(__AVX512F__)
    __m512 vs = _mm512_setzero_ps(), bm = _mm512_set1_ps(m);
    for (; t + 16 <= n; t += 16) {
        __m512 e = exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(s + t), bm));
        _mm512_storeu_ps(s + t, e);
        vs = _mm512_add_ps(vs, e);
    }
    sum = _mm512_reduce_add_ps(vs);
#elif SPLITSERVE_F32_SIMD
    __m256 vs = _mm256_setzero_ps(), bm = _mm256_set1_ps(m);
    for (; t + 8 <= n; t += 8) {
        __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + t), bm));
        _mm256_storeu_ps(s + t, e);
        vs = _mm256_add_ps(vs, e);
    }
    sum = hsum8_ps(vs);
#endif
    for (; t < n; t++) {
        s[t] = expf(s[t] - m);
        sum += s[t];
    }
    *max_out = m;
    return sum;
}

#if defined(__AVX512F__)
/* head_dim 64, G query heads per kv head: the G x 4 accumulators stay in registers. */
static inline __attribute__((always_inline)) void accumulate_d64(
    const uint16_t *v, int64_t stride, int n, const float *p, int64_t p_stride, const int G,
    float *acc, pf_cursor *pc, int share) {
    __m512 a[8][4];
#pragma GCC unroll 8
    for (int j = 0; j < G; j++)
        for (int c = 0; c < 4; c++) a[j][c] = _mm512_loadu_ps(acc + j * 64 + c * 16);
    for (int t = 0; t < n; t++) {
        pf_take(pc, share);
        const uint16_t *row = v + t * stride;
        __m512 r0 = load_bf16x16(row), r1 = load_bf16x16(row + 16), r2 = load_bf16x16(row + 32),
               r3 = load_bf16x16(row + 48);
#pragma GCC unroll 8
        for (int j = 0; j < G; j++) {
            __m512 w = _mm512_set1_ps(p[j * p_stride + t]);
            a[j][0] = _mm512_fmadd_ps(w, r0, a[j][0]);
            a[j][1] = _mm512_fmadd_ps(w, r1, a[j][1]);
            a[j][2] = _mm512_fmadd_ps(w, r2, a[j][2]);
            a[j][3] = _mm512_fmadd_ps(w, r3, a[j][3]);
        }
    }
#pragma GCC unroll 8
    for (int j = 0; j < G; j++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(acc + j * 64 + c * 16, a[j][c]);
}
#endif

#if defined(__AVX512BF16__)
/* The 16 lane sums of v[0..15], as the 16 lanes of one vector (a transposing tree of
 * in-lane unpacks and 128-bit shuffles: ~3 instructions a sum where a reduce per vector
 * takes ~8, mostly shuffles). */
static inline __m512 hsum16_ps(const __m512 *v) {
    __m512 s[8], t[4], u[2];
    for (int i = 0; i < 8; i++)
        s[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        const __m512d a = _mm512_castps_pd(s[2 * i]), b = _mm512_castps_pd(s[2 * i + 1]);
        t[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int i = 0; i < 2; i++)
        u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88),
                         _mm512_shuffle_f32x4(u[0], u[1], 0xdd));
}

/* Scores of 16 consecutive cached tokens of one kv head (rows `tok` apart; all 16 rows lie
 * inside the block, the first m are real) for its g query heads (bf16, d each, contiguous):
 * s[j * s_stride + t] for t < m. One dot-product accumulator a token, summed 16 at a time.
 * Measured on this project's Zen 4 (SmolLM2's cache, blocks from DRAM, per layer), against
 * one reduce a score: 32 requests x 1k, 1 thread 4.46 -> 3.42 ms, 2 threads 2.59 -> 1.72
 * (~15 GB/s, with the earlier whole-block prefetch: see PREFETCH_BLOCKS); 2 x 1.5k, 1
 * thread 0.29 -> 0.20 ms. Also takes `share` lines of the prefetch cursor a query head. */
static void scores16(const uint16_t *k, int64_t tok, const uint16_t *qb, int g, int d, float *s,
                     int64_t s_stride, int m, pf_cursor *pc, int share) {
    const __mmask16 keep = m >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << m) - 1);
    for (int j = 0; j < g; j++) {
        pf_take(pc, share);
        __m512 a[16];
#pragma GCC unroll 16
        for (int t = 0; t < 16; t++) a[t] = _mm512_setzero_ps();
        for (int c = 0; c < d; c += 32) {
            const __m512bh qv = (__m512bh)_mm512_loadu_si512((const void *)(qb + j * d + c));
#pragma GCC unroll 16
            for (int t = 0; t < 16; t++)
                a[t] = _mm512_dpbf16_ps(
                    a[t], (__m512bh)_mm512_loadu_si512((const void *)(k + t * tok + c)), qv);
        }
        _mm512_mask_storeu_ps(s + j * s_stride, keep, hsum16_ps(a));
    }
}
#endif

/* acc[j][:] += sum over the n tokens of p[j][t] * V row t (one kv head's rows, `stride`
 * apart), for its g query heads. */
static void accumulate_head(const uint16_t *v, int64_t stride, int n, const float *p,
                            int64_t p_stride, int g, int d, float *acc, pf_cursor *pc, int share) {
#if defined(__AVX512F__)
    if (d == 64) {
        switch (g) {
        case 1: accumulate_d64(v, stride, n, p, p_stride, 1, acc, pc, share); return;
        case 2: accumulate_d64(v, stride, n, p, p_stride, 2, acc, pc, share); return;
        case 3: accumulate_d64(v, stride, n, p, p_stride, 3, acc, pc, share); return;
        case 4: accumulate_d64(v, stride, n, p, p_stride, 4, acc, pc, share); return;
        case 5: accumulate_d64(v, stride, n, p, p_stride, 5, acc, pc, share); return;
        case 6: accumulate_d64(v, stride, n, p, p_stride, 6, acc, pc, share); return;
        default: break;
        }
    }
#endif
    for (int t = 0; t < n; t++)
        for (int j = 0; j < g; j++) {
            const float w = p[j * p_stride + t];
            for (int c = 0; c < d; c++) acc[j * d + c] += w * bf16_to_f32(v[t * stride + c]);
        }
}

/* One request's cached tokens [t_begin, t_end) (t_begin a multiple of bs): every kv
 * head, every query head. `s` holds nh * (t_end - t_begin) floats of scratch; qf: nh * d
 * floats, qb: nh * d bf16, of scratch. Leaves the part's softmax state: per query head
 * the score maximum m[qh], the sum l[qh] of e^(score - m) and acc[qh][:] the sum of those
 * weights times the V rows (not normalised: parts of one request merge in `merge_parts`).
 * Scores s[head][t] come from one pass over the request's K blocks, then one pass over
 * its V blocks; each block (all kv heads of 16 tokens: contiguous) is prefetched while
 * the one before it is being read. */
static void decode_part(const uint16_t *q, const uint16_t *layer_k, int64_t block_stride,
                        int64_t v_off, const int64_t *table, int64_t t_begin, int64_t t_end,
                        int nkv, int g, int d, int bs, float scale, float *s, float *qf,
                        uint16_t *qb, float *m, float *l, float *acc) {
    const int nh = nkv * g;
    /* the part as a request of its own: its blocks and its tokens */
    table += t_begin / bs;
    const int64_t len = t_end - t_begin;
    const int64_t tok = (int64_t)nkv * d, blk_bytes = (int64_t)bs * tok * 2;
    const int64_t nblocks = (len + bs - 1) / bs;
    const char *kb = (const char *)layer_k; /* the prefetch cursor counts bytes */
    const int64_t sb = block_stride * 2, vb = v_off * 2;
    /* The softmax scale is folded into q (and q rounded back to bf16 for the bf16 dot
     * products, as a bf16 GEMM over the scaled q would see it). */
    for (int i = 0; i < nh * d; i++) {
        qf[i] = bf16_to_f32(q[i]) * scale;
        qb[i] = f32_to_bf16(qf[i]);
    }
    /* Blocks 0 .. PREFETCH_BLOCKS - 1 of the stream now, then each one ahead (see pf_seek). */
    const int blk_lines = (int)((blk_bytes + 63) / 64);
    pf_cursor pc = {0, 0};
    for (int64_t i = 0; i < PREFETCH_BLOCKS; i++)
        pf_seek(&pc, kb, table, sb, vb, nblocks, i, blk_bytes);
    for (int64_t b = 0; b < nblocks; b++) {
        const uint16_t *k = layer_k + table[b] * block_stride;
        pf_seek(&pc, kb, table, sb, vb, nblocks, b + PREFETCH_BLOCKS, blk_bytes);
        int64_t t0 = b * bs;
        int n = (int)(len - t0 < bs ? len - t0 : bs);
#if defined(__AVX512BF16__)
        if (d % 32 == 0 && bs % 16 == 0) { /* 16 tokens at a time: see scores16 */
            /* lines a call prefetches: a block's worth over the calls that read a block */
            const int calls = ((bs + 15) / 16) * nkv * g, k_share = (blk_lines + calls - 1) / calls;
            for (int tt = 0; tt < n; tt += 16)
                for (int h = 0; h < nkv; h++)
                    scores16(k + tt * tok + h * d, tok, qb + (int64_t)h * g * d, g, d,
                             s + (int64_t)h * g * len + t0 + tt, len, n - tt, &pc, k_share);
            continue;
        }
#endif
        for (int t = 0; t < n; t++) {
            const uint16_t *row = k + t * tok;
            for (int h = 0; h < nkv; h++) {
                for (int j = 0; j < g; j++) {
                    const int qh = h * g + j;
                    float dot;
#if defined(__AVX512BF16__)
                    if (d % 32 == 0) {
                        __m512 a = _mm512_setzero_ps();
                        for (int c = 0; c < d; c += 32)
                            a = _mm512_dpbf16_ps(
                                a, (__m512bh)_mm512_loadu_si512((const void *)(row + h * d + c)),
                                (__m512bh)_mm512_loadu_si512((const void *)(qb + qh * d + c)));
                        dot = _mm512_reduce_add_ps(a);
                    } else
#endif
                    {
                        dot = 0.f;
                        for (int c = 0; c < d; c++) dot += qf[qh * d + c] * bf16_to_f32(row[h * d + c]);
                    }
                    s[qh * len + t0 + t] = dot;
                }
            }
        }
    }
    for (int qh = 0; qh < nh; qh++) l[qh] = exp_shifted(s + qh * len, len, &m[qh]);
    memset(acc, 0, sizeof(float) * nh * d);
    for (int64_t b = 0; b < nblocks; b++) {
        const uint16_t *v = layer_k + table[b] * block_stride + v_off;
        pf_seek(&pc, kb, table, sb, vb, nblocks, nblocks + b + PREFETCH_BLOCKS,
                blk_bytes);
        int64_t t0 = b * bs;
        int n = (int)(len - t0 < bs ? len - t0 : bs);
        const int v_share = (blk_lines + n * nkv - 1) / (n * nkv);
        for (int h = 0; h < nkv; h++)
            accumulate_head(v + h * d, tok, n, s + (int64_t)h * g * len + t0, len, g, d,
                            acc + h * g * d, &pc, v_share);
    }
}

/* ---- float32 queries: a float32, bfloat16 or float8 cache ------------------------------ */

/* The float32 path reads its cache through these: element i of a cache of `kvb`-byte
 * elements as float32 — 4: float32; 2: bfloat16 (a float32 engine's `--kv-cache-dtype
 * bfloat16`, half the bytes a step reads); 1: float8 e4m3 (`--kv-cache-dtype fp8`, a
 * quarter), read as FP8_UNIT times its value (see kv_load8). kvb is a constant wherever
 * they are inlined, so each instantiation below compiles to plain loads, to one
 * widen-and-shift, or to a widen, shift, mask and half-precision convert. */
#define KV_ES(kvb) (kvb)
/* kv_load8 reads a float8 value v as v / 256 (exactly: a power of two), so the float8
 * path scales q by 256 and its output by 256 (exact too): the scores and outputs are the
 * ones of the values themselves, bit for bit. */
#define FP8_UNIT (1.f / 256.f)

static inline __attribute__((always_inline)) const void *kv_at(const void *p, int64_t i,
                                                               const int kvb) {
    return (const char *)p + i * KV_ES(kvb);
}

static inline __attribute__((always_inline)) float kv_elem(const void *p, int64_t i,
                                                           const int kvb) {
    if (kvb == 1) return fp8_e4m3_to_f32(((const uint8_t *)p)[i]) * FP8_UNIT;
    return kvb == 2 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

#if SPLITSERVE_F32_SIMD
static inline __attribute__((always_inline)) __m256 kv_load8(const void *p, int64_t i,
                                                             const int kvb) {
    if (kvb == 4) return _mm256_loadu_ps((const float *)p + i);
    if (kvb == 2) {
        const __m128i raw = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
    }
    /* e4m3 byte s eeee mmm -> the half-precision number s 0eeee mmm0000000, i.e. the value
     * / 256 (subnormals included: e = 0 is a half-precision subnormal too): sign-extend to
     * 16 bits, shift by 7 (bit 15 keeps the sign, bit 14 gets it too), clear bit 14. */
    const __m128i raw = _mm_loadl_epi64((const __m128i *)((const uint8_t *)p + i));
    const __m128i h = _mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16(raw), 7),
                                    _mm_set1_epi16((short)0xBF80));
    return _mm256_cvtph_ps(h);
}

/* The 8 lane sums of a[0..7] as the 8 lanes of one vector (two rounds of hadd, then the
 * two 128-bit halves added). */
static inline __m256 hsum8x8_ps(const __m256 *a) {
    const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20),
                         _mm256_permute2f128_ps(t0, t1, 0x31));
}

/* scores16 for float32 queries, 8 tokens at a time (all 8 rows inside the block, the first
 * m real): one FMA accumulator a token, summed 8 at a time by hsum8x8_ps. */
static inline __attribute__((always_inline)) void scores8_f32(
    const void *k, int64_t tok, const float *q, int g, int d, float *s, int64_t s_stride, int m,
    pf_cursor *pc, int share, const int kvb) {
    for (int j = 0; j < g; j++) {
        pf_take(pc, share);
        __m256 a[8];
#pragma GCC unroll 8
        for (int t = 0; t < 8; t++) a[t] = _mm256_setzero_ps();
        for (int c = 0; c < d; c += 8) {
            const __m256 qv = _mm256_loadu_ps(q + j * d + c);
#pragma GCC unroll 8
            for (int t = 0; t < 8; t++)
                a[t] = _mm256_fmadd_ps(kv_load8(k, t * tok + c, kvb), qv, a[t]);
        }
        const __m256 r = hsum8x8_ps(a);
        if (m >= 8) {
            _mm256_storeu_ps(s + j * s_stride, r);
        } else {
            float tmp[8];
            _mm256_storeu_ps(tmp, r);
            memcpy(s + j * s_stride, tmp, sizeof(float) * m);
        }
    }
}

/* scores8_f32 over a bfloat16 or float8 cache for G <= 3 query heads a kv head, 4 tokens
 * at a time (all 4 rows inside the block, the first m real): each K vector is widened once
 * for every head of the group (scores8_f32 widens it once a head), 4 x G accumulators in
 * registers, about half the instructions. SmolLM2's bfloat16 cache (g = 3), a step's 30
 * layers, 2 threads, random block ids, old and new code interleaved in one process on an
 * AVX2 EPYC (Zen 3), two runs: 64 requests x 600 tokens 0.88-0.94x the time, 8 x 1,500
 * 0.86-0.92x, 1 x 576 0.96-0.98x. A float32 cache (nothing to widen) keeps scores8_f32:
 * this measured 0.95-1.10x there. */
static inline __attribute__((always_inline)) void scores4_f32(
    const void *k, int64_t tok, const float *q, const int G, int d, float *s, int64_t s_stride,
    int m, pf_cursor *pc, int share, const int kvb) {
    pf_take(pc, share);
    __m256 a[4][3];
#pragma GCC unroll 4
    for (int t = 0; t < 4; t++)
        for (int j = 0; j < G; j++) a[t][j] = _mm256_setzero_ps();
    for (int c = 0; c < d; c += 8) {
        __m256 qv[3];
        for (int j = 0; j < G; j++) qv[j] = _mm256_loadu_ps(q + j * d + c);
#pragma GCC unroll 4
        for (int t = 0; t < 4; t++) {
            const __m256 kv = kv_load8(k, t * tok + c, kvb);
            for (int j = 0; j < G; j++) a[t][j] = _mm256_fmadd_ps(kv, qv[j], a[t][j]);
        }
    }
    for (int j = 0; j < G; j++) { /* lanes of token t summed into lane t (see hsum8x8_ps) */
        const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[0][j], a[1][j]),
                                        _mm256_hadd_ps(a[2][j], a[3][j]));
        const __m128 r = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        if (m >= 4) {
            _mm_storeu_ps(s + j * s_stride, r);
        } else {
            float tmp[4];
            _mm_storeu_ps(tmp, r);
            memcpy(s + j * s_stride, tmp, sizeof(float) * m);
        }
    }
}

/* accumulate_head for float32 queries with head_dim a multiple of 16 and G <= 6 query
 * heads a kv head: 16 columns at a time, the G x 2 accumulators in registers (all 64 of
 * a head would need 8 G of AVX2's 16). */
static inline __attribute__((always_inline)) void accumulate16_f32(
    const void *v, int64_t stride, int n, const float *p, int64_t p_stride, const int G,
    int d, float *acc, pf_cursor *pc, int share, const int kvb) {
    for (int c = 0; c < d; c += 16) {
        __m256 a[6][2];
#pragma GCC unroll 6
        for (int j = 0; j < G; j++)
            a[j][0] = _mm256_loadu_ps(acc + j * d + c), a[j][1] = _mm256_loadu_ps(acc + j * d + c + 8);
        for (int t = 0; t < n; t++) {
            if (c == 0) pf_take(pc, share);
            const __m256 r0 = kv_load8(v, t * stride + c, kvb),
                         r1 = kv_load8(v, t * stride + c + 8, kvb);
#pragma GCC unroll 6
            for (int j = 0; j < G; j++) {
                const __m256 w = _mm256_broadcast_ss(p + j * p_stride + t);
                a[j][0] = _mm256_fmadd_ps(w, r0, a[j][0]);
                a[j][1] = _mm256_fmadd_ps(w, r1, a[j][1]);
            }
        }
#pragma GCC unroll 6
        for (int j = 0; j < G; j++)
            _mm256_storeu_ps(acc + j * d + c, a[j][0]), _mm256_storeu_ps(acc + j * d + c + 8, a[j][1]);
    }
}
#endif

static inline __attribute__((always_inline)) void accumulate_head_f32(
    const void *v, int64_t stride, int n, const float *p, int64_t p_stride, int g, int d,
    float *acc, pf_cursor *pc, int share, const int kvb) {
#if SPLITSERVE_F32_SIMD
    if (d % 16 == 0) {
        switch (g) {
        case 1: accumulate16_f32(v, stride, n, p, p_stride, 1, d, acc, pc, share, kvb); return;
        case 2: accumulate16_f32(v, stride, n, p, p_stride, 2, d, acc, pc, share, kvb); return;
        case 3: accumulate16_f32(v, stride, n, p, p_stride, 3, d, acc, pc, share, kvb); return;
        case 4: accumulate16_f32(v, stride, n, p, p_stride, 4, d, acc, pc, share, kvb); return;
        case 5: accumulate16_f32(v, stride, n, p, p_stride, 5, d, acc, pc, share, kvb); return;
        case 6: accumulate16_f32(v, stride, n, p, p_stride, 6, d, acc, pc, share, kvb); return;
        default: break;
        }
    }
#endif
    for (int t = 0; t < n; t++)
        for (int j = 0; j < g; j++) {
            const float w = p[j * p_stride + t];
            for (int c = 0; c < d; c++) acc[j * d + c] += w * kv_elem(v, t * stride + c, kvb);
        }
}

/* decode_part for float32 q (no bf16 copy of q) over a cache of kvb-byte elements. */
static inline __attribute__((always_inline)) void decode_part_f32(
    const float *q, const void *layer_k, int64_t block_stride, int64_t v_off,
    const int64_t *table, int64_t t_begin, int64_t t_end, int nkv, int g, int d, int bs,
    float scale, float *s, float *qf, float *m, float *l, float *acc, const int kvb) {
    const int nh = nkv * g;
    table += t_begin / bs;
    const int64_t len = t_end - t_begin;
    const int64_t tok = (int64_t)nkv * d, blk_bytes = (int64_t)bs * tok * KV_ES(kvb);
    const int64_t nblocks = (len + bs - 1) / bs;
    const char *kb = (const char *)layer_k;
    const int64_t sb = block_stride * KV_ES(kvb), vb = v_off * KV_ES(kvb);
    /* a float8 cache reads as FP8_UNIT x its values: q x 256 (exact) makes up for it */
    const float qscale = kvb == 1 ? scale / FP8_UNIT : scale;
    for (int i = 0; i < nh * d; i++) qf[i] = q[i] * qscale;
    const int blk_lines = (int)((blk_bytes + 63) / 64);
    pf_cursor pc = {0, 0};
    for (int64_t i = 0; i < PREFETCH_BLOCKS; i++)
        pf_seek(&pc, kb, table, sb, vb, nblocks, i, blk_bytes);
    for (int64_t b = 0; b < nblocks; b++) {
        const void *k = kv_at(layer_k, table[b] * block_stride, kvb);
        pf_seek(&pc, kb, table, sb, vb, nblocks, b + PREFETCH_BLOCKS, blk_bytes);
        const int64_t t0 = b * bs;
        const int n = (int)(len - t0 < bs ? len - t0 : bs);
#if SPLITSERVE_F32_SIMD
        if (d % 8 == 0 && bs % 8 == 0 && g <= 3 && kvb < 4) {
            const int calls = (bs / 4) * nkv, k_share = (blk_lines + calls - 1) / calls;
            for (int tt = 0; tt < n; tt += 4)
                for (int h = 0; h < nkv; h++) {
                    const void *kh = kv_at(k, tt * tok + h * d, kvb);
                    const float *qh = qf + (int64_t)h * g * d;
                    float *sh = s + (int64_t)h * g * len + t0 + tt;
                    const int m = n - tt;
                    if (g == 1) scores4_f32(kh, tok, qh, 1, d, sh, len, m, &pc, k_share, kvb);
                    else if (g == 2) scores4_f32(kh, tok, qh, 2, d, sh, len, m, &pc, k_share, kvb);
                    else scores4_f32(kh, tok, qh, 3, d, sh, len, m, &pc, k_share, kvb);
                }
            continue;
        }
        if (d % 8 == 0 && bs % 8 == 0) {
            const int calls = (bs / 8) * nkv * g, k_share = (blk_lines + calls - 1) / calls;
            for (int tt = 0; tt < n; tt += 8)
                for (int h = 0; h < nkv; h++)
                    scores8_f32(kv_at(k, tt * tok + h * d, kvb), tok, qf + (int64_t)h * g * d,
                                g, d, s + (int64_t)h * g * len + t0 + tt, len, n - tt, &pc,
                                k_share, kvb);
            continue;
        }
#endif
        for (int t = 0; t < n; t++)
            for (int qh = 0; qh < nh; qh++) {
                const int64_t row = t * tok + (qh / g) * d;
                float dot = 0.f;
                for (int c = 0; c < d; c++) dot += qf[qh * d + c] * kv_elem(k, row + c, kvb);
                s[qh * len + t0 + t] = dot;
            }
    }
    for (int qh = 0; qh < nh; qh++) l[qh] = exp_shifted(s + qh * len, len, &m[qh]);
    memset(acc, 0, sizeof(float) * nh * d);
    for (int64_t b = 0; b < nblocks; b++) {
        const void *v = kv_at(layer_k, table[b] * block_stride + v_off, kvb);
        pf_seek(&pc, kb, table, sb, vb, nblocks, nblocks + b + PREFETCH_BLOCKS, blk_bytes);
        const int64_t t0 = b * bs;
        const int n = (int)(len - t0 < bs ? len - t0 : bs);
        const int v_share = (blk_lines + n * nkv - 1) / (n * nkv);
        for (int h = 0; h < nkv; h++)
            accumulate_head_f32(kv_at(v, h * d, kvb), tok, n, s + (int64_t)h * g * len + t0,
                                len, g, d, acc + h * g * d, &pc, v_share, kvb);
    }
    if (kvb == 1)
        for (int i = 0; i < nh * d; i++) acc[i] *= 1.f / FP8_UNIT;
}

/* The three instantiations: decode_part_f32_kv32 (float32 cache), _kv16 (bfloat16) and
 * _kv8 (float8 e4m3). */
#define DECODE_PART_F32(suffix, kvb)                                                           \
    static void decode_part_f32_##suffix(                                                      \
        const float *q, const void *layer_k, int64_t block_stride, int64_t v_off,              \
        const int64_t *table, int64_t t_begin, int64_t t_end, int nkv, int g, int d, int bs,   \
        float scale, float *s, float *qf, float *m, float *l, float *acc) {                    \
        decode_part_f32(q, layer_k, block_stride, v_off, table, t_begin, t_end, nkv, g, d, bs, \
                        scale, s, qf, m, l, acc, kvb);                                         \
    }
DECODE_PART_F32(kv32, 4)
DECODE_PART_F32(kv16, 2)
DECODE_PART_F32(kv8, 1)

/* ---- both caches ---------------------------------------------------------------------- */

/* out (nh * d, bf16 or float32) = the softmax-weighted V of a request from its parts' states (m, l:
 * nh floats, acc: nh * d floats, each `part_stride` floats apart), rescaled to the largest
 * maximum. */
static void merge_parts(const float *state, int64_t part_stride, int parts, int nh, int d,
                        void *out, int f32) {
    for (int qh = 0; qh < nh; qh++) {
        float big = -INFINITY, total = 0.f;
        for (int p = 0; p < parts; p++) {
            const float mp = state[p * part_stride + qh];
            big = mp > big ? mp : big;
        }
        float w[64];
        for (int p = 0; p < parts; p++) {
            const float *st = state + p * part_stride;
            w[p] = expf(st[qh] - big);
            total += w[p] * st[nh + qh];
        }
        for (int c = 0; c < d; c++) {
            float v = 0.f;
            for (int p = 0; p < parts; p++)
                v += w[p] * state[p * part_stride + 2 * nh + (int64_t)qh * d + c];
            if (f32)
                ((float *)out)[(int64_t)qh * d + c] = v / total;
            else
                ((uint16_t *)out)[(int64_t)qh * d + c] = f32_to_bf16(v / total);
        }
    }
}

/* Which q and cache a call has: bfloat16 both, float32 both, float32 q over a bfloat16 or a
 * float8 e4m3 cache, or bfloat16 q over a float8 cache (q widened to float32 first, then as
 * Q32_KV8, out rounded to bfloat16). */
enum { Q16_KV16, Q32_KV32, Q32_KV16, Q32_KV8, Q16_KV8 };

/* q: [D, nkv * g, d] (bf16 for Q16_KV16 and Q16_KV8, else float32), request r's heads at
 * q + r * q_stride elements, contiguous (query head j of kv head h is h * g + j, HF's
 * grouping); out: [D, nkv * g, d] contiguous, q's type; strides in elements.
 * tables: [D, max_blocks] int64; seq_lens: [D] int64 (tokens incl. this one).
 * Requests are the units split over threads; with fewer requests than threads each is cut
 * into runs of blocks (one a thread, flash-decoding style) whose softmax states merge at
 * the end, so batch-1 decode uses every thread. (Splitting by kv head instead measured
 * slower: each thread then reads a third of every token's row, and DRAM reads whole lines.)
 * Returns 0, -1 when a shape is out of range, -2 when memory runs out. */
static int paged_decode(const void *q, int64_t q_stride, void *out, const void *layer_k,
                        int64_t block_stride, int64_t v_off, const int64_t *tables,
                        int64_t max_blocks, const int64_t *seq_lens, int D, int nkv, int g, int d,
                        int bs, float scale, int num_threads, int mode) {
    const int f32 = mode != Q16_KV16 && mode != Q16_KV8;
    if (D < 0 || g < 1 || nkv < 1 || d < 1 || bs < 1 || max_blocks < 1) return -1;
    int64_t max_len = 0;
    for (int r = 0; r < D; r++) {
        if (seq_lens[r] < 1 || seq_lens[r] > max_blocks * bs) return -1;
        if (seq_lens[r] > max_len) max_len = seq_lens[r];
    }
    if (num_threads < 1) num_threads = 1;
    const int parts = D < num_threads ? (num_threads < 64 ? num_threads : 64) : 1;
    const int64_t nh = (int64_t)nkv * g, units = (int64_t)D * parts;
    const int64_t part_stride = nh * (d + 2); /* m, l, acc */
    float *state = malloc(sizeof(float) * units * part_stride);
    if (!state) return -2;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && units > 1)
    {
        /* scores, q scaled, q as bf16 (Q16_KV16) or q widened (Q16_KV8) */
        float *s = malloc(sizeof(float) * (nh * max_len + 2 * nh * d));
        if (!s) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic)
        for (int64_t u = 0; u < units; u++) {
            if (!s) continue;
            const int64_t r = u / parts, p = u % parts, len = seq_lens[r];
            /* part p's blocks: an even share of the request's, in order */
            const int64_t nblocks = (len + bs - 1) / bs;
            const int64_t b0 = nblocks * p / parts, b1 = nblocks * (p + 1) / parts;
            float *st = state + u * part_stride, *qf = s + nh * max_len;
            const int64_t t0 = b0 * bs, t1 = b1 * bs < len ? b1 * bs : len;
            if (t1 <= t0) { /* no blocks left for this part: it adds nothing */
                for (int64_t i = 0; i < nh; i++) st[i] = -INFINITY, st[nh + i] = 0.f;
                memset(st + 2 * nh, 0, sizeof(float) * nh * d);
                continue;
            }
            const int64_t *table = tables + (int64_t)r * max_blocks;
            if (mode == Q32_KV32)
                decode_part_f32_kv32((const float *)q + r * q_stride, layer_k, block_stride,
                                     v_off, table, t0, t1, nkv, g, d, bs, scale, s, qf, st,
                                     st + nh, st + 2 * nh);
            else if (mode == Q32_KV16)
                decode_part_f32_kv16((const float *)q + r * q_stride, layer_k, block_stride,
                                     v_off, table, t0, t1, nkv, g, d, bs, scale, s, qf, st,
                                     st + nh, st + 2 * nh);
            else if (mode == Q32_KV8)
                decode_part_f32_kv8((const float *)q + r * q_stride, layer_k, block_stride,
                                     v_off, table, t0, t1, nkv, g, d, bs, scale, s, qf, st,
                                     st + nh, st + 2 * nh);
            else if (mode == Q16_KV8) {
                float *qw = qf + nh * d;
                const uint16_t *qr = (const uint16_t *)q + r * q_stride;
                for (int64_t i = 0; i < nh * d; i++) qw[i] = bf16_to_f32(qr[i]);
                decode_part_f32_kv8(qw, layer_k, block_stride, v_off, table, t0, t1, nkv, g, d,
                                    bs, scale, s, qf, st, st + nh, st + 2 * nh);
            }
            else
                decode_part((const uint16_t *)q + r * q_stride, layer_k, block_stride, v_off,
                            table, t0, t1, nkv, g, d, bs, scale, s, qf,
                            (uint16_t *)(qf + nh * d), st, st + nh, st + 2 * nh);
        }
#pragma omp for
        for (int r = 0; r < D; r++)
            merge_parts(state + (int64_t)r * parts * part_stride, part_stride, parts, (int)nh, d,
                        (char *)out + r * nh * d * (f32 ? 4 : 2), f32);
        free(s);
    }
    free(state);
    return failed ? -2 : 0;
}

/* The entry points, one a (q, cache) pair: int splitserve_paged_decode_<name>(const QT *q,
 * int64_t q_stride, QT *out, const KT *layer_k, int64_t block_stride, int64_t v_off,
 * const int64_t *tables, int64_t max_blocks, const int64_t *seq_lens, int D, int nkv,
 * int g, int d, int bs, float scale, int num_threads), as paged_decode above. */
#define PAGED_DECODE_ENTRY(name, QT, KT, mode)                                                 \
    int splitserve_paged_decode_##name(const QT *q, int64_t q_stride, QT *out,                 \
                                       const KT *layer_k, int64_t block_stride, int64_t v_off, \
                                       const int64_t *tables, int64_t max_blocks,              \
                                       const int64_t *seq_lens, int D, int nkv, int g, int d,  \
                                       int bs, float scale, int num_threads) {                 \
        return paged_decode(q, q_stride, out, layer_k, block_stride, v_off, tables,            \
                            max_blocks, seq_lens, D, nkv, g, d, bs, scale, num_threads, mode); \
    }
PAGED_DECODE_ENTRY(bf16, uint16_t, uint16_t, Q16_KV16)
PAGED_DECODE_ENTRY(f32, float, float, Q32_KV32)
/* float32 q and out over a bfloat16 cache (a float32 engine's `--kv-cache-dtype bfloat16`) */
PAGED_DECODE_ENTRY(f32_bf16kv, float, uint16_t, Q32_KV16)
/* ... and over a float8 e4m3 cache (`--kv-cache-dtype fp8`) */
PAGED_DECODE_ENTRY(f32_fp8kv, float, uint8_t, Q32_KV8)
/* bfloat16 q and out over a float8 cache (a bfloat16 engine's `--kv-cache-dtype fp8`) */
PAGED_DECODE_ENTRY(bf16_fp8kv, uint16_t, uint8_t, Q16_KV8)

SPLITSERVE_BF16_PROBE(paged_decode)
SPLITSERVE_F32_PROBE(paged_decode)

/* out[i] = x[i] rounded to float8 e4m3 as a float8 cache stores it (fp8.h: saturated at
 * +-448, then to nearest even), for tests against torch's rounding. */
void splitserve_round_fp8_e4m3(const float *x, uint8_t *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = f32_to_fp8_e4m3(x[i]);
}

/* This step's k and v rows into the cache: token t's kv heads go to block slot_block[t],
 * row slot_offset[t] of the layer (layer_k: the layer's K of block 0; V is v_off further).
 * k, v rows: `row` elements of `elem` bytes each (2: bf16, 4: float32), k_stride /
 * v_stride elements apart; strides in elements. One call instead of two indexed copies a
 * layer (~13 us of torch dispatch at decode). Returns 0, or -1 (nothing written) when a
 * slot is outside the cache. */
int splitserve_write_kv(void *layer_k, int64_t block_stride, int64_t v_off, int64_t num_blocks,
                        int bs, const void *k, int64_t k_stride, const void *v, int64_t v_stride,
                        const int64_t *slot_block, const int64_t *slot_offset, int64_t T,
                        int64_t row, int elem) {
    for (int64_t t = 0; t < T; t++)
        if (slot_block[t] < 0 || slot_block[t] >= num_blocks || slot_offset[t] < 0 ||
            slot_offset[t] >= bs)
            return -1;
    char *base = layer_k;
    for (int64_t t = 0; t < T; t++) {
        char *dst = base + (slot_block[t] * block_stride + slot_offset[t] * row) * elem;
        memcpy(dst, (const char *)k + t * k_stride * elem, (size_t)(row * elem));
        memcpy(dst + v_off * elem, (const char *)v + t * v_stride * elem, (size_t)(row * elem));
    }
    return 0;
}
