/* Paged prefill attention on CPU, bfloat16 cache (float32: see "float32 cache" below): one
 * prefill chunk of one layer, causal, K and V read straight from the paged KV cache (no
 * gathered copy), flash-attention style (online softmax in float32, no [q_len, ctx] score
 * matrix).
 *
 * Built and loaded by engine/native.py (plain C, no Python or torch headers: it is called
 * through ctypes with tensor data pointers).
 *
 * Layout (the engine's): cache[num_blocks, layers, 2, block_size, kv_heads, head_dim]. The
 * caller passes a pointer to this layer's K of block 0, the stride between blocks and the
 * offset from K to V inside a block, in elements. The chunk's q_len queries sit at
 * positions ctx - q_len .. ctx - 1 and every one of the ctx keys (the chunk's own
 * included) is already in the cache.
 *
 * Work unit (split over OpenMP threads, longest first): one kv head x one tile of query
 * positions (16; 32 or 48 for groups of 2 or 1), the tile's rows being every query head of
 * that kv head's group at those positions (M = 16 x g rows or more), so each K and V tile
 * read from the cache serves the whole group. For each tile of up to 128 keys, from key 0
 * to the tile's last visible key:
 *
 *   S^T = K Q^T   [keys][M rows]: rows are the 16 lanes of a vector, so Q is packed once a
 *                 tile into bfloat16 pairs ([head_dim / 2][M][2], the operand layout of
 *                 _mm512_dpbf16_ps) and each K pair is broadcast straight from the cache:
 *                 K needs no packing, and the softmax's row maxima and sums are lane-wise,
 *                 never horizontal. 8 keys x 3 row vectors = 24 accumulators. The causal
 *                 mask (only on tiles crossing the diagonal) and the row maxima are applied
 *                 as the scores leave registers;
 *   online softmax in float32, the scale applied in float32 (not folded into bf16 q);
 *                 P = 2^(...) to bf16 precision (exp2_bf16grade), rounded to bf16 and packed
 *                 in key pairs ([keys / 2][M][2]); each row's sum adds the rounded values,
 *                 so the output is a convex combination of the V rows it used;
 *   O = O * alpha + P V   [M][head_dim] float32 accumulators in scratch, 6 rows x 64
 *                 columns in registers at a time; V is packed into key pairs
 *                 ([keys / 2][head_dim][2], 3 instructions per 16 pairs) and P pairs are
 *                 broadcast.
 *
 * Measured on a Zen 4 core (SmolLM2-135M's 9 heads over 3 kv heads, head_dim 64, a
 * 1,024-token prompt, one layer): ~7.4 ms, ~160 GFLOPS a thread (torch's SDPA: ~26 ms),
 * ~300 GFLOPS on 2 threads. Zen 4 runs one 512-bit dot product a cycle (~230 GFLOPS); the
 * two dot-product loops take ~70% of the time and run at about that rate, the exponentials
 * ~13%, packing and tile set-up the rest.
 *
 * Without AVX512-BF16, or for a head_dim that is not a multiple of 16, a scalar path gives
 * the same results (float32 throughout, slower than torch).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "bf16.h"
#include "simd.h"

#define BK 128 /* keys per tile (64: ~2% slower at 1k tokens) */
#define QK_KEYS 8 /* keys per S^T register block (x up to 3 row vectors = 24 accumulators) */
#define PV_ROWS 6 /* rows per O register block (x up to 4 vectors of 16 columns) */

typedef struct {
    const uint16_t *q;
    int64_t q_stride;
    uint16_t *out;
    int64_t out_stride;
    const uint16_t *layer_k;
    const float *qf, *layer_kf; /* the same for a float32 cache (then q, out, layer_k unused) */
    float *outf;
    int64_t block_stride, v_off;
    const int64_t *table;
    int64_t q_len, ctx;
    int nkv, g, d, bs, bq;
    float scale;
} prefill_args;

/* Scratch arenas: each piece taken from the arena at p, the next one kept 64-byte aligned. */
static inline void *take(char **p, size_t bytes) {
    void *piece = *p;
    *p += (bytes + 63) / 64 * 64;
    return piece;
}
#define TAKE(field, type, count) (w->field = (type)take(&p, (size_t)(count)))

/* Element i of a bf16 (f32 == 0) or float32 (f32 == 1) array, as float32. */
static inline float elem(const void *p, int64_t i, int f32) {
    return f32 ? ((const float *)p)[i] : bf16_to_f32(((const uint16_t *)p)[i]);
}

/* Key row t of kv head h (its V row v_off elements further), in either cache. */
static inline const void *key_row(const prefill_args *a, int h, int64_t t, int f32) {
    const int64_t off = a->table[t / a->bs] * a->block_stride +
                        (t % a->bs) * (int64_t)a->nkv * a->d + (int64_t)h * a->d;
    return f32 ? (const void *)(a->layer_kf + off) : (const void *)(a->layer_k + off);
}

/* Scalar path, either cache: each query row scores its visible keys, softmax, weighted V
 * rows. s: ctx floats, acc: d floats of scratch. */
