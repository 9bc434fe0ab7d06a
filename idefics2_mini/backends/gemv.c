/* bf16 weights times a few rows on the CPU: y = x @ W.T, for decode (idefics2_mini/backends/
 * gemv.py builds this file with the system C compiler and calls it through ctypes).
 *
 *     x bf16 [M, K] (M <= 8), W bf16 [N, K] row-major  ->  y bf16 [M, N]
 *
 * Decode reads every weight once per token, so a bf16 step should take half the time of an fp32
 * one. oneDNN's bf16 inner product, which torch runs for a bf16 F.linear on the CPU, streams a
 * decode-sized weight well below the memory's bandwidth on CPUs without AMX (e.g. AMD Zen 4;
 * benchmarks/bf16_ops.py). Here each weight row is read once for all M rows of x, its 16-bit
 * numbers widened to fp32 in registers (a bf16 is the top half of an fp32: a zero-extend and a
 * shift, exact) and multiplied with x, also widened once, accumulating in fp32; the sum is
 * rounded to bf16 (nearest even) once, as a bf16 matmul does. Written with GCC/Clang vector
 * extensions (LANES floats per vector, the register width), so -march=native picks the machine's
 * instructions; output
 * rows are split over OpenMP threads (torch's own runtime when loaded into a torch process).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROWS 8
#define ROW_BLOCK 16 /* output rows per OpenMP work item */

/* Lanes per vector: the machine's register width. Without AVX-512, 16-float vectors would be
 * pairs of AVX2 registers, and a tile's accumulators and widened weights would not fit the 16
 * registers: on 2 AMD EPYC (Zen 3) cores the spills cost half the speed (one row of x, weights
 * from memory: 7.9-8.6 GB/s with 16 lanes, 14.9-15.3 with 8; 8 rows 1.2-1.3 -> 6.0-6.7). */
#ifndef LANES
#if defined(__AVX512F__)
#define LANES 16
#else
#define LANES 8
#endif
#endif
typedef float vf __attribute__((vector_size(LANES * 4)));
typedef uint32_t vu32 __attribute__((vector_size(LANES * 4)));
typedef uint16_t vu16 __attribute__((vector_size(LANES * 2)));

static inline vf load_f32(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline vf bf16_lanes_to_f32(const uint16_t *p) {
    vu16 h; memcpy(&h, p, sizeof h);
    vu32 bits = __builtin_convertvector(h, vu32) << 16;
    vf f; memcpy(&f, &bits, sizeof f); return f;
}
static inline float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; NaN stays NaN */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static inline float hsum(vf v) { float s = 0.f; for (int i = 0; i < LANES; i++) s += v[i]; return s; }

/* Register tile: MM rows of x (<= 4) times NR weight rows, over the whole of K. Each widened
 * weight vector meets MM rows of x and each loaded x vector NR weight rows, so the loads per FMA
 * stay low enough for the loop to run at the memory's pace; with 8 rows of x, a tile of weight
 * rows (NR x K x 2 bytes, in the core's L2) is swept twice. */
#define TILE(MM, NR)                                                                              \
static void tile_##MM##_##NR(const float *x, int64_t K, const uint16_t *w, int64_t n,            \
                             int64_t N, uint16_t *y) {                                           \
    vf acc[MM][NR];                                                                              \
    for (int m = 0; m < MM; m++)                                                                 \
        for (int r = 0; r < NR; r++) acc[m][r] = (vf){0};                                        \
    int64_t k = 0;                                                                               \
    for (; k + LANES <= K; k += LANES) {                                                         \
        vf wv[NR];                                                                               \
        for (int r = 0; r < NR; r++) wv[r] = bf16_lanes_to_f32(w + (n + r) * K + k);             \
        for (int m = 0; m < MM; m++) {                                                           \
            vf xv = load_f32(x + m * K + k);                                                     \
            for (int r = 0; r < NR; r++) acc[m][r] += wv[r] * xv;                                \
        }                                                                                        \
    }                                                                                            \
    for (int m = 0; m < MM; m++)                                                                 \
        for (int r = 0; r < NR; r++) {                                                           \
            float sum = hsum(acc[m][r]);                                                         \
            for (int64_t t = k; t < K; t++) sum += bf16_to_f32(w[(n + r) * K + t]) * x[m * K + t]; \
            y[m * N + n + r] = f32_to_bf16(sum);                                                 \
        }                                                                                        \
}
#define NR 4
TILE(1, 4) TILE(2, 4) TILE(3, 4) TILE(4, 4) TILE(1, 1) TILE(2, 1) TILE(3, 1) TILE(4, 1)

typedef void (*tile_fn)(const float *, int64_t, const uint16_t *, int64_t, int64_t, uint16_t *);
static const tile_fn TILE_NR[5] = {0, tile_1_4, tile_2_4, tile_3_4, tile_4_4};
static const tile_fn TILE_1[5] = {0, tile_1_1, tile_2_1, tile_3_1, tile_4_1};

