/* bf16 <-> fp32 for the C kernels (kernels/cpu_*.c). */
#ifndef NLD_CPU_BF16_H
#define NLD_CPU_BF16_H
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* exact: bf16 is the top half of an fp32 */
static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* round to nearest, ties to even; a NaN stays a (quiet) NaN */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#if defined(__AVX512F__)
/* the bit patterns of 16 fp32 values rounded to bf16 (low 16 bits zero), as f32_to_bf16 */
static inline __m512i round_bf16_bits(__m512i u) {
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    const __m512i r = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
    return _mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000u));
}
#endif

/* d values at p (bf16 or fp32) widened into dst (fp32) */
static inline void widen(const void* p, float* dst, int64_t d, int bf16) {
    if (!bf16) {
        memcpy(dst, p, sizeof(float) * d);
        return;
    }
    const uint16_t* src = (const uint16_t*)p;
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= d; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(
                                      _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(src + i))), 16)));
#elif defined(__AVX2__)
    for (; i + 8 <= d; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(
                                      _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(src + i))), 16)));
#endif
    for (; i < d; i++) dst[i] = bf16_to_f32(src[i]);
}

/* n fp32 values into p: bf16 rounded to nearest even, or fp32 */
static inline void narrow(const float* src, void* p, int64_t n, int bf16) {
    if (!bf16) {
        memcpy(p, src, sizeof(float) * n);
        return;
    }
    uint16_t* dst = (uint16_t*)p;
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) {
        const __m512i r = round_bf16_bits(_mm512_loadu_si512(src + i));
        _mm256_storeu_si256((__m256i*)(dst + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
    }
#endif
    for (; i < n; i++) dst[i] = f32_to_bf16(src[i]);
}

/* v[i] = the value v[i] takes when stored as bf16 (bf16 = 1) or unchanged (fp32) */
static inline void round_to_dtype(float* v, int64_t n, int bf16) {
    if (!bf16) return;
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) _mm512_storeu_si512(v + i, round_bf16_bits(_mm512_loadu_si512(v + i)));
#endif
    for (; i < n; i++) v[i] = bf16_to_f32(f32_to_bf16(v[i]));
}
#endif
