/* fp32 projections of several rows on prepacked weights: y[M, N] = x[M, K] @ w[N, K]^T.
 *
 * A diffusion block with its lookahead (8 rows), a verify or draft pass of self-speculation
 * (16 rows) or a batched decode step (5-32 rows) still reads each weight once per pass, so the
 * arithmetic should cost little more than a one-row step. oneDNN's packed fp32 GEMM is built
 * for larger tiles: on the embedded model's projections an 8-row pass takes about as long as
 * a 16-row one. Here the weight is repacked once (``pack`` in kernels/cpu_sgemm.py) into
 * panels of 16 output columns stored k-major,
 *
 *   packed[p][k][c] = w[16 p + c][k]
 *
 * and a register tile of up to MR rows by two panels (32 columns) walks k: per step it loads
 * two weight vectors, broadcasts each x value of the tile's rows, and does MR x 2 FMAs. The
 * weights are read from two contiguous streams; a tile of rows past MR takes another pass over
 * the same panels, which are then in the cache. N must be a multiple of 32 (callers check).
 *
 * Each output is one fused multiply-add chain over k = 0, 1, ..., K - 1 from zero, so its value
 * does not depend on M or on the row's place in the batch (rows are independent), only on x's
 * row and w. Needs AVX-512F (MR 12) or AVX2 with FMA (MR 2); built elsewhere, the library
 * reports 0 from nld_sgemm_available and the callers keep oneDNN.
 *
 * Panels may hold bf16 instead of fp32 (nld_sgemm_bf16w) where every weight is a bf16 value,
 * as when a bf16 checkpoint is served in fp32: each weight is widened exactly (a 16-bit shift)
 * before its FMA, so the results are the fp32 panels' bit for bit, from half the bytes. A
 * one-row pass is bound by those bytes.
 */
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>

#if defined(__AVX512F__)
#define MR 12 /* 24 accumulators + 2 weight vectors + 1 broadcast of the 32 zmm registers */
#define VPP 1 /* vectors per 16-column panel */
typedef __m512 vf;
#define VLOAD(p) _mm512_loadu_ps(p)
#define VSTORE(p, v) _mm512_storeu_ps(p, v)
#define VBCAST(p) _mm512_set1_ps(*(p))
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VZERO() _mm512_setzero_ps()
#else
#define MR 2 /* 8 accumulators + 4 weight vectors + 1 broadcast of the 16 ymm registers */
#define VPP 2
typedef __m256 vf;
#define VLOAD(p) _mm256_loadu_ps(p)
#define VSTORE(p, v) _mm256_storeu_ps(p, v)
#define VBCAST(p) _mm256_broadcast_ss(p)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VZERO() _mm256_setzero_ps()
#endif
#define NV (2 * VPP) /* vectors per step: two panels */
#define VW (16 / VPP)

#ifndef PF_LINES
#define PF_LINES 16 /* software prefetch distance in each panel stream, in k steps of 64 bytes */
#endif

int nld_sgemm_available(void) { return 1; }

/* 16 (AVX-512) or 8 (AVX2) weights from panel element i: fp32, or bf16 widened exactly */
static inline __attribute__((always_inline)) vf load_weights(const void* panels, int64_t i, int bf16) {
    if (!bf16) return VLOAD((const float*)panels + i);
    const uint16_t* w = (const uint16_t*)panels + i;
#if defined(__AVX512F__)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)w)), 16));
#else
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)w)), 16));
#endif
}

/* rows [m0, m0 + R) of x against panels p and p + 1 (columns 16 p .. 16 p + 31); the panels
 * hold fp32 or (bf16) bfloat16 weights, widened to the same fp32 values before the FMAs. */