/* y[:, n0:n1] for all M rows of x, in tiles of <= 4 rows of x and NR (or, at the end, 1) weight rows */
static void rows(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t n0, int64_t n1,
                 int64_t N, uint16_t *y) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        int64_t mm = M - m0 < 4 ? M - m0 : 4;
        int64_t n = n0;
        for (; n + NR <= n1; n += NR) TILE_NR[mm](x + m0 * K, K, w, n, N, y + m0 * N);
        for (; n < n1; n++) TILE_1[mm](x + m0 * K, K, w, n, N, y + m0 * N);
    }
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
/* On CPUs with AVX-512 BF16, vdpbf16ps multiplies 32 bf16 weights with 32 bf16 values of x in
 * one instruction (each product exact in fp32, summed in fp32): no widening of w or x, half the
 * bytes of x to load, twice the multiply-adds per instruction. K is taken 32 at a time; the rest
 * (K % 32) by the scalar loop. */
#include <immintrin.h>
#define HAVE_DPBF16 1
#define DTILE(MM, NR)                                                                             \
static void dtile_##MM##_##NR(const uint16_t *x, int64_t K, const uint16_t *w, int64_t n,        \
                              int64_t N, uint16_t *y) {                                          \
    __m512 acc[MM][NR];                                                                          \
    for (int m = 0; m < MM; m++)                                                                 \
        for (int r = 0; r < NR; r++) acc[m][r] = _mm512_setzero_ps();                            \
    int64_t k = 0;                                                                               \
    for (; k + 32 <= K; k += 32) {                                                               \
        __m512i wv[NR];                                                                          \
        for (int r = 0; r < NR; r++) wv[r] = _mm512_loadu_si512(w + (n + r) * K + k);            \
        for (int m = 0; m < MM; m++) {                                                           \
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);                           \
            for (int r = 0; r < NR; r++) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)wv[r], xv); \
        }                                                                                        \
    }                                                                                            \
    for (int m = 0; m < MM; m++)                                                                 \
        for (int r = 0; r < NR; r++) {                                                           \
            float sum = _mm512_reduce_add_ps(acc[m][r]);                                         \
            for (int64_t t = k; t < K; t++) sum += bf16_to_f32(w[(n + r) * K + t]) * bf16_to_f32(x[m * K + t]); \
            y[m * N + n + r] = f32_to_bf16(sum);                                                 \
        }                                                                                        \
}
DTILE(1, 4) DTILE(2, 4) DTILE(3, 4) DTILE(4, 4) DTILE(1, 1) DTILE(2, 1) DTILE(3, 1) DTILE(4, 1)

typedef void (*dtile_fn)(const uint16_t *, int64_t, const uint16_t *, int64_t, int64_t, uint16_t *);
static const dtile_fn DTILE_NR[5] = {0, dtile_1_4, dtile_2_4, dtile_3_4, dtile_4_4};
static const dtile_fn DTILE_1[5] = {0, dtile_1_1, dtile_2_1, dtile_3_1, dtile_4_1};

static void drows(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t n0, int64_t n1,
                  int64_t N, uint16_t *y) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        int64_t mm = M - m0 < 4 ? M - m0 : 4;
        int64_t n = n0;
        for (; n + NR <= n1; n += NR) DTILE_NR[mm](x + m0 * K, K, w, n, N, y + m0 * N);
        for (; n < n1; n++) DTILE_1[mm](x + m0 * K, K, w, n, N, y + m0 * N);
    }
}
#else
#define HAVE_DPBF16 0
#endif

/* 1 when gemv_bf16 multiplies with vdpbf16ps on this build (gemv.py reports it) */
int gemv_dpbf16(void) { return HAVE_DPBF16; }

/* x bf16 [M, K] (M <= 8), w bf16 [N, K] -> y bf16 [M, N]; 0 on success. */
int gemv_bf16(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, uint16_t *y, int threads) {
    if (M < 1 || M > MAX_ROWS || K < 1 || N < 1) return 1;
#if HAVE_DPBF16
    if (!getenv("IDEFICS2_MINI_GEMV_FMA")) {
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += ROW_BLOCK) {
            int64_t n1 = n0 + ROW_BLOCK < N ? n0 + ROW_BLOCK : N;
            drows(x, M, K, w, n0, n1, N, y);
        }
        return 0;
    }
#endif
    float *x32 = malloc((size_t)(M * K) * sizeof(float));
    if (!x32) return 2;
    for (int64_t i = 0; i < M * K; i++) x32[i] = bf16_to_f32(x[i]);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += ROW_BLOCK) {
        int64_t n1 = n0 + ROW_BLOCK < N ? n0 + ROW_BLOCK : N;
        rows(x32, M, K, w, n0, n1, N, y);
    }
    free(x32);
    return 0;
}
