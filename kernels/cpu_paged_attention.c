/* Attention of short query segments over the paged K/V cache on the CPU.
 *
 * The PyTorch path gathers every segment's cached keys and values into new tensors in every
 * layer (one index_select per cache) and runs SDPA on them; at batch 16 over a few hundred
 * cached tokens the gathers, the mask and the per-call overhead cost more than the
 * arithmetic. Here a segment (or, with few segments, a segment's KV head) is one task: its
 * queries (the segment's L tokens times the query heads) walk the keys in order, reading the
 * cached prefix through the segment's page table and the segment's own keys from the pass's
 * fresh K/V, with exact softmax in fp32 (scores, max, exponentials, weighted sum of values).
 * The engine sends it decode rows (L = 1); the kernel itself takes any L.
 *
 * Visibility (the attention contract): every query sees the ctx cached keys, then the
 * segment's own keys up to and including its position (causal) or all of them
 * (bidirectional). So query row r sees a prefix of the key order of length
 * n_r = ctx + (causal ? i + 1 : L), and no mask is materialised. A segment with a sub-block
 * width W > 0 (seg_sub_block, may be NULL: none) has the quadratic self-speculation mask
 * instead (kernels/reference.py, segment_mask): its rows are sub-blocks of W, row 0 of each a
 * head; row i sees the head of every sub-block up to its own and, if it is not a head, every
 * row of its own sub-block. Its rows walk all ctx + L keys, the hidden ones scored -inf (their
 * weights are then exactly 0).
 *
 * A query row's result depends only on its query and the n_r keys and values it sees, not on
 * L or on the other rows: scores and value sums are computed per key in the same order and
 * blocking whatever the segment's length. So a causal row attended in a segment of L rows
 * equals, bit for bit, the same row attended alone after the earlier rows were cached.
 *
 * Built at run time by kernels/cpu_build.py (-march=native): AVX-512F, AVX2+FMA or plain C.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_bf16.h"
#include "cpu_exp.h"
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* x[i] = exp(x[i]) for x[i] <= 0 (scores minus their maximum), within 1.3 ulp (cpu_exp.h);
 * below -87 the result is 0 (exp < 2^-125 there). */
static inline void exp_nonpositive(float* x, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 lo = _mm512_set1_ps(-87.0f);
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        const __mmask16 tiny = _mm512_cmp_ps_mask(v, lo, _CMP_LT_OQ);
        _mm512_storeu_ps(x + i, _mm512_maskz_mov_ps((__mmask16)~tiny, exp_ps512(_mm512_max_ps(v, lo))));
    }
#endif
    for (; i < n; i++) x[i] = expf(x[i]);
}

static inline float dot(const float* a, const float* b, int64_t d) {
#if defined(__AVX512F__)
    if (d % 16 == 0) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < d; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
        return _mm512_reduce_add_ps(acc);
    }
#elif defined(__AVX2__) && defined(__FMA__)
    if (d % 8 == 0) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        s = _mm_hadd_ps(s, s);
        s = _mm_hadd_ps(s, s);
        return _mm_cvtss_f32(s);
    }
#endif
    float acc = 0.f;
    for (int64_t i = 0; i < d; i++) acc += a[i] * b[i];
    return acc;
}

#if defined(__AVX512F__)
/* lane t = the sum of v[t]'s 16 lanes, for 16 vectors at once: a tree of in-lane and
 * cross-lane shuffles (45 operations, where 16 separate reductions take about 130) */
static inline __m512 sum16(const __m512* v) {
    __m512 w[8], x[4], y[2];
    for (int i = 0; i < 8; i++)
        w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        const __m512d a = _mm512_castps_pd(w[2 * i]), b = _mm512_castps_pd(w[2 * i + 1]);
        x[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int i = 0; i < 2; i++)
        y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x88), _mm512_shuffle_f32x4(y[0], y[1], 0xdd));
}
#endif

/* acc += w * v over D elements (the compiler vectorises this loop) */
static inline void axpy(float* restrict acc, float w, const float* restrict v, int64_t d) {
    for (int64_t i = 0; i < d; i++) acc[i] += w * v[i];
}