static void tile_scalar(const prefill_args *a, int h, int64_t i0, float *s, float *acc, int f32) {
    const int g = a->g, d = a->d, es = f32 ? 4 : 2;
    const int64_t start = a->ctx - a->q_len;
    const int64_t nq = a->q_len - i0 < a->bq ? a->q_len - i0 : a->bq;
    const char *qbase = f32 ? (const char *)a->qf : (const char *)a->q;
    char *obase = f32 ? (char *)a->outf : (char *)a->out;
    for (int64_t p = 0; p < nq; p++) {
        const int64_t pos = start + i0 + p;
        for (int j = 0; j < g; j++) {
            const int64_t row = (i0 + p), col = (int64_t)(h * g + j) * d;
            const void *q = qbase + (row * a->q_stride + col) * es;
            float m = -INFINITY, sum = 0.f;
            for (int64_t t = 0; t <= pos; t++) {
                const void *k = key_row(a, h, t, f32);
                float dot = 0.f;
                for (int c = 0; c < d; c++) dot += elem(q, c, f32) * elem(k, c, f32);
                s[t] = dot * a->scale;
                m = s[t] > m ? s[t] : m;
            }
            memset(acc, 0, sizeof(float) * d);
            for (int64_t t = 0; t <= pos; t++) {
                const float w = expf(s[t] - m);
                const char *v = (const char *)key_row(a, h, t, f32) + a->v_off * es;
                sum += w;
                for (int c = 0; c < d; c++) acc[c] += w * elem(v, c, f32);
            }
            char *o = obase + (row * a->out_stride + col) * es;
            for (int c = 0; c < d; c++) {
                if (f32)
                    ((float *)o)[c] = acc[c] / sum;
                else
                    ((uint16_t *)o)[c] = f32_to_bf16(acc[c] / sum);
            }
        }
    }
}

#if defined(__AVX512BF16__)
/* Per-thread scratch of the vector path. */
typedef struct {
    uint32_t *qrows; /* [M][d/2] Q rows as loaded */
    uint32_t *qp;  /* [d/2][M] Q pairs */
    float *s;      /* [BK][M] scores, S^T */
    uint32_t *pp;  /* [BK/2][M] P pairs */
    uint32_t *vp;  /* [BK/2][d] V pairs */
    float *o;      /* [M][d] output accumulators */
    float *m, *l, *alpha; /* [M] running max, running sum, this tile's rescale */
    float *tmax;          /* [M] this tile's maxima */
    __m512i *qpos;        /* [M / 16] row positions relative to the tile */
    const uint16_t **krow, **vrow; /* [BK] */
    uint16_t *zero; /* d zero bf16: the rows past a tile's last key */
} vec_scratch;

/* Scores of a masked (query, key) pair, or of a padding key: finite, so that 2^(s - max)
 * underflows to exactly 0 without producing inf - inf. */
#define MASKED_SCORE (-1e30f)

/* s[k][v * 16 + lane] = dot(Q row, K row k) for QK_KEYS keys (kb .. kb + 7 of the tile) x RV
 * row vectors; keys at or past n, and on a tile crossing the diagonal keys after a row's
 * position (qpos[v], relative to the tile), get MASKED_SCORE. tmax[v] takes the maxima. */
static inline __attribute__((always_inline)) void qk_block(const uint32_t *qp, int M,
                                                           const uint16_t *const *krow,
                                                           int pairs, float *s, float *tmax,
                                                           const __m512i *qpos, int kb, int n,
                                                           int masked, const int RV) {
    __m512 acc[3][QK_KEYS];
#pragma GCC unroll 3
    for (int v = 0; v < RV; v++)
#pragma GCC unroll 8
        for (int k = 0; k < QK_KEYS; k++) acc[v][k] = _mm512_setzero_ps();
    const uint16_t *k0 = krow[0], *k1 = krow[1], *k2 = krow[2], *k3 = krow[3], *k4 = krow[4],
                   *k5 = krow[5], *k6 = krow[6], *k7 = krow[7];
    for (int c = 0; c < pairs; c++) {
        __m512bh q[3];
#pragma GCC unroll 3
        for (int v = 0; v < RV; v++) q[v] = (__m512bh)_mm512_loadu_si512(qp + c * M + v * 16);
        const uint16_t *kr[QK_KEYS] = {k0, k1, k2, k3, k4, k5, k6, k7};
#pragma GCC unroll 8
        for (int k = 0; k < QK_KEYS; k++) {
            int32_t pair;
            memcpy(&pair, kr[k] + 2 * c, sizeof pair);
            __m512bh kb = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 3
            for (int v = 0; v < RV; v++) acc[v][k] = _mm512_dpbf16_ps(acc[v][k], q[v], kb);
        }
    }
    const int edge = masked || kb + QK_KEYS > n;
    const __m512 neg = _mm512_set1_ps(MASKED_SCORE);
#pragma GCC unroll 3
    for (int v = 0; v < RV; v++) {
        __m512 mx = _mm512_loadu_ps(tmax + v * 16);
#pragma GCC unroll 8
        for (int k = 0; k < QK_KEYS; k++) {
            __m512 x = acc[v][k];
            if (edge) {
                __mmask16 ok = kb + k < n ? (__mmask16)0xffff : (__mmask16)0;
                if (masked) ok &= _mm512_cmple_epi32_mask(_mm512_set1_epi32(kb + k), qpos[v]);
                x = _mm512_mask_mov_ps(neg, ok, x);
            }
            _mm512_storeu_ps(s + k * M + v * 16, x);
            mx = _mm512_max_ps(mx, x);
        }
        _mm512_storeu_ps(tmax + v * 16, mx);
    }
}