static inline __attribute__((always_inline)) void tile(const float* x, const void* panels, float* y, int64_t m0,
                                                        int R, int64_t p, int64_t N, int64_t K, int bf16) {
    const int64_t esize = bf16 ? 2 : 4, w0 = p * K * 16, w1 = w0 + K * 16;
    /* the same prefetch distance in bytes for either element size */
    const int64_t ahead = (bf16 ? 2 : 1) * PF_LINES * 16;
    const char* base = (const char*)panels;
    const float* xr = x + m0 * K;
    vf acc[MR][NV];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = VZERO();
    for (int64_t k = 0; k < K; k++) {
        _mm_prefetch(base + (w0 + k * 16 + ahead) * esize, _MM_HINT_T0);
        _mm_prefetch(base + (w1 + k * 16 + ahead) * esize, _MM_HINT_T0);
        vf wv[NV];
        for (int v = 0; v < VPP; v++) {
            wv[v] = load_weights(panels, w0 + k * 16 + v * VW, bf16);
            wv[VPP + v] = load_weights(panels, w1 + k * 16 + v * VW, bf16);
        }
        for (int r = 0; r < R; r++) {
            const vf b = VBCAST(xr + r * K + k);
            for (int v = 0; v < NV; v++) acc[r][v] = VFMA(b, wv[v], acc[r][v]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) VSTORE(y + (m0 + r) * N + p * 16 + v * VW, acc[r][v]);
}

/* R is a constant in each case, so the loops above unroll and the accumulators stay in registers. */
static inline __attribute__((always_inline)) void tile_rows(const float* x, const void* panels, float* y, int64_t m0,
                                                             int R, int64_t p, int64_t N, int64_t K, int bf16) {
    switch (R) {
#define CASE(n) \
    case n: tile(x, panels, y, m0, n, p, N, K, bf16); break;
        CASE(1) CASE(2)
#if MR > 2
        CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8) CASE(9) CASE(10) CASE(11) CASE(12)
#endif
#undef CASE
        default: break;
    }
}

/* x [M, K], y [M, N] row-major and contiguous; packed as above. Work items: pairs of panels;
 * rows are cut into even chunks of at most MR, which a thread runs one after the other over
 * its panels. */
static void sgemm(const float* x, const void* packed, float* y, int64_t M, int64_t N, int64_t K, int threads,
                  int bf16) {
    const int64_t chunks = (M + MR - 1) / MR, pairs = N / 32;
    if (M == 0) return;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t pair = 0; pair < pairs; pair++)
        for (int64_t c = 0; c < chunks; c++) {
            const int64_t m0 = c * M / chunks, m1 = (c + 1) * M / chunks;
            if (bf16) tile_rows(x, packed, y, m0, (int)(m1 - m0), 2 * pair, N, K, 1);
            else tile_rows(x, packed, y, m0, (int)(m1 - m0), 2 * pair, N, K, 0);
        }
}

void nld_sgemm_f32(const float* x, const float* packed, float* y, int64_t M, int64_t N, int64_t K, int threads) {
    sgemm(x, packed, y, M, N, K, threads, 0);
}

/* the same with bf16 panels (weights that are bf16 values, e.g. a bf16 checkpoint served in
 * fp32): half the bytes streamed, the same products and sums */
void nld_sgemm_bf16w(const float* x, const uint16_t* packed, float* y, int64_t M, int64_t N, int64_t K, int threads) {
    sgemm(x, packed, y, M, N, K, threads, 1);
}

#if defined(__AVX512BF16__)
#include "cpu_bf16.h"

/* bf16 activations against bf16 weights (a model served in bf16): VDPBF16PS multiplies
 * pairs of bf16 values and adds both products to an fp32 lane, twice the multiply-adds per
 * instruction of an fp32 FMA. The weights are pair panels,
 *
 *   pairs[p][k / 2][c][k % 2] = w[16 p + c][k]     (K even)
 *
 * so one 64-byte vector holds k and k + 1 of a panel's 16 columns, and each x pair is one
 * 32-bit broadcast. Each output is one accumulation chain over the pairs in k order from zero,
 * rounded to bf16 (nearest even) once at the end, so a row's result does not depend on the
 * other rows of the pass. */
