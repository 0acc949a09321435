/* bf16 projections of 5 or more rows on AMX: y[M, N] = x[M, K] @ w[N, K]^T.
 *
 * A batched decode step (5-32 rows), a block of diffusion or a verify pass still only streams
 * each weight matrix once per 16 rows, so memory bandwidth is most of its cost, as in
 * kernels/cpu_gemv.c. oneDNN's packed bf16 GEMM reaches about half of this machine's
 * bandwidth there. Here the weight is repacked once (nld_amx_pack_bf16) into the tiles the AMX
 * unit multiplies, in the order the kernel reads them, so each thread reads one contiguous
 * stream per group of 64 output columns:
 *
 *   packed[g][kb][j][p][c][2] = w[64 g + 16 j + c][32 kb + 2 p + {0, 1}]
 *
 * g: group of up to 4 column blocks j of 16 columns c; kb: block of 32 k; p: pair of k (the
 * VNNI layout of TDPBF16PS's B operand). N must be a multiple of 16 and K of 32 (callers check;
 * the last group holds N / 16 % 4 blocks when that is not 0).
 *
 * Products of bf16 are exact in fp32; TDPBF16PS sums them in fp32, flushing denormal inputs
 * and outputs to zero. Outputs are rounded to nearest even bf16, as kernels/cpu_bf16.h does.
 * Needs a compiler targeting AMX-BF16 (-march=native on such a CPU) and the kernel's leave to
 * use the tile registers (nld_amx_init, once per process).
 */
#include <stdint.h>
#include <string.h>

#include "cpu_bf16.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* 1 where the process may use the tile registers (asks the kernel for them), else 0. */
int nld_amx_init(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0; }

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Tile registers: x rows (A) in tmm0 (and tmm1 for rows 16-31 of a 32-row chunk), weight
 * tiles (B) in the next free ones, sums (C) in tmm4-7. rows: the chunk's x rows (1-32). */
static void configure(int rows) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    const int top = rows > 16 ? 16 : rows, bottom = rows > 16 ? rows - 16 : 16;
    const uint8_t tile_rows[8] = {top, bottom, 16, 16, top, top, rows > 16 ? bottom : top, rows > 16 ? bottom : top};
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = tile_rows[t];
    }
    _tile_loadconfig(&cfg);
}

#ifndef PF_BYTES
#define PF_BYTES 8192 /* software prefetch distance in the weight stream (measured: 2-16 KB) */
#endif
#define TILE_BYTES 1024 /* one B tile: 16 pairs of k x 16 columns x 2 bf16 */

/* C tile t (rows x 16 sums) into y's rows [m0, m0 + rows) and columns [col, col + 16) */
#define STORE_C(t, m0, rows, col)                                                   \
    do {                                                                            \
        float sums[16][16];                                                         \
        _tile_stored(t, sums, 64);                                                  \
        for (int r = 0; r < (rows); r++) narrow(sums[r], y + ((m0) + r) * N + (col), 16, 1); \
    } while (0)

/* x rows [m0, m0 + rows), rows <= 16, against the group's column blocks (1-4). */
static void group16(const uint16_t* x, const char* src, uint16_t* y, int64_t m0, int rows, int64_t col, int blocks,
                    int64_t N, int64_t K) {
    const int64_t stride = (int64_t)blocks * TILE_BYTES; /* bytes per k block of this group */
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    for (int64_t kb = 0; kb < K / 32; kb++) {
        const char* b = src + kb * stride;
        for (int64_t line = 0; line < stride; line += 64) _mm_prefetch(b + PF_BYTES + line, _MM_HINT_T0);
        _tile_loadd(0, x + m0 * K + kb * 32, K * 2);
        _tile_loadd(2, b, 64);
        _tile_dpbf16ps(4, 0, 2);
        if (blocks > 1) {
            _tile_loadd(3, b + TILE_BYTES, 64);
            _tile_dpbf16ps(5, 0, 3);
        }
        if (blocks > 2) {
            _tile_loadd(2, b + 2 * TILE_BYTES, 64);
            _tile_dpbf16ps(6, 0, 2);
        }
        if (blocks > 3) {
            _tile_loadd(3, b + 3 * TILE_BYTES, 64);
            _tile_dpbf16ps(7, 0, 3);
        }
    }
    STORE_C(4, m0, rows, col);
    if (blocks > 1) STORE_C(5, m0, rows, col + 16);
    if (blocks > 2) STORE_C(6, m0, rows, col + 32);
    if (blocks > 3) STORE_C(7, m0, rows, col + 48);
}