/* o[r][:DV*16] = o[r] * alpha[r] + sum over key pairs of P pair x V pair, for R rows. The V
 * vectors are pinned in registers (GCC otherwise reloads them for every row, and on Zen 4
 * a 512-bit load costs a cycle of load bandwidth, as much as the dot product it feeds). */
static inline __attribute__((always_inline)) void pv_block(const uint32_t *pp, int M,
                                                           const uint32_t *vp, int d, int kpairs,
                                                           float *o, const float *alpha,
                                                           const int R, const int DV) {
    __m512 acc[PV_ROWS][4];
#pragma GCC unroll 6
    for (int r = 0; r < R; r++) {
        const __m512 a = _mm512_set1_ps(alpha[r]);
#pragma GCC unroll 4
        for (int v = 0; v < DV; v++) acc[r][v] = _mm512_mul_ps(_mm512_loadu_ps(o + r * d + v * 16), a);
    }
    for (int kp = 0; kp < kpairs; kp++) {
        __m512i vv[4];
#pragma GCC unroll 4
        for (int v = 0; v < DV; v++) {
            vv[v] = _mm512_loadu_si512(vp + kp * d + v * 16);
            __asm__("" : "+v"(vv[v]));
        }
        const uint32_t *pk = pp + kp * M;
#pragma GCC unroll 6
        for (int r = 0; r < R; r++) {
            __m512bh pb = (__m512bh)_mm512_set1_epi32((int32_t)pk[r]);
#pragma GCC unroll 4
            for (int v = 0; v < DV; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)vv[v], pb);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int v = 0; v < DV; v++) _mm512_storeu_ps(o + r * d + v * 16, acc[r][v]);
}

/* pv_block for R = 6, 4 or 2 rows and DV = 1..4 vectors of 16 columns. */
static void pv_dispatch(const uint32_t *pp, int M, const uint32_t *vp, int d, int kpairs,
                        float *o, const float *alpha, int R, int DV) {
#define PV_CASE(r, dv)                                                                            \
    if (R == r && DV == dv) {                                                                     \
        pv_block(pp, M, vp, d, kpairs, o, alpha, r, dv);                                          \
        return;                                                                                   \
    }
    PV_CASE(6, 4) PV_CASE(6, 3) PV_CASE(6, 2) PV_CASE(6, 1)
    PV_CASE(4, 4) PV_CASE(4, 3) PV_CASE(4, 2) PV_CASE(4, 1)
    PV_CASE(2, 4) PV_CASE(2, 3) PV_CASE(2, 2) PV_CASE(2, 1)
#undef PV_CASE
}

/* 2^x to ~5e-6 relative (x <= 0 here; exactly 0 far below, as for MASKED_SCORE): 2^n * p(f),
 * f = x - n in [-1/2, 1/2], p a degree-4 least-squares fit of 2^f. 7 instructions where
 * exp_avx512 takes 12: the probabilities are rounded to bf16 (2^-9 relative) right after,
 * so its extra digits were never kept. */
static inline __m512 exp2_bf16grade(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.009554104879498482f), f,
                               _mm512_set1_ps(0.055870410054922104f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2402469664812088f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931280493736267f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.999999463558197f));
    return _mm512_scalef_ps(p, n);
}