typedef struct {
    const void *q, *k, *v;       /* [T, H, D] rows with the given token strides (elements) */
    const void *kc, *vc;         /* this layer's caches, [rows, Hkv, D] contiguous */
    void* out;                   /* [T, Hq, D] contiguous */
    int64_t q_stride, k_stride, v_stride;
    const int64_t *seg_q_start, *seg_q_len, *seg_ctx, *tables; /* tables: [S, table_stride] page ids */
    const uint8_t* seg_causal;
    const int64_t* seg_sub_block; /* NULL, or per segment: > 0 = the quadratic mask's width */
    int64_t table_stride, hq, hkv, d, page_size, page_shift;
    float scale;
} Args;

static inline const void* elem(const void* base, int64_t index, int bf16) {
    return (const char*)base + index * (bf16 ? 2 : 4);
}

/* key (or value) j of head h: cached position j < ctx through the page table (page_size is
 * a power of two: shift and mask), else the segment's own row j - ctx of the fresh tensor */
static inline const void* key_row(const Args* a, const void* cache, const void* fresh, int64_t stride,
                                  const int64_t* pages, int64_t ctx, int64_t q0, int64_t h, int64_t j, int bf16) {
    if (j < ctx) {
        const int64_t slot = (pages[j >> a->page_shift] << a->page_shift) | (j & (a->page_size - 1));
        return elem(cache, (slot * a->hkv + h) * a->d, bf16);
    }
    return elem(fresh, (q0 + j - ctx) * stride + h * a->d, bf16);
}

/* Rows of one head are a few hundred bytes apart and change page every page_size keys: too
 * irregular for the hardware prefetcher, so each loop asks for the row PF_KEYS keys ahead. */
#ifndef PF_KEYS
#define PF_KEYS 8
#endif
#define KEY_BLOCK 16 /* keys (and values) one query row takes together (AVX-512) */
static inline void prefetch_row(const void* p, int64_t d, int bf16) {
#if defined(__AVX512F__) || defined(__AVX2__)
    const int64_t bytes = d * (bf16 ? 2 : 4);
    for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch((const char*)p + off, _MM_HINT_T0);
#else
    (void)p, (void)d, (void)bf16;
#endif
}

/* Keys (or values) j .. j + count - 1 of heads h0 .. h0 + width / D - 1, widened into dst
 * (count rows of width floats), with the row PF_KEYS keys ahead of each asked for. */
static inline __attribute__((always_inline)) void load_rows(const Args* a, const void* cache, const void* fresh,
                                                             int64_t stride, const int64_t* pages, int64_t ctx,
                                                             int64_t q0, int64_t h0, int64_t j, int64_t count,
                                                             int64_t n, float* dst, int64_t width, int bf16) {
    for (int64_t t = 0; t < count; t++) {
        if (j + t + PF_KEYS < n)
            prefetch_row(key_row(a, cache, fresh, stride, pages, ctx, q0, h0, j + t + PF_KEYS, bf16), width, bf16);
        widen(key_row(a, cache, fresh, stride, pages, ctx, q0, h0, j + t, bf16), dst + t * width, width, bf16);
    }
}

/* One task: segment s, KV heads h0 .. h0 + nh - 1 (reading a token's keys of all nh heads
 * as one contiguous row keeps the cache reads sequential). Scratch: R * D query rows, R * D
 * accumulators, KEY_BLOCK key or value rows of nh heads and R * (ctx + L) scores, R = L * nh * G query
 * rows. The order of operations follows the reference (scores scaled after the dot product,
 * probabilities normalised before they weight the values), so fp32 results differ from it only
 * by summation order. */
