/* A float32 decode step's whole decoder stack in one call: for each layer, residual add +
 * RMSNorm, the fused q/k/v GEMM, RoPE, the cache write, paged decode attention, the output
 * GEMM, residual add + RMSNorm, the gate/up GEMM, SiLU-and-multiply and the down GEMM, then
 * the final norm. Built and loaded by engine/native.py.
 *
 * It computes nothing itself: it calls the entry points of the other kernels (layer_ops.c,
 * quant_gemm_f32.c or quant_gemm_a8.c: the float32 or the w4a8 GEMM, paged_decode.c), whose
 * addresses Python passes in, in the order LlamaForCausalLM.forward calls them, on the same
 * buffers, so its output equals that loop's bit for bit. What it saves is the loop: ~10
 * calls a layer from Python through ctypes, each a few µs of interpreter, argument packing
 * and tensor allocation while the other OpenMP thread spins (on a 2-core CPU, batch-1
 * decode of SmolLM2 spent ~40 % of its main thread's time there).
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "fp8.h"

typedef int (*gemm_fn)(const float *x, int64_t ldx, int64_t M, const uint8_t *wp, int64_t N,
                       int64_t K, const float *bias, float *y, int64_t ldy, int threads);
typedef void (*norm_fn)(float *h, const float *delta, const float *weight, float *out,
                        int64_t T, int64_t H, float eps, int threads);
typedef void (*rope_fn)(float *x, int64_t T, int64_t x_stride, int heads, int d,
                        const int64_t *positions, const float *cos, const float *sin,
                        int threads);
typedef void (*silu_fn)(const float *gu, float *out, int64_t T, int64_t I, int threads);
typedef int (*write_fn)(void *layer_k, int64_t block_stride, int64_t v_off, int64_t num_blocks,
                        int bs, const void *k, int64_t k_stride, const void *v,
                        int64_t v_stride, const int64_t *slot_block, const int64_t *slot_offset,
                        int64_t T, int64_t row, int elem);
typedef int (*decode_fn)(const float *q, int64_t q_stride, float *out, const void *layer_k,
                         int64_t block_stride, int64_t v_off, const int64_t *tables,
                         int64_t max_blocks, const int64_t *seq_lens, int D, int nkv, int g,
                         int d, int bs, float scale, int threads);

/* One projection: y [T, n] = x [T, k] @ W.T + bias through `fn` on the packed weight. */
struct linear {
    void *fn;
    const void *w;
    const float *bias;
    int64_t n, k;
};

struct layer {
    const float *input_norm, *post_norm;
    struct linear qkv, o, gate_up, down;
};

/* Mirrored by engine/native.py's _Stack: keep the two in the same order. */
struct stack {
    int64_t num_layers, hidden, nh, nkv, d, inter;
    float eps, scale;
    const struct layer *layers;
    const float *final_norm;
    void *add_rms_norm, *rope, *silu_mul, *write_kv, *decode;
    const float *cos, *sin;
    int64_t T;
    float *h;   /* [T, hidden] the embeddings in, the residual stream out */
    float *out; /* [T, hidden] the final norm's output */
    const int64_t *positions;
    float *x, *qkv, *attn, *delta, *gu, *act; /* scratch, as the Python loop's tensors */
    void *kvn; /* [T, 2, nkv * d] k and v rounded to a narrower cache (kv_elem 2 or 1) */
    char *cache;
    int64_t layer_bytes, block_stride, v_off, num_blocks;
    int64_t bs, kv_elem;
    const int64_t *slot_block, *slot_offset, *tables, *seq_lens;
    int64_t max_blocks;
    int64_t threads;
};

static int linear(const struct linear *l, const float *x, int64_t T, float *y, int threads) {
    return ((gemm_fn)l->fn)(x, l->k, T, (const uint8_t *)l->w, l->n, l->k, l->bias, y, l->n,
                            threads);
}

/* 0, or -(100 * layer + code): code 1 a GEMM refused (K or memory), 2 a slot outside the
 * cache, 3 a decode refused (lengths), 4 a bad shape. */