/* 16 bf16 of a and of b → 16 (a, b) pairs. */
static inline __m512i pair16(__m256i a, __m256i b) {
    return _mm512_or_si512(_mm512_cvtepu16_epi32(a),
                           _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

/* One kv head h, query rows i0 .. i0 + bq - 1 (those past q_len are padding: zero q, no
 * output). Row r = j * bq + p is query head h * g + j at position start + i0 + p. */
static void tile_vec(const prefill_args *a, int h, int64_t i0, vec_scratch *w) {
    const int g = a->g, d = a->d, bq = a->bq, M = g * bq, NV = M / 16, dp = d / 2;
    const int64_t start = a->ctx - a->q_len;
    const int64_t nq = a->q_len - i0 < bq ? a->q_len - i0 : bq;
    const int64_t pmin = start + i0, kmax = start + i0 + nq - 1; /* last key any row sees */
    const float scale = a->scale;
    const int64_t tok = (int64_t)a->nkv * d, hd = (int64_t)h * d;

    /* Q rows copied with vector loads first, then transposed into pairs from L1 (the rows
     * are strided in the caller's qkv rows and often not in cache: a scalar gather kept few
     * misses in flight and took ~7% of the time, measured). */
    uint32_t *restrict qrows = w->qrows, *restrict qp = w->qp;
    for (int j = 0; j < g; j++)
        for (int p = 0; p < bq; p++) {
            uint32_t *dst = qrows + (j * bq + p) * dp;
            if (p < nq) {
                const uint16_t *q = a->q + (i0 + p) * a->q_stride + (int64_t)(h * g + j) * d;
                for (int c = 0; c < d; c += 16)
                    _mm256_storeu_si256((__m256i *)((uint16_t *)dst + c),
                                        _mm256_loadu_si256((const __m256i *)(q + c)));
            } else {
                memset(dst, 0, sizeof(uint16_t) * d);
            }
        }
    for (int c = 0; c < dp; c++)
        for (int r = 0; r < M; r++) qp[c * M + r] = qrows[r * dp + c];
    for (int r = 0; r < M; r++) {
        w->m[r] = -INFINITY;
        w->l[r] = 0.f;
    }
    memset(w->o, 0, sizeof(float) * M * d);

    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 vscale = _mm512_set1_ps(scale);
    const __m512 vscale2 = _mm512_set1_ps(scale * 1.44269504088896341f);
    const __m512i hi16 = _mm512_set1_epi32((int32_t)0xffff0000u);
    const __m512i interleave = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
        23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    __m512i *qpos = w->qpos;
    for (int64_t k0 = 0; k0 <= kmax; k0 += BK) {
        const int n = (int)(kmax + 1 - k0 < BK ? kmax + 1 - k0 : BK);
        const int n8 = (n + QK_KEYS - 1) / QK_KEYS * QK_KEYS, npairs = (n + 1) / 2;
        {
            int64_t b = k0 / a->bs;
            int off = (int)(k0 % a->bs);
            for (int k = 0; k < n8; k++) {
                if (k < n) {
                    w->krow[k] = a->layer_k + a->table[b] * a->block_stride + off * tok + hd;
                    w->vrow[k] = w->krow[k] + a->v_off;
                    if (++off == a->bs) {
                        off = 0;
                        b++;
                    }
                } else {
                    w->krow[k] = w->vrow[k] = w->zero;
                }
            }
        }

        /* S^T = K Q^T, masked, with each row's maximum over the tile */
        const int masked = k0 + n - 1 > pmin;
        for (int v = 0; v < NV; v++) {
            /* Query positions of this vector's 16 rows, relative to k0. */
            qpos[v] = _mm512_add_epi32(
                lane, _mm512_set1_epi32((int32_t)(pmin - k0 + (v % (bq / 16)) * 16)));
            _mm512_storeu_ps(w->tmax + v * 16, _mm512_set1_ps(MASKED_SCORE));
        }
        for (int v0 = 0; v0 < NV; v0 += 3) {
            const int rv = NV - v0 < 3 ? NV - v0 : 3;
            for (int kb = 0; kb < n8; kb += QK_KEYS) {
                float *s = w->s + kb * M + v0 * 16, *tmax = w->tmax + v0 * 16;
                const uint32_t *qp = w->qp + v0 * 16;
                const uint16_t *const *kr = w->krow + kb;
                const __m512i *qv = qpos + v0;
                if (rv == 3) qk_block(qp, M, kr, dp, s, tmax, qv, kb, n, masked, 3);
                else if (rv == 2) qk_block(qp, M, kr, dp, s, tmax, qv, kb, n, masked, 2);
                else qk_block(qp, M, kr, dp, s, tmax, qv, kb, n, masked, 1);
            }
        }

        /* Online softmax, lane-wise per row. */
        for (int v = 0; v < NV; v++) {
            const __m512 mx = _mm512_loadu_ps(w->tmax + v * 16);
            const __m512 m_old = _mm512_loadu_ps(w->m + v * 16);
            const __m512 m_new = _mm512_max_ps(m_old, mx);
            /* p = 2^(s * scale * log2 e - m * scale * log2 e): one fmsub and exp2 */
            const __m512 ms = _mm512_mul_ps(m_new, vscale2);
            _mm512_storeu_ps(w->alpha + v * 16,
                             exp_avx512(_mm512_mul_ps(_mm512_sub_ps(m_old, m_new), vscale)));
            _mm512_storeu_ps(w->m + v * 16, m_new);
            __m512 sum = _mm512_setzero_ps();
            for (int kp = 0; kp < npairs; kp++) {
                const int k = 2 * kp;
                const __m512 s0 = _mm512_loadu_ps(w->s + k * M + v * 16);
                const __m512 s1 = _mm512_loadu_ps(w->s + (k + 1) * M + v * 16);
                const __m512 p0 = exp2_bf16grade(_mm512_fmsub_ps(s0, vscale2, ms));
                const __m512 p1 = exp2_bf16grade(_mm512_fmsub_ps(s1, vscale2, ms));
                /* 32 bf16 [p0 | p1] interleaved into (p0, p1) pairs: lane r holds row r's */
                const __m512i pr = _mm512_permutexvar_epi16(
                    interleave, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
                _mm512_storeu_si512(w->pp + kp * M + v * 16, pr);
                /* the row sums add the rounded probabilities */
                sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(pr, 16)));
                sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_and_si512(pr, hi16)));
            }
            const __m512 alpha = _mm512_loadu_ps(w->alpha + v * 16);
            _mm512_storeu_ps(w->l + v * 16, _mm512_fmadd_ps(_mm512_loadu_ps(w->l + v * 16), alpha, sum));
        }

        /* V pairs; a tile of odd length pairs its last key with the zero row. */
        for (int kp = 0; kp < npairs; kp++) {
            const uint16_t *va = w->vrow[2 * kp], *vb = w->vrow[2 * kp + 1];
            for (int c = 0; c < d; c += 16)
                _mm512_storeu_si512(w->vp + kp * d + c,
                                    pair16(_mm256_loadu_si256((const __m256i *)(va + c)),
                                           _mm256_loadu_si256((const __m256i *)(vb + c))));
        }

        /* O = O * alpha + P V (M is a multiple of 16: row blocks of 6, then 4 or 2) */
        for (int r0 = 0; r0 < M; r0 += PV_ROWS) {
            const int R = M - r0 < PV_ROWS ? M - r0 : PV_ROWS;
            for (int c0 = 0; c0 < d; c0 += 64)
                pv_dispatch(w->pp + r0, M, w->vp + c0, d, npairs, w->o + r0 * d + c0,
                            w->alpha + r0, R, (d - c0) / 16 < 4 ? (d - c0) / 16 : 4);
        }
    }

    for (int j = 0; j < g; j++)
        for (int p = 0; p < nq; p++) {
            const int r = j * bq + p;
            const __m512 inv = _mm512_set1_ps(1.f / w->l[r]);
            uint16_t *o = a->out + (i0 + p) * a->out_stride + (int64_t)(h * g + j) * d;
            for (int c = 0; c < d; c += 16)
                store_bf16x16(o + c, _mm512_mul_ps(_mm512_loadu_ps(w->o + r * d + c), inv));
        }
}

