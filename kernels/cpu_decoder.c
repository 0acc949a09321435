/* One forward pass of the fused decoder on the CPU in one call, fp32 or bf16.
 *
 * On a small model a decode step's arithmetic takes less time than the Python around it: the
 * eager fused path makes about ten kernel calls per layer (RMSNorm, QKV projection, rotary,
 * cache stores, attention, output projection, RMSNorm, gate/up projection, silu * up, down
 * projection), each with its argument checks, tensor allocations and ctypes dispatch. Here
 * the layer loop runs in C and calls the same kernels in the same order with the same
 * arguments, through function pointers into their own libraries (kernels/cpu_sgemm.c,
 * kernels/cpu_elementwise.c, kernels/cpu_paged_attention.c), so a pass costs one call.
 *
 * Per layer l, for the pass's T rows (x: embeddings in, the final hidden states out):
 *
 *   h, res  = rms_norm(x + res)          (layer 0: res = x)
 *   qkv     = h @ Wqkv^T ; q, k = rotary(q, k) ; v = qkv's last columns
 *   cache   <- k, v of the rows with a slot (before attending: a segment may read them)
 *   a       = attention of every segment (causal, bidirectional or quadratic) @ Wo^T
 *   h, res  = rms_norm(a + res)
 *   x       = silu_mul(h @ Wgu^T) @ Wdown^T
 *
 * and finally out = rms_norm(x + res). Every row is in exactly one segment (callers check).
 * The results are the eager path's bit for bit wherever that path uses the same kernels (a
 * pass whose segments are all single rows); longer segments attend here in the C kernel
 * where the eager path uses SDPA, equal up to summation order.
 *
 * A bf16 model (act_bf16) keeps every activation in bf16, as the eager path's bf16 tensors do;
 * its projections are bf16 pair panels (nld_gemm_bf16: fp32 sums, one rounding per output)
 * and its caches bf16. The other kernels take the same bf16 flag as on the eager path.
 *
 * Every kernel here computes a row on its own (the projections' FMA chains, the per-row
 * norms and rotary, the attention's per-row sums), so a row's hidden state does not depend on
 * the other rows of the pass: a causal verify row equals the decode step at its position.
 */
#include <stdint.h>
#include <string.h>

typedef void (*sgemm_fn)(const float* x, const void* packed, float* y, int64_t M, int64_t N, int64_t K, int threads);
typedef void (*gemm_bf16_fn)(const uint16_t* x, const uint16_t* pairs, uint16_t* y, int64_t M, int64_t N, int64_t K,
                             int threads);
typedef void (*norm_fn)(const void* x, const void* res, const void* w, void* y, void* sum_out, int64_t rows, int64_t d,
                        float eps, int bf16, int threads);
typedef void (*rotary_fn)(const void* q, int64_t q_stride, const void* k, int64_t k_stride, void* q_out, void* k_out,
                          const float* cos_q, const float* sin_q, const float* cos, const float* sin, int64_t rows,
                          int64_t hq, int64_t hkv, int64_t dim, int bf16, int threads);
typedef void (*silu_fn)(const void* gate_up, void* out, int64_t rows, int64_t n, int bf16, int threads);
typedef void (*attention_fn)(const void* q, const void* k, const void* v, const void* kc, const void* vc, void* out,
                             int64_t q_stride, int64_t k_stride, int64_t v_stride, const int64_t* seg_q_start,
                             const int64_t* seg_q_len, const int64_t* seg_ctx, const uint8_t* seg_causal,
                             const int64_t* seg_sub_block, const int64_t* tables, int64_t table_stride,
                             int64_t num_segs, int64_t hq, int64_t hkv, int64_t d, int64_t page_size, float scale,
                             int threads);

/* The model, set up once (kernels/cpu_decoder.py keeps the tensors alive). Per-layer
 * arrays hold one pointer per layer; weights are kernels/cpu_sgemm.c panels: with fp32
 * activations fp32 or bf16 panels, bf16[4 l + j] saying which for layer l's projection j (qkv,
 * o, gate_up, down); with bf16 activations (act_bf16) pair panels. */
typedef struct {
    sgemm_fn sgemm, sgemm_bf16w;
    gemm_bf16_fn gemm_bf16;
    int64_t act_bf16;
    norm_fn add_rms_norm;
    rotary_fn rotary_qk;
    silu_fn silu_mul;
    attention_fn attention;
    int64_t layers, hidden, hq, hkv, d, inter, page_size;
    float eps, scale;
    const float *const *norm1, *const *norm2;
    const void *const *qkv, *const *o, *const *gate_up, *const *down;
    const uint8_t* bf16;
    const float* final_norm;
    void *const *k_cache, *const *v_cache; /* per layer: [rows, hkv, d] in the activations' dtype */
} Decoder;