static inline __attribute__((always_inline)) void pair_tile(const uint16_t* x, const uint16_t* pairs, uint16_t* y,
                                                             int64_t m0, int R, int64_t p, int64_t N, int64_t K) {
    const int64_t w0 = p * K * 16, w1 = w0 + K * 16, ahead = 2 * PF_LINES * 16;
    const uint16_t* xr = x + m0 * K;
    __m512 acc[MR][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 2) {
        _mm_prefetch((const char*)(pairs + w0 + k * 16 + ahead), _MM_HINT_T0);
        _mm_prefetch((const char*)(pairs + w1 + k * 16 + ahead), _MM_HINT_T0);
        const __m512bh a = (__m512bh)_mm512_loadu_si512(pairs + w0 + k * 16);
        const __m512bh b = (__m512bh)_mm512_loadu_si512(pairs + w1 + k * 16);
        for (int r = 0; r < R; r++) {
            uint32_t pair;
            memcpy(&pair, xr + r * K + k, 4);
            const __m512bh xv = (__m512bh)_mm512_set1_epi32((int)pair);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xv, a);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xv, b);
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < 2; v++) {
            const __m512i bits = round_bf16_bits(_mm512_castps_si512(acc[r][v]));
            _mm256_storeu_si256((__m256i*)(y + (m0 + r) * N + p * 16 + v * 16),
                                _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
        }
}

static inline __attribute__((always_inline)) void pair_tile_rows(const uint16_t* x, const uint16_t* pairs, uint16_t* y,
                                                                  int64_t m0, int R, int64_t p, int64_t N, int64_t K) {
    switch (R) {
#define CASE(n) \
    case n: pair_tile(x, pairs, y, m0, n, p, N, K); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8) CASE(9) CASE(10) CASE(11) CASE(12)
#undef CASE
        default: break;
    }
}

int nld_gemm_bf16_available(void) { return 1; }

/* y [M, N] bf16 = x [M, K] bf16 @ w^T, w as pair panels; N a multiple of 32, K even. */
void nld_gemm_bf16(const uint16_t* x, const uint16_t* pairs, uint16_t* y, int64_t M, int64_t N, int64_t K,
                   int threads) {
    const int64_t chunks = (M + MR - 1) / MR, panel_pairs = N / 32;
    if (M == 0) return;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t pp = 0; pp < panel_pairs; pp++)
        for (int64_t c = 0; c < chunks; c++) {
            const int64_t m0 = c * M / chunks, m1 = (c + 1) * M / chunks;
            pair_tile_rows(x, pairs, y, m0, (int)(m1 - m0), 2 * pp, N, K);
        }
}
#else
int nld_gemm_bf16_available(void) { return 0; }
void nld_gemm_bf16(const uint16_t* x, const uint16_t* pairs, uint16_t* y, int64_t M, int64_t N, int64_t K,
                   int threads) {
    (void)x, (void)pairs, (void)y, (void)M, (void)N, (void)K, (void)threads;
}
#endif
#else
int nld_sgemm_available(void) { return 0; }
void nld_sgemm_f32(const float* x, const float* packed, float* y, int64_t M, int64_t N, int64_t K, int threads) {
    (void)x, (void)packed, (void)y, (void)M, (void)N, (void)K, (void)threads;
}
void nld_sgemm_bf16w(const float* x, const uint16_t* packed, float* y, int64_t M, int64_t N, int64_t K, int threads) {
    (void)x, (void)packed, (void)y, (void)M, (void)N, (void)K, (void)threads;
}
int nld_gemm_bf16_available(void) { return 0; }
void nld_gemm_bf16(const uint16_t* x, const uint16_t* pairs, uint16_t* y, int64_t M, int64_t N, int64_t K,
                   int threads) {
    (void)x, (void)pairs, (void)y, (void)M, (void)N, (void)K, (void)threads;
}
#endif