static void *vec_scratch_alloc(vec_scratch *w, int M, int d) {
    const size_t bytes = 2 * sizeof(uint32_t) * (size_t)(d / 2) * M + sizeof(float) * BK * M +
                         sizeof(uint32_t) * (BK / 2) * M + sizeof(uint32_t) * (BK / 2) * d +
                         sizeof(float) * (size_t)M * d + sizeof(float) * 5 * M +
                         sizeof(uint16_t *) * 2 * BK + sizeof(uint16_t) * d + 64 * 14;
    char *base = aligned_alloc(64, (bytes + 63) / 64 * 64), *p = base;
    if (!base) return NULL;
    TAKE(qrows, uint32_t *, sizeof(uint32_t) * (size_t)(d / 2) * M);
    TAKE(qp, uint32_t *, sizeof(uint32_t) * (size_t)(d / 2) * M);
    TAKE(s, float *, sizeof(float) * BK * M);
    TAKE(pp, uint32_t *, sizeof(uint32_t) * (BK / 2) * M);
    TAKE(vp, uint32_t *, sizeof(uint32_t) * (BK / 2) * d);
    TAKE(o, float *, sizeof(float) * (size_t)M * d);
    TAKE(m, float *, sizeof(float) * M);
    TAKE(l, float *, sizeof(float) * M);
    TAKE(alpha, float *, sizeof(float) * M);
    TAKE(tmax, float *, sizeof(float) * M);
    TAKE(qpos, __m512i *, sizeof(float) * M);
    TAKE(krow, const uint16_t **, sizeof(uint16_t *) * BK);
    TAKE(vrow, const uint16_t **, sizeof(uint16_t *) * BK);
    TAKE(zero, uint16_t *, sizeof(uint16_t) * d);
    memset(w->zero, 0, sizeof(uint16_t) * d);
    return base;
}
#endif

/* ---- float32 cache ------------------------------------------------------------------ */

#if SPLITSERVE_F32_SIMD
/* The float32 vector path (AVX2 + FMA), the bf16 one's plan in 8-lane vectors: a tile is
 * one kv head x bq query positions, its M = g x bq rows (query heads x positions, row
 * r = j * bq + p) the lanes of MP / 8 row vectors, M ~ F32_ROWS.
 *   S^T = K Q^T: Q packed once a tile as [d][MP]; each K value broadcast straight from the
 *     cache; F32_KEYS keys x 3 row vectors = 12 accumulators (AVX2 has 16 registers);
 *   online softmax lane-wise in float32 (scale on the scores, as torch's SDPA), masked
 *     scores exactly 0 after the exponential;
 *   O = O * alpha + P V: [M][d] accumulators in scratch, PV_RB rows x 8 PV_CV columns in
 *     registers at a time, V rows read straight from the cache, P values broadcast.
 * One layer of a SmolLM2 prompt (9 heads over 3 kv heads, head_dim 64) against torch's
 * SDPA on an AVX2-only EPYC (Zen 3), best of 4, 1 / 2 threads: 512 tokens 1.7x / 2.3x,
 * 1,024 1.3x / 1.2x, 2,048 1.2x / 1.3x (~35-40 GFLOPS a thread; the host is noisy). The
 * two FMA loops are load-bound (each FMA takes a Q vector from L1), then the
 * exponentials. */
#define F32_ROWS 48 /* rows a tile aims at (24: slower from ~1k tokens, more K/V re-reads) */
#define F32_KEYS 4  /* keys per S^T register block (x up to 3 row vectors = 12 accumulators) */
#define PV_RB 4     /* rows per O register block ... */
#define PV_CV 2     /* ... x vectors of 8 columns (3 x 4 spilled registers: slower) */
/* A masked score (finite: the running max never meets inf - inf); its weight is set to 0. */
#define F32_MASKED (-1e30f)