/* y [M, N] = x [M, K] @ W^T for layer l's projection j (its panels w) */
static void project(const Decoder* m, int64_t l, int j, const void* w, const void* x, void* y, int64_t M, int64_t N,
                    int64_t K, int threads) {
    if (m->act_bf16) m->gemm_bf16(x, w, y, M, N, K, threads);
    else (m->bf16[4 * l + j] ? m->sgemm_bf16w : m->sgemm)(x, w, y, M, N, K, threads);
}

/* Elements (of the activations' dtype) of scratch a pass of T rows needs (see the layout
 * in nld_decoder_pass). */
int64_t nld_decoder_scratch(const Decoder* m, int64_t T) {
    const int64_t qkv = (m->hq + 2 * m->hkv) * m->d;
    return T * (2 * m->hidden + qkv + (m->hq + m->hkv) * m->d + m->hq * m->d + 3 * m->inter);
}

/* x [T, hidden]: the embeddings, overwritten; out [T, hidden] (both in the activations'
 * dtype); rope tables [T, d] fp32; the rows
 * write_rows[i] store their K/V at cache row write_slots[i]; segments as in
 * kernels/cpu_paged_attention.c; scratch of nld_decoder_scratch(m, T) floats. */
void nld_decoder_pass(const Decoder* m, void* x, int64_t T, const float* cos_q, const float* sin_q, const float* cos,
                      const float* sin, const int64_t* write_rows, const int64_t* write_slots, int64_t num_writes,
                      const int64_t* seg_q_start, const int64_t* seg_q_len, const int64_t* seg_ctx,
                      const uint8_t* seg_causal, const int64_t* seg_sub_block, const int64_t* tables,
                      int64_t table_stride, int64_t num_segs, void* scratch, void* out, int threads) {
    const int b = (int)m->act_bf16;
    const int64_t e = b ? 2 : 4; /* bytes per activation */
    const int64_t H = m->hidden, d = m->d, qd = m->hq * d, kd = m->hkv * d, qkv_n = qd + 2 * kd;
    char *h = scratch, *res = h + T * H * e, *qkv = res + T * H * e, *q = qkv + T * qkv_n * e, *k = q + T * qd * e;
    char *attn = k + T * kd * e, *gu = attn + T * qd * e, *act = gu + T * 2 * m->inter * e;
    for (int64_t l = 0; l < m->layers; l++) {
        if (l == 0) {
            m->add_rms_norm(x, NULL, m->norm1[0], h, NULL, T, H, m->eps, b, threads);
            memcpy(res, x, e * T * H);
        } else {
            m->add_rms_norm(x, res, m->norm1[l], h, res, T, H, m->eps, b, threads);
        }
        project(m, l, 0, m->qkv[l], h, qkv, T, qkv_n, H, threads);
        m->rotary_qk(qkv, qkv_n, qkv + qd * e, qkv_n, q, k, cos_q, sin_q, cos, sin, T, m->hq, m->hkv, d, b, threads);
        const char* v = qkv + (qd + kd) * e;
        char *kc = m->k_cache[l], *vc = m->v_cache[l];
        for (int64_t i = 0; i < num_writes; i++) {
            const int64_t r = write_rows[i], slot = write_slots[i];
            memcpy(kc + slot * kd * e, k + r * kd * e, e * kd);
            memcpy(vc + slot * kd * e, v + r * qkv_n * e, e * kd);
        }
        m->attention(q, k, v, kc, vc, attn, m->hq * d, kd, qkv_n, seg_q_start, seg_q_len, seg_ctx, seg_causal,
                     seg_sub_block, tables, table_stride, num_segs, m->hq, m->hkv, d, m->page_size, m->scale, threads);
        project(m, l, 1, m->o[l], attn, h, T, H, qd, threads);
        m->add_rms_norm(h, res, m->norm2[l], h, res, T, H, m->eps, b, threads);
        project(m, l, 2, m->gate_up[l], h, gu, T, 2 * m->inter, H, threads);
        m->silu_mul(gu, act, T, m->inter, b, threads);
        project(m, l, 3, m->down[l], act, x, T, H, m->inter, threads);
    }
    m->add_rms_norm(x, res, m->final_norm, out, res, T, H, m->eps, b, threads);
}
