/* The fused model path's elementwise ops on the CPU, one call each per layer: residual add +
 * RMSNorm, q/k rotary, silu(gate) * up.
 *
 * Their PyTorch forms (kernels/reference.py) cost 6-12 aten calls each: widen to fp32, the
 * math, narrow back. On a decode step the tensors are a few KB, so the calls' fixed cost is
 * the whole cost (a third of a bf16 decode step of SmolLM2-135M at batch 16). Here each op
 * is one pass over its rows with the same fp32 math and the same roundings as the reference:
 *
 *   add_rms_norm: s = dtype(x + res); y = dtype(w * dtype(s * 1 / sqrt(mean(s^2) + eps)))
 *   rotary:       out[i] = dtype(fma(x[(i + D/2) % D], i < D/2 ? -sin[i] : sin[i], x[i] * cos[i]))
 *   silu_mul:     out = dtype(g / (1 + exp(-g)) * u)
 *
 * (torch's addcmul is that fma). Only the order of the mean's sum differs, and exp is within
 * 1.3 ulp (cpu_exp.h). Built by kernels/cpu_build.py with -ffp-contract=off, so products and
 * sums are rounded as written.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_bf16.h"
#include "cpu_exp.h"

#define MAX_DIM 16384   /* widest row the stack buffers take (callers check) */
#define PARALLEL 65536  /* elements per call below which one thread does it all */

static inline float sum_of_squares(const float* v, int64_t n) {
    int64_t i = 0;
    float total = 0.f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(v + i), _mm512_loadu_ps(v + i), acc);
    total = _mm512_reduce_add_ps(acc);
#endif
    for (; i < n; i++) total += v[i] * v[i];
    return total;
}

/* x, res (NULL: none; then sum_out is not written), sum_out, y: [rows, d] contiguous; w [d] */
void nld_add_rms_norm(const void* x, const void* res, const void* w, void* y, void* sum_out, int64_t rows, int64_t d,
                      float eps, int bf16, int threads) {
    const int64_t esize = bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(rows * d >= PARALLEL ? threads : 1)
    for (int64_t r = 0; r < rows; r++) {
        float s[MAX_DIM], other[MAX_DIM];
        widen((const char*)x + r * d * esize, s, d, bf16);
        if (res != NULL) {
            widen((const char*)res + r * d * esize, other, d, bf16);
            for (int64_t i = 0; i < d; i++) s[i] += other[i];
            round_to_dtype(s, d, bf16);
            narrow(s, (char*)sum_out + r * d * esize, d, bf16);
        }
        const float scale = 1.0f / sqrtf(sum_of_squares(s, d) / (float)d + eps);
        widen(w, other, d, bf16);
        for (int64_t i = 0; i < d; i++) s[i] *= scale;
        round_to_dtype(s, d, bf16);
        for (int64_t i = 0; i < d; i++) s[i] *= other[i];
        narrow(s, (char*)y + r * d * esize, d, bf16);
    }
}

/* one token's heads (contiguous rows of dim values) from src rotated into dst with its tables */
static inline void rotate_heads(const void* src, void* dst, const float* cos, const float* sin, int64_t heads,
                                int64_t dim, int bf16) {
    const int64_t half = dim / 2, esize = bf16 ? 2 : 4;
    float v[MAX_DIM], out[MAX_DIM];
    for (int64_t h = 0; h < heads; h++) {
        widen((const char*)src + (h * dim) * esize, v, dim, bf16);
        for (int64_t i = 0; i < half; i++) out[i] = fmaf(v[i + half], -sin[i], v[i] * cos[i]);
        for (int64_t i = half; i < dim; i++) out[i] = fmaf(v[i - half], sin[i], v[i] * cos[i]);
        narrow(out, (char*)dst + h * dim * esize, dim, bf16);
    }
}

/* q [rows, hq, dim] and k [rows, hkv, dim] with row strides q_stride / k_stride (elements;
 * heads contiguous within a row) into contiguous q_out / k_out; tables [rows, dim] (fp32) */
void nld_rotary_qk(const void* q, int64_t q_stride, const void* k, int64_t k_stride, void* q_out, void* k_out,
                   const float* cos_q, const float* sin_q, const float* cos, const float* sin, int64_t rows,
                   int64_t hq, int64_t hkv, int64_t dim, int bf16, int threads) {
    const int64_t esize = bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(rows * (hq + hkv) * dim >= PARALLEL ? threads : 1)
    for (int64_t r = 0; r < rows; r++) {
        rotate_heads((const char*)q + r * q_stride * esize, (char*)q_out + r * hq * dim * esize, cos_q + r * dim,
                     sin_q + r * dim, hq, dim, bf16);
        rotate_heads((const char*)k + r * k_stride * esize, (char*)k_out + r * hkv * dim * esize, cos + r * dim,
                     sin + r * dim, hkv, dim, bf16);
    }
}

/* v[i] = exp(-v[i]) */
static inline void exp_negated(float* v, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 lo = _mm512_set1_ps(-87.0f), hi = _mm512_set1_ps(88.0f);
    for (; i + 16 <= n; i += 16) {
        const __m512 a = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_loadu_ps(v + i));
        __m512 e = exp_ps512(_mm512_min_ps(_mm512_max_ps(a, lo), hi));
        e = _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(a, lo, _CMP_LT_OQ), _mm512_setzero_ps());
        e = _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(a, hi, _CMP_GT_OQ), _mm512_set1_ps(INFINITY));
        e = _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), a); /* NaN stays NaN */
        _mm512_storeu_ps(v + i, e);
    }
#endif
    for (; i < n; i++) v[i] = expf(-v[i]);
}

/* gate_up [rows, 2n] (gate then up), out [rows, n], contiguous */
void nld_silu_mul(const void* gate_up, void* out, int64_t rows, int64_t n, int bf16, int threads) {
    const int64_t esize = bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(rows * n >= PARALLEL ? threads : 1)
    for (int64_t r = 0; r < rows; r++) {
        float g[MAX_DIM], e[MAX_DIM], u[MAX_DIM];
        const char* row = (const char*)gate_up + r * 2 * n * esize;
        widen(row, g, n, bf16);
        widen(row + n * esize, u, n, bf16);
        memcpy(e, g, sizeof(float) * n);
        exp_negated(e, n);
        for (int64_t i = 0; i < n; i++) g[i] = g[i] / (1.0f + e[i]) * u[i];
        narrow(g, (char*)out + r * n * esize, n, bf16);
    }
}