typedef struct {
    float *qp;            /* [d][MP] Q^T */
    float *s;             /* [BK][MP] scores, then P */
    float *o;             /* [M][d] output accumulators */
    float *m, *l, *alpha; /* [MP] running max, running sum, this tile's rescale */
    int32_t *qpos;        /* [MP] row positions relative to the tile's first */
    const float **krow;   /* [BK + F32_KEYS] K rows of the key tile (then a zero row) */
    float *zero;          /* d zeros */
} f32_scratch;

static void *f32_scratch_alloc(f32_scratch *w, int M, int d) {
    const int MP = (M + 7) / 8 * 8;
    const size_t floats = (size_t)d * MP + (size_t)BK * MP + (size_t)M * d + 3 * (size_t)MP + d;
    const size_t bytes = sizeof(float) * floats + sizeof(int32_t) * MP +
                         sizeof(float *) * (BK + F32_KEYS) + 64 * 9;
    char *base = aligned_alloc(64, (bytes + 63) / 64 * 64), *p = base;
    if (!base) return NULL;
    TAKE(qp, float *, sizeof(float) * (size_t)d * MP);
    TAKE(s, float *, sizeof(float) * (size_t)BK * MP);
    TAKE(o, float *, sizeof(float) * (size_t)M * d);
    TAKE(m, float *, sizeof(float) * MP);
    TAKE(l, float *, sizeof(float) * MP);
    TAKE(alpha, float *, sizeof(float) * MP);
    TAKE(qpos, int32_t *, sizeof(int32_t) * MP);
    TAKE(krow, const float **, sizeof(float *) * (BK + F32_KEYS));
    TAKE(zero, float *, sizeof(float) * d);
    memset(w->zero, 0, sizeof(float) * d);
    return base;
}

/* s[k][v * 8 + lane] = dot(Q row, K row k) for F32_KEYS keys from kb and RV row vectors
 * from v0. */
static inline __attribute__((always_inline)) void qk_f32(const float *qp, int MP,
                                                        const float *const *krow, int d,
                                                        float *s, int kb, int v0, const int RV) {
    __m256 acc[F32_KEYS][3];
    const float *k[F32_KEYS];
#pragma GCC unroll 4
    for (int t = 0; t < F32_KEYS; t++) {
        k[t] = krow[kb + t];
        for (int v = 0; v < RV; v++) acc[t][v] = _mm256_setzero_ps();
    }
    for (int c = 0; c < d; c++) {
        __m256 qv[3];
        for (int v = 0; v < RV; v++) qv[v] = _mm256_load_ps(qp + c * MP + (v0 + v) * 8);
#pragma GCC unroll 4
        for (int t = 0; t < F32_KEYS; t++) {
            const __m256 kv = _mm256_broadcast_ss(k[t] + c);
            for (int v = 0; v < RV; v++) acc[t][v] = _mm256_fmadd_ps(kv, qv[v], acc[t][v]);
        }
    }
#pragma GCC unroll 4
    for (int t = 0; t < F32_KEYS; t++)
        for (int v = 0; v < RV; v++) _mm256_store_ps(s + (kb + t) * MP + (v0 + v) * 8, acc[t][v]);
}

/* o[r][c0 ..] (RB rows from r0, CV vectors of 8 columns) = o * alpha[r] + sum over the n
 * keys of P[k][r] V[k][c0 ..], V rows at krow[k] + v_off. */