static inline __attribute__((always_inline)) void task(const Args* a, int64_t s, int64_t h0, int64_t nh, int bf16) {
    const int64_t L = a->seg_q_len[s], ctx = a->seg_ctx[s], q0 = a->seg_q_start[s], d = a->d;
    const int64_t G = a->hq / a->hkv, per_token = nh * G, R = L * per_token, N = ctx + L, width = nh * d;
    const int causal = a->seg_causal[s];
    const int64_t W = a->seg_sub_block != NULL ? a->seg_sub_block[s] : 0;
    const int64_t* pages = a->tables + s * a->table_stride;
    float* qf = (float*)malloc(sizeof(float) * (2 * R * d + KEY_BLOCK * width + R * N));
    int64_t* visible = (int64_t*)malloc(sizeof(int64_t) * R);
    if (qf == NULL || visible == NULL) {
        free(qf);
        free(visible);
        return;
    }
    float *acc = qf + R * d, *row = acc + R * d, *scores = row + KEY_BLOCK * width;
    /* query row r = i * per_token + c: token i of the segment, query head h0 * G + c (whose KV
     * head is h0 + c / G, at offset (c / G) * D of a key row) */
    for (int64_t r = 0; r < R; r++) {
        const int64_t i = r / per_token, c = r % per_token;
        widen(elem(a->q, (q0 + i) * a->q_stride + (h0 * G + c) * d, bf16), qf + r * d, d, bf16);
        visible[r] = W > 0 ? N : ctx + (causal ? i + 1 : L);
    }
    int64_t j = 0;
#if defined(__AVX512F__)
    /* KEY_BLOCK keys at a time: each query row's 16 dot products reduced together. The last
     * block may be partial (rows past N zeroed, their scores not stored): key j's score is then
     * computed the same way whatever N is, so a query row's result does not depend on how many
     * rows its segment has (a verify row equals the decode step at its position, bit for bit). */
    for (; d % 16 == 0 && j < N; j += KEY_BLOCK) {
        const int64_t count = N - j < KEY_BLOCK ? N - j : KEY_BLOCK;
        load_rows(a, a->kc, a->k, a->k_stride, pages, ctx, q0, h0, j, count, N, row, width, bf16);
        memset(row + count * width, 0, sizeof(float) * (KEY_BLOCK - count) * width);
        const __mmask16 keep = (__mmask16)((1u << count) - 1u);
        for (int64_t r = 0; r < R; r++) {
            if (j >= visible[r]) continue; /* scores past visible[r] are written but never read */
            const float* qr = qf + r * d;
            const float* kr = row + (r % per_token) / G * d;
            __m512 dots[KEY_BLOCK];
            for (int t = 0; t < KEY_BLOCK; t++) dots[t] = _mm512_setzero_ps();
            for (int64_t e = 0; e < d; e += 16) {
                const __m512 qv = _mm512_loadu_ps(qr + e);
                for (int t = 0; t < KEY_BLOCK; t++)
                    dots[t] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(kr + t * width + e), dots[t]);
            }
            _mm512_mask_storeu_ps(scores + r * N + j, keep, _mm512_mul_ps(sum16(dots), _mm512_set1_ps(a->scale)));
        }
    }
#endif
    for (; j < N; j++) {
        load_rows(a, a->kc, a->k, a->k_stride, pages, ctx, q0, h0, j, 1, N, row, width, bf16);
        for (int64_t r = 0; r < R; r++)
            if (j < visible[r]) scores[r * N + j] = dot(qf + r * d, row + (r % per_token) / G * d, d) * a->scale;
    }
    if (W > 0) /* the quadratic mask: the segment's keys row r does not see score -inf */
        for (int64_t r = 0; r < R; r++) {
            const int64_t i = r / per_token;
            for (int64_t u = 0; u < L; u++)
                if (!((u % W == 0 && u / W <= i / W) || (i % W != 0 && u / W == i / W))) scores[r * N + ctx + u] = -INFINITY;
        }
    for (int64_t r = 0; r < R; r++) {
        float m = -INFINITY, sum = 0.f;
        float* sr = scores + r * N;
        for (int64_t j = 0; j < visible[r]; j++) m = sr[j] > m ? sr[j] : m;
        for (int64_t j = 0; j < visible[r]; j++) sr[j] -= m;
        exp_nonpositive(sr, visible[r]);
        for (int64_t j = 0; j < visible[r]; j++) sum += sr[j];
        const float inv = 1.f / sum; /* normalised before the values, like softmax then matmul */
        for (int64_t j = 0; j < visible[r]; j++) sr[j] *= inv;
        memset(acc + r * d, 0, sizeof(float) * d);
    }
    j = 0;
