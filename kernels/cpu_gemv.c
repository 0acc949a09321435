/* Few-row projections on the CPU: y[M, N] = x[M, K] @ w[N, K]^T for M of 1 to 4.
 *
 * A decode step at batch 1 is a chain of such products, and each one only streams its weight
 * matrix once, so memory bandwidth is the whole cost. oneDNN's and MKL's GEMMs reach about half
 * of this machine's bandwidth at one row (bf16 worst), mostly because a weight row of a small
 * model is 1-3 KB: too short a stream for the hardware prefetcher, which restarts on every row.
 * Here each thread walks its rows four at a time (contiguous memory), converts bf16 to fp32 with
 * a shift, accumulates in fp32 with FMAs, and prefetches the rows PF_ROWS ahead in software.
 *
 * Built at run time by kernels/cpu_gemv.py with the machine's C compiler (-march=native);
 * AVX-512F, AVX2+FMA or plain C, whichever the compiler targets. Results equal the fp32 dot
 * products up to summation order; bf16 outputs are rounded to nearest even.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_bf16.h"
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#ifndef PF_ROWS
#define PF_ROWS 8
#endif
#define MAX_MB 4 /* x rows per pass over a weight block; more rows take more passes */

#if defined(__AVX512F__)
#define VW 16
typedef __m512 vf;
static inline vf vload_bf16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline vf vload_f32(const float* p) { return _mm512_loadu_ps(p); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
#elif defined(__AVX2__) && defined(__FMA__)
#define VW 8
typedef __m256 vf;
static inline vf vload_bf16(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
static inline vf vload_f32(const float* p) { return _mm256_loadu_ps(p); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline float vsum(vf a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}
#endif

static inline float wscalar(const void* w, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t*)w)[i]) : ((const float*)w)[i];
}

/* acc[r * MAX_MB + m] = dot(w row r, xf row m) for R weight rows (contiguous, stride K) and MB
 * rows of xf (fp32, stride K). R, MB and bf16 are constants after inlining. */
static inline __attribute__((always_inline)) void dot_block(const void* w, const float* xf, float* acc,
                                                             int64_t K, int R, int MB, int bf16) {
    int64_t k = 0;
#ifdef VW
    const int64_t line = bf16 ? 32 : 16; /* elements per 64-byte cache line */
    vf a[4][MAX_MB];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MB; m++) a[r][m] = vzero();
    for (; k + VW <= K; k += VW) {
        vf wv[4];
        for (int r = 0; r < R; r++)
            wv[r] = bf16 ? vload_bf16((const uint16_t*)w + r * K + k) : vload_f32((const float*)w + r * K + k);
        if (k % line == 0)
            for (int r = 0; r < R; r++) {
                const char* ahead = (const char*)w + ((r + PF_ROWS) * K + k) * (bf16 ? 2 : 4);
                _mm_prefetch(ahead, _MM_HINT_T0);
            }
        for (int m = 0; m < MB; m++) {
            vf xv = vload_f32(xf + m * K + k);
            for (int r = 0; r < R; r++) a[r][m] = vfma(wv[r], xv, a[r][m]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MB; m++) acc[r * MAX_MB + m] = vsum(a[r][m]);
#else
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MB; m++) acc[r * MAX_MB + m] = 0.f;
#endif
    for (; k < K; k++)
        for (int r = 0; r < R; r++)
            for (int m = 0; m < MB; m++) acc[r * MAX_MB + m] += wscalar(w, r * K + k, bf16) * xf[m * K + k];
}

/* One weight block of R rows against every x row, MAX_MB x rows at a time. */
static inline __attribute__((always_inline)) void rows_block(const void* w, const float* xf, void* y, int64_t n,
                                                              int64_t M, int64_t N, int64_t K, int R, int bf16) {
    for (int64_t m0 = 0; m0 < M; m0 += MAX_MB) {
        float acc[4 * MAX_MB] = {0};
        const int MB = M - m0 >= MAX_MB ? MAX_MB : (int)(M - m0);
        const void* wn = (const char*)w + n * K * (bf16 ? 2 : 4);
        const float* xm = xf + m0 * K;
        switch (MB) {
            case 1: dot_block(wn, xm, acc, K, R, 1, bf16); break;
            case 2: dot_block(wn, xm, acc, K, R, 2, bf16); break;
            case 3: dot_block(wn, xm, acc, K, R, 3, bf16); break;
            default: dot_block(wn, xm, acc, K, R, 4, bf16); break;
        }
        for (int r = 0; r < R; r++)
            for (int m = 0; m < MB; m++) {
                int64_t at = (m0 + m) * N + n + r;
                if (bf16) ((uint16_t*)y)[at] = f32_to_bf16(acc[r * MAX_MB + m]);
                else ((float*)y)[at] = acc[r * MAX_MB + m];
            }
    }
}

static inline __attribute__((always_inline)) void linear(const void* x, const void* w, void* y, int64_t M, int64_t N,
                                                          int64_t K, int threads, int bf16) {
    float* xf = NULL;
    if (bf16) {
        xf = (float*)malloc(sizeof(float) * M * K);
        if (xf == NULL) return;
        for (int64_t i = 0; i < M * K; i++) xf[i] = bf16_to_f32(((const uint16_t*)x)[i]);
    }
    const float* xs = bf16 ? xf : (const float*)x;
    const int64_t blocks = N / 4;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) rows_block(w, xs, y, b * 4, M, N, K, 4, bf16);
    for (int64_t n = blocks * 4; n < N; n++) rows_block(w, xs, y, n, M, N, K, 1, bf16);
    free(xf);
}

/* Row-major, contiguous tensors: x [M, K], w [N, K], y [M, N]; bf16 as raw uint16. */
void nld_linear_bf16(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t M, int64_t N, int64_t K, int threads) {
    linear(x, w, y, M, N, K, threads, 1);
}

void nld_linear_f32(const float* x, const float* w, float* y, int64_t M, int64_t N, int64_t K, int threads) {
    linear(x, w, y, M, N, K, threads, 0);
}