static inline __attribute__((always_inline)) void pv_f32(float *o, int d, const float *p, int MP,
                                                        const float *alpha,
                                                        const float *const *krow,
                                                        int64_t v_off, int n, int r0, int c0,
                                                        const int RB, const int CV) {
    __m256 acc[PV_RB][4];
    for (int r = 0; r < RB; r++) {
        const __m256 al = _mm256_broadcast_ss(alpha + r0 + r);
        for (int c = 0; c < CV; c++)
            acc[r][c] = _mm256_mul_ps(_mm256_loadu_ps(o + (r0 + r) * d + c0 + 8 * c), al);
    }
    for (int k = 0; k < n; k++) {
        const float *v = krow[k] + v_off + c0;
        __m256 vv[4];
        for (int c = 0; c < CV; c++) vv[c] = _mm256_loadu_ps(v + 8 * c);
        for (int r = 0; r < RB; r++) {
            const __m256 pb = _mm256_broadcast_ss(p + k * MP + r0 + r);
            for (int c = 0; c < CV; c++) acc[r][c] = _mm256_fmadd_ps(pb, vv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < RB; r++)
        for (int c = 0; c < CV; c++) _mm256_storeu_ps(o + (r0 + r) * d + c0 + 8 * c, acc[r][c]);
}

static void tile_f32(const prefill_args *a, int h, int64_t i0, f32_scratch *w) {
    const int g = a->g, d = a->d, bq = a->bq, M = g * bq, MP = (M + 7) / 8 * 8, NV = MP / 8;
    const int64_t start = a->ctx - a->q_len;
    const int64_t nq = a->q_len - i0 < bq ? a->q_len - i0 : bq;
    const int64_t pmin = start + i0, kmax = start + i0 + nq - 1; /* last key any row sees */
    float *restrict qp = w->qp, *restrict s = w->s;
    /* Q^T, rows past the chunk (and past M) zero; their positions: the last real row's. */
    memset(qp, 0, sizeof(float) * (size_t)d * MP);
    for (int r = 0; r < MP; r++) {
        const int j = r / bq, p = r % bq;
        w->qpos[r] = r < M && p < nq ? p : (int32_t)(nq - 1);
        w->m[r] = F32_MASKED;
        w->l[r] = 0.f;
        if (r >= M || p >= nq) continue;
        const float *q = a->qf + (i0 + p) * a->q_stride + (int64_t)(h * g + j) * d;
        for (int c = 0; c < d; c++) qp[c * MP + r] = q[c];
    }
    memset(w->o, 0, sizeof(float) * (size_t)M * d);
    const int64_t tok = (int64_t)a->nkv * d, hd = (int64_t)h * d;
    const __m256 vscale = _mm256_set1_ps(a->scale), masked = _mm256_set1_ps(F32_MASKED);
    for (int64_t k0 = 0; k0 <= kmax; k0 += BK) {
        const int n = (int)(kmax + 1 - k0 < BK ? kmax + 1 - k0 : BK);
        const int nk = (n + F32_KEYS - 1) / F32_KEYS * F32_KEYS;
        {
            int64_t b = k0 / a->bs;
            int off = (int)(k0 % a->bs);
            for (int k = 0; k < n; k++) {
                w->krow[k] = a->layer_kf + a->table[b] * a->block_stride + off * tok + hd;
                if (++off == a->bs) off = 0, b++;
            }
            for (int k = n; k < nk; k++) w->krow[k] = w->zero;
        }
        for (int kb = 0; kb < nk; kb += F32_KEYS) {
            int v = 0;
            for (; v + 3 <= NV; v += 3) qk_f32(qp, MP, w->krow, d, s, kb, v, 3);
            if (NV - v == 2) qk_f32(qp, MP, w->krow, d, s, kb, v, 2);
            else if (NV - v == 1) qk_f32(qp, MP, w->krow, d, s, kb, v, 1);
        }
        /* scale, causal mask (a tile crossing the diagonal), online softmax per lane */
        const int diag = k0 + n - 1 > pmin;
        for (int v = 0; v < NV; v++) {
            const __m256i qpos = _mm256_loadu_si256((const __m256i *)(w->qpos + v * 8));
            __m256 tmax = masked;
            for (int k = 0; k < n; k++) {
                __m256 x = _mm256_mul_ps(_mm256_load_ps(s + k * MP + v * 8), vscale);
                if (diag) {
                    const __m256i rel = _mm256_set1_epi32((int32_t)(k0 + k - pmin));
                    x = _mm256_blendv_ps(x, masked,
                                         _mm256_castsi256_ps(_mm256_cmpgt_epi32(rel, qpos)));
                }
                _mm256_store_ps(s + k * MP + v * 8, x);
                tmax = _mm256_max_ps(tmax, x);
            }
            const __m256 m_old = _mm256_load_ps(w->m + v * 8), m_new = _mm256_max_ps(m_old, tmax);
            __m256 sum = _mm256_setzero_ps();
            const __m256 floor = _mm256_set1_ps(F32_MASKED * 0.5f);
            for (int k = 0; k < n; k++) {
                const __m256 x = _mm256_load_ps(s + k * MP + v * 8);
                __m256 e = exp_avx2(_mm256_sub_ps(x, m_new));
                e = _mm256_and_ps(e, _mm256_cmp_ps(x, floor, _CMP_GT_OQ)); /* masked: 0 */
                _mm256_store_ps(s + k * MP + v * 8, e);
                sum = _mm256_add_ps(sum, e);
            }
            const __m256 alpha = exp_avx2(_mm256_sub_ps(m_old, m_new));
            _mm256_store_ps(w->alpha + v * 8, alpha);
            _mm256_store_ps(w->l + v * 8,
                            _mm256_add_ps(_mm256_mul_ps(_mm256_load_ps(w->l + v * 8), alpha), sum));
            _mm256_store_ps(w->m + v * 8, m_new);
        }
        /* O = O * alpha + P V */
        int r0 = 0;
        for (; r0 + PV_RB <= M; r0 += PV_RB) {
            int c0 = 0;
            for (; c0 + 8 * PV_CV <= d; c0 += 8 * PV_CV)
                pv_f32(w->o, d, s, MP, w->alpha, w->krow, a->v_off, n, r0, c0, PV_RB, PV_CV);
            for (; c0 < d; c0 += 8)
                pv_f32(w->o, d, s, MP, w->alpha, w->krow, a->v_off, n, r0, c0, PV_RB, 1);
        }
        for (; r0 < M; r0++) {
            int c0 = 0;
            for (; c0 + 8 * PV_CV <= d; c0 += 8 * PV_CV)
                pv_f32(w->o, d, s, MP, w->alpha, w->krow, a->v_off, n, r0, c0, 1, PV_CV);
            for (; c0 < d; c0 += 8)
                pv_f32(w->o, d, s, MP, w->alpha, w->krow, a->v_off, n, r0, c0, 1, 1);
        }
    }
    for (int j = 0; j < g; j++)
        for (int64_t p = 0; p < nq; p++) {
            const int r = j * bq + (int)p;
            const __m256 inv = _mm256_set1_ps(1.f / w->l[r]);
            float *o = a->outf + (i0 + p) * a->out_stride + (int64_t)(h * g + j) * d;
            for (int c = 0; c < d; c += 8)
                _mm256_storeu_ps(o + c, _mm256_mul_ps(_mm256_loadu_ps(w->o + r * d + c), inv));
        }
}
#endif

/* q: [q_len, nkv * g, d] (bf16, or float32 for the _f32 entry point), row i at
 * q + i * q_stride, its heads contiguous (query head j of kv head h is h * g + j, HF's
 * grouping); out: the same shape, row i at out + i * out_stride; strides in elements.
 * Query i sits at position ctx - q_len + i and sees keys 0 .. its position. table: the
 * chunk's block ids (table_len of them, each below num_blocks).
 * Returns 0, -1 when a shape is out of range, -2 when memory runs out, -3 when a block id
 * the chunk reads is outside the cache. */
static int paged_prefill(prefill_args a, int64_t table_len, int64_t num_blocks, int f32,
                         int num_threads) {
    const int64_t q_len = a.q_len, ctx = a.ctx;
    const int nkv = a.nkv, g = a.g, d = a.d, bs = a.bs;
    if (q_len < 0 || q_len > ctx || nkv < 1 || g < 1 || d < 1 || bs < 1 || table_len < 0 ||
        ctx > table_len * bs)
        return -1;
    if (q_len == 0) return 0;
    for (int64_t b = 0; b < (ctx + bs - 1) / bs; b++)
        if (a.table[b] < 0 || a.table[b] >= num_blocks) return -3;
    int vec = 0;
    if (f32) {
#if SPLITSERVE_F32_SIMD
        vec = d % 8 == 0;
        /* ~F32_ROWS rows a tile (each K row read serves all of them), unless the chunk is
         * short: padding rows cost as much as real ones. */
        if (vec) a.bq = g >= F32_ROWS ? 1 : F32_ROWS / g;
        if (vec && a.bq > q_len) a.bq = (int)q_len;
#endif
    } else {
#if defined(__AVX512BF16__)
        vec = d % 16 == 0;
        /* Groups of one or two query heads take 48 or 32 positions a tile: at least 3 row
         * vectors to share each broadcast K pair (unless the chunk is short: padding rows
         * cost as much as real ones). */
        if (vec && g < 3 && q_len > 16) a.bq = g == 1 ? 48 : 32;
#endif
    }
    const int64_t ntiles = (q_len + a.bq - 1) / a.bq, items = ntiles * nkv;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && items > 1)
    {
        void *mem = NULL;
        float *s = NULL;
#if defined(__AVX512BF16__)
        vec_scratch w;
#endif
#if SPLITSERVE_F32_SIMD
        f32_scratch wf;
#endif
        if (vec && f32) {
#if SPLITSERVE_F32_SIMD
            mem = f32_scratch_alloc(&wf, g * a.bq, d);
#endif
        } else if (vec) {
#if defined(__AVX512BF16__)
            mem = vec_scratch_alloc(&w, g * a.bq, d);
#endif
        } else {
            mem = s = malloc(sizeof(float) * (ctx + d));
        }
        if (!mem) {
#pragma omp atomic write
            failed = 1;
        }
        /* Longest first: the last query tiles see the most keys (dynamic scheduling then
         * balances the causal triangle). */
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            if (!mem) continue;
            const int64_t i0 = (ntiles - 1 - it / nkv) * a.bq;
            const int h = (int)(it % nkv);
            if (vec && f32) {
#if SPLITSERVE_F32_SIMD
                tile_f32(&a, h, i0, &wf);
#endif
            } else if (vec) {
#if defined(__AVX512BF16__)
                tile_vec(&a, h, i0, &w);
#endif
            } else {
                tile_scalar(&a, h, i0, s, s + ctx, f32);
            }
        }
        free(mem);
    }
    return failed ? -2 : 0;
}