#if defined(__AVX512F__)
    /* KEY_BLOCK values at a time: each query row's accumulators are loaded and stored once
     * (the last block partial, as above: one FMA per visible value, in key order, whatever N is) */
    for (; d % 16 == 0 && j < N; j += KEY_BLOCK) {
        const int64_t count = N - j < KEY_BLOCK ? N - j : KEY_BLOCK;
        load_rows(a, a->vc, a->v, a->v_stride, pages, ctx, q0, h0, j, count, N, row, width, bf16);
        for (int64_t r = 0; r < R; r++) {
            const int64_t seen = visible[r] - j < KEY_BLOCK ? visible[r] - j : KEY_BLOCK;
            const float* vr = row + (r % per_token) / G * d;
            const float* p = scores + r * N + j;
            for (int64_t e = 0; e < d; e += 16) {
                __m512 o = _mm512_loadu_ps(acc + r * d + e);
                for (int64_t t = 0; t < seen; t++)
                    o = _mm512_fmadd_ps(_mm512_set1_ps(p[t]), _mm512_loadu_ps(vr + t * width + e), o);
                _mm512_storeu_ps(acc + r * d + e, o);
            }
        }
    }
#endif
    for (; j < N; j++) {
        load_rows(a, a->vc, a->v, a->v_stride, pages, ctx, q0, h0, j, 1, N, row, width, bf16);
        for (int64_t r = 0; r < R; r++)
            if (j < visible[r]) axpy(acc + r * d, scores[r * N + j], row + (r % per_token) / G * d, d);
    }
    for (int64_t r = 0; r < R; r++) {
        const int64_t i = r / per_token, c = r % per_token;
        const int64_t at = ((q0 + i) * a->hq + h0 * G + c) * d;
        for (int64_t e = 0; e < d; e++) {
            const float o = acc[r * d + e];
            if (bf16) ((uint16_t*)a->out)[at + e] = f32_to_bf16(o);
            else ((float*)a->out)[at + e] = o;
        }
    }
    free(visible);
    free(qf);
}

/* Tasks: one per segment (all heads) when there are enough segments to keep every thread
 * busy, else one per (segment, KV head). */
static void run(const Args* a, int64_t num_segs, int threads, int bf16) {
    const int64_t nh = num_segs >= 2 * threads ? a->hkv : 1, per_seg = a->hkv / nh, tasks = num_segs * per_seg;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t t = 0; t < tasks; t++) {
        if (bf16) task(a, t / per_seg, t % per_seg * nh, nh, 1);
        else task(a, t / per_seg, t % per_seg * nh, nh, 0);
    }
}

/* q [T, Hq, D], k/v [T, Hkv, D] (token strides given, heads contiguous), kc/vc [rows, Hkv, D],
 * out [T, Hq, D] contiguous; segments s = 0..num_segs-1 own query rows
 * seg_q_start[s] .. + seg_q_len[s], have seg_ctx[s] cached tokens in pages tables[s, :]
 * (page_size a power of two) and are causal, bidirectional or (seg_sub_block[s] > 0, when
 * seg_sub_block is not NULL) quadratic. Rows of out outside the segments are not written. */
#define ENTRY(NAME, BF16)                                                                                          \
    void NAME(const void* q, const void* k, const void* v, const void* kc, const void* vc, void* out,             \
              int64_t q_stride, int64_t k_stride, int64_t v_stride, const int64_t* seg_q_start,                    \
              const int64_t* seg_q_len, const int64_t* seg_ctx, const uint8_t* seg_causal,                         \
              const int64_t* seg_sub_block, const int64_t* tables, int64_t table_stride, int64_t num_segs,         \
              int64_t hq, int64_t hkv, int64_t d, int64_t page_size, float scale, int threads) {                   \
        int64_t shift = 0;                                                                                         \
        while (((int64_t)1 << shift) < page_size) shift++;                                                         \
        Args a = {q, k, v, kc, vc, out, q_stride, k_stride, v_stride, seg_q_start, seg_q_len, seg_ctx, tables,    \
                  seg_causal, seg_sub_block, table_stride, hq, hkv, d, page_size, shift, scale};                   \
        run(&a, num_segs, threads, BF16);                                                                          \
    }
ENTRY(nld_paged_attention_bf16, 1)
ENTRY(nld_paged_attention_f32, 0)