int splitserve_layer_stack_f32(const struct stack *s) {
    const int64_t T = s->T, H = s->hidden, nh = s->nh, nkv = s->nkv, d = s->d;
    const int64_t qs = nh * d, kvs = nkv * d, nqkv = qs + 2 * kvs;
    const int th = (int)s->threads;
    const norm_fn norm = (norm_fn)s->add_rms_norm;
    if (T < 1 || nkv < 1 || nh % nkv || s->num_layers < 1) return -4;
    for (int64_t li = 0; li < s->num_layers; li++) {
        const struct layer *L = s->layers + li;
        const int64_t fail = -100 * li;
        if (L->qkv.n != nqkv || L->qkv.k != H || L->o.n != H || L->o.k != qs ||
            L->gate_up.n != 2 * s->inter || L->gate_up.k != H || L->down.n != H ||
            L->down.k != s->inter)
            return (int)(fail - 4);
        norm(s->h, li ? s->delta : NULL, L->input_norm, s->x, T, H, s->eps, th);
        if (linear(&L->qkv, s->x, T, s->qkv, th)) return (int)(fail - 1);
        ((rope_fn)s->rope)(s->qkv, T, nqkv, (int)(nh + nkv), (int)d, s->positions, s->cos,
                           s->sin, th);
        char *layer_k = s->cache + li * s->layer_bytes;
        const float *k = s->qkv + qs, *v = s->qkv + qs + kvs;
        int rc;
        if (s->kv_elem == 2 || s->kv_elem == 1) { /* bfloat16 or float8: rounded as torch */
            const int64_t es = s->kv_elem;
            for (int64_t t = 0; t < T; t++)
                for (int64_t i = 0; i < kvs; i++) {
                    const float kf = k[t * nqkv + i], vf = v[t * nqkv + i];
                    const int64_t ki = (2 * t) * kvs + i, vi = (2 * t + 1) * kvs + i;
                    if (es == 2) {
                        ((uint16_t *)s->kvn)[ki] = f32_to_bf16(kf);
                        ((uint16_t *)s->kvn)[vi] = f32_to_bf16(vf);
                    } else {
                        ((uint8_t *)s->kvn)[ki] = f32_to_fp8_e4m3(kf);
                        ((uint8_t *)s->kvn)[vi] = f32_to_fp8_e4m3(vf);
                    }
                }
            rc = ((write_fn)s->write_kv)(layer_k, s->block_stride, s->v_off, s->num_blocks,
                                         (int)s->bs, s->kvn, 2 * kvs, (char *)s->kvn + kvs * es,
                                         2 * kvs, s->slot_block, s->slot_offset, T, kvs,
                                         (int)es);
        } else {
            rc = ((write_fn)s->write_kv)(layer_k, s->block_stride, s->v_off, s->num_blocks,
                                         (int)s->bs, k, nqkv, v, nqkv, s->slot_block,
                                         s->slot_offset, T, kvs, 4);
        }
        if (rc) return (int)(fail - 2);
        if (((decode_fn)s->decode)(s->qkv, nqkv, s->attn, layer_k, s->block_stride, s->v_off,
                                   s->tables, s->max_blocks, s->seq_lens, (int)T, (int)nkv,
                                   (int)(nh / nkv), (int)d, (int)s->bs, s->scale, th))
            return (int)(fail - 3);
        if (linear(&L->o, s->attn, T, s->delta, th)) return (int)(fail - 1);
        norm(s->h, s->delta, L->post_norm, s->x, T, H, s->eps, th);
        if (linear(&L->gate_up, s->x, T, s->gu, th)) return (int)(fail - 1);
        ((silu_fn)s->silu_mul)(s->gu, s->act, T, s->inter, th);
        if (linear(&L->down, s->act, T, s->delta, th)) return (int)(fail - 1);
    }
    norm(s->h, s->delta, s->final_norm, s->out, T, H, s->eps, th);
    return 0;
}

int splitserve_layer_stack_available(void) { return 1; }