/* x rows [m0, m0 + rows), 16 < rows <= 32, against the group's column blocks two at a time:
 * each weight tile meets both halves of the rows. */
static void group32(const uint16_t* x, const char* src, uint16_t* y, int64_t m0, int rows, int64_t col, int blocks,
                    int64_t N, int64_t K) {
    const int64_t stride = (int64_t)blocks * TILE_BYTES;
    for (int j = 0; j < blocks; j += 2) {
        const int pair = blocks - j > 1;
        _tile_zero(4);
        _tile_zero(5);
        _tile_zero(6);
        _tile_zero(7);
        for (int64_t kb = 0; kb < K / 32; kb++) {
            const char* b = src + kb * stride + j * TILE_BYTES;
            for (int line = 0; line < (pair ? 2 : 1) * TILE_BYTES; line += 64)
                _mm_prefetch(b + PF_BYTES + line, _MM_HINT_T0);
            _tile_loadd(0, x + m0 * K + kb * 32, K * 2);
            _tile_loadd(1, x + (m0 + 16) * K + kb * 32, K * 2);
            _tile_loadd(2, b, 64);
            _tile_dpbf16ps(4, 0, 2);
            _tile_dpbf16ps(6, 1, 2);
            if (pair) {
                _tile_loadd(3, b + TILE_BYTES, 64);
                _tile_dpbf16ps(5, 0, 3);
                _tile_dpbf16ps(7, 1, 3);
            }
        }
        STORE_C(4, m0, 16, col + 16 * j);
        STORE_C(6, m0 + 16, rows - 16, col + 16 * j);
        if (pair) {
            STORE_C(5, m0, 16, col + 16 * j + 16);
            STORE_C(7, m0 + 16, rows - 16, col + 16 * j + 16);
        }
    }
}

/* x [M, K], y [M, N] row-major and contiguous, packed as above. Work items: a group of
 * columns times a chunk of 32 rows; a thread takes a group's chunks one after the other, so
 * the group's weights come from its cache after the first. */
void nld_amx_linear_bf16(const uint16_t* x, const uint16_t* packed, uint16_t* y, int64_t M, int64_t N, int64_t K,
                         int threads) {
    const int64_t groups = (N / 16 + 3) / 4, chunks = (M + 31) / 32;
#pragma omp parallel num_threads(threads)
    {
        int configured = -1;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < groups * chunks; item++) {
            const int64_t g = item / chunks, m0 = item % chunks * 32;
            const int rows = (int)(M - m0 < 32 ? M - m0 : 32);
            const int blocks = (int)(N / 16 - g * 4 < 4 ? N / 16 - g * 4 : 4);
            const char* src = (const char*)packed + g * 4 * (K / 32) * TILE_BYTES;
            if (rows != configured) {
                configure(rows);
                configured = rows;
            }
            if (rows <= 16) group16(x, src, y, m0, rows, g * 64, blocks, N, K);
            else group32(x, src, y, m0, rows, g * 64, blocks, N, K);
        }
        if (configured >= 0) _tile_release();
    }
}
#else
int nld_amx_init(void) { return 0; }
void nld_amx_linear_bf16(const uint16_t* x, const uint16_t* packed, uint16_t* y, int64_t M, int64_t N, int64_t K,
                         int threads) {
    (void)x, (void)packed, (void)y, (void)M, (void)N, (void)K, (void)threads;
}
#endif