int splitserve_paged_prefill_bf16(const uint16_t *q, int64_t q_stride, uint16_t *out,
                                  int64_t out_stride, const uint16_t *layer_k,
                                  int64_t block_stride, int64_t v_off, const int64_t *table,
                                  int64_t table_len, int64_t num_blocks, int64_t q_len,
                                  int64_t ctx, int nkv, int g, int d, int bs, float scale,
                                  int num_threads) {
    prefill_args a = {q, q_stride, out, out_stride, layer_k, 0, 0, 0, block_stride, v_off,
                      table, q_len, ctx, nkv, g, d, bs, 16, scale};
    return paged_prefill(a, table_len, num_blocks, 0, num_threads);
}

int splitserve_paged_prefill_f32(const float *q, int64_t q_stride, float *out,
                                 int64_t out_stride, const float *layer_k, int64_t block_stride,
                                 int64_t v_off, const int64_t *table, int64_t table_len,
                                 int64_t num_blocks, int64_t q_len, int64_t ctx, int nkv, int g,
                                 int d, int bs, float scale, int num_threads) {
    prefill_args a = {0, q_stride, 0, out_stride, 0, q, layer_k, out, block_stride, v_off,
                      table, q_len, ctx, nkv, g, d, bs, 16, scale};
    return paged_prefill(a, table_len, num_blocks, 1, num_threads);
}

SPLITSERVE_BF16_PROBE(paged_prefill)
SPLITSERVE_F32_PROBE(paged_prefill)
