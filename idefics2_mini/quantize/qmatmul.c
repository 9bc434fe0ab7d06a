/* Weight-only quantized matmul for a few rows on the CPU: y = x @ W.T with W stored as int8 or
 * int4 (the format of kernels/dequant_matmul.py; idefics2_mini/quantize/cpu.py compiles this
 * file with the system C compiler and calls it through ctypes).
 *
 *     W[n, k] = q[n, k] * s[n, g] + z[n, g]      (g = k / G; z = 0 when symmetric)
 *     y[m, n] = sum_g ( s[n, g] * sum_{k in g} q[n, k] x[m, k]  +  z[n, g] * sum_{k in g} x[m, k] )
 *
 * Decode reads every weight once per token, so what matters is streaming q at the memory's
 * bandwidth: each weight row is read once for all M (<= 8) rows of x, the integers are widened
 * to fp32 in registers and multiplied with x (fp32) there, accumulating in fp32. Written with
 * GCC/Clang vector extensions (16 floats per vector), so the compiler picks the instructions of
 * the machine it is built on (-march=native: AVX-512, AVX2, NEON); output rows are split over
 * OpenMP threads (torch's own OpenMP runtime when loaded into a torch process).
 */
#include <stdint.h>
#include <string.h>

#define MAX_ROWS 8
#define ROW_BLOCK 16 /* output rows per OpenMP work item */

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i32 __attribute__((vector_size(64)));
typedef uint8_t v16u8 __attribute__((vector_size(16)));

static inline v16f load_f32(const float *p) { v16f v; memcpy(&v, p, sizeof v); return v; }
/* Widening goes through unsigned bytes: GCC vectorises uint8 -> int32 (vpmovzxbd on x86) but
 * scalarises a signed int8 conversion; the offset is subtracted exactly, in int32. */
static inline v16f int8_to_f32(const int8_t *p) {
    v16u8 b; memcpy(&b, p, 16);
    return __builtin_convertvector(__builtin_convertvector(b ^ 0x80, v16i32) - 128, v16f);
}
static inline float hsum(v16f v) { float s = 0.f; for (int i = 0; i < 16; i++) s += v[i]; return s; }
static inline float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

/* ------------------------------------------------------------------------------------ int8 */

#define INT8_ROWS(MM)                                                                             \
static void int8_rows_##MM(const float *x, int64_t K, const int8_t *q, int64_t n0, int64_t n1,   \
                           int64_t N, const float *scale, const float *zero, const float *xsum,  \
                           float *y) {                                                           \
    for (int64_t n = n0; n < n1; n++) {                                                          \
        const int8_t *row = q + n * K;                                                           \
        v16f acc[MM], acc2[MM]; /* two independent FMA chains per row of x */                    \
        for (int m = 0; m < MM; m++) acc[m] = acc2[m] = (v16f){0};                               \
        int64_t k = 0;                                                                           \
        for (; k + 32 <= K; k += 32) {                                                           \
            v16f w = int8_to_f32(row + k), w2 = int8_to_f32(row + k + 16);                       \
            for (int m = 0; m < MM; m++) {                                                       \
                acc[m] += w * load_f32(x + m * K + k);                                           \
                acc2[m] += w2 * load_f32(x + m * K + k + 16);                                    \
            }                                                                                    \
        }                                                                                        \
        for (; k + 16 <= K; k += 16) {                                                           \
            v16f w = int8_to_f32(row + k);                                                       \
            for (int m = 0; m < MM; m++) acc[m] += w * load_f32(x + m * K + k);                  \
        }                                                                                        \
        for (int m = 0; m < MM; m++) {                                                           \
            float sum = hsum(acc[m] + acc2[m]);                                                  \
            for (int64_t t = k; t < K; t++) sum += (float)row[t] * x[m * K + t];                 \
            y[m * N + n] = sum * scale[n] + (zero ? zero[n] * xsum[m] : 0.f);                    \
        }                                                                                        \
    }                                                                                            \
}
INT8_ROWS(1) INT8_ROWS(2) INT8_ROWS(3) INT8_ROWS(4) INT8_ROWS(5) INT8_ROWS(6) INT8_ROWS(7) INT8_ROWS(8)

typedef void (*int8_rows_fn)(const float *, int64_t, const int8_t *, int64_t, int64_t, int64_t,
                             const float *, const float *, const float *, float *);
static const int8_rows_fn INT8_ROWS_FN[MAX_ROWS + 1] = {
    0, int8_rows_1, int8_rows_2, int8_rows_3, int8_rows_4, int8_rows_5, int8_rows_6, int8_rows_7, int8_rows_8};

/* x fp32 [M, K] (M <= 8), q int8 [N, K], scale/zero fp32 [N] (zero may be NULL) -> y fp32 [M, N] */
int qmm_int8(const float *x, int64_t M, int64_t K, const int8_t *q, int64_t N, const float *scale,
             const float *zero, float *y, int threads) {
    if (M < 1 || M > MAX_ROWS) return 1;
    float xsum[MAX_ROWS] = {0};
    if (zero)
        for (int64_t m = 0; m < M; m++)
            for (int64_t k = 0; k < K; k++) xsum[m] += x[m * K + k];
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += ROW_BLOCK) {
        int64_t n1 = n0 + ROW_BLOCK < N ? n0 + ROW_BLOCK : N;
        INT8_ROWS_FN[M](x, K, q, n0, n1, N, scale, zero, xsum, y);
    }
    return 0;
}

/* ------------------------------------------------------------------------------------ int4 */
/* Within a group of G columns, byte j holds column j (low nibble) and column j + G/2 (high
 * nibble), each as q + 8. Dequantizing is a table lookup: the group's 16 possible weights
 * (q * s + z for q = -8..7) are one vector, and each nibble, widened to 32 bits, indexes it
 * (__builtin_shuffle: one vpermps on AVX-512). Chunks of 16 bytes (32 weights) alternate
 * between two sets of accumulators, held in registers, so consecutive chunks start
 * independent FMA chains: two groups per step for G = 32, two chunks of a group otherwise. */

static const v16f NIBBLE_VALUES = {-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7};

static inline v16f group_table(const uint16_t *scale, const uint16_t *zero, int64_t at) {
    return NIBBLE_VALUES * bf16_to_f32(scale[at]) + (zero ? bf16_to_f32(zero[at]) : 0.f);
}

/* ACC[m] += the chunk of 16 bytes at BYTES (columns COL.. and COL + half..) times x */
#define INT4_CHUNK(MM, ACC, TABLE, BYTES, COL)                                                    \
    {                                                                                            \
        v16u8 b; memcpy(&b, (BYTES), 16);                                                        \
        v16f low = __builtin_shuffle((TABLE), __builtin_convertvector(b & 15, v16i32));          \
        v16f high = __builtin_shuffle((TABLE), __builtin_convertvector(b >> 4, v16i32));         \
        for (int m = 0; m < MM; m++)                                                             \
            ACC[m] += low * load_f32(x + m * K + (COL)) + high * load_f32(x + m * K + (COL) + half); \
    }

#define INT4_ROWS(MM)                                                                             \
static void int4_rows_##MM(const float *x, int64_t K, int64_t G, const uint8_t *p, int64_t n0,   \
                           int64_t n1, int64_t N, const uint16_t *scale, const uint16_t *zero,   \
                           float *y) {                                                           \
    const int64_t groups = K / G, half = G / 2;                                                  \
    for (int64_t n = n0; n < n1; n++) {                                                          \
        const uint8_t *row = p + n * (K / 2);                                                    \
        const int64_t first = n * groups;                                                        \
        v16f acc0[MM], acc1[MM];                                                                 \
        for (int m = 0; m < MM; m++) acc0[m] = acc1[m] = (v16f){0};                              \
        if (half == 16) {                                                                        \
            int64_t g = 0;                                                                       \
            for (; g + 2 <= groups; g += 2) {                                                    \
                v16f t0 = group_table(scale, zero, first + g), t1 = group_table(scale, zero, first + g + 1); \
                INT4_CHUNK(MM, acc0, t0, row + g * 16, g * 32)                                   \
                INT4_CHUNK(MM, acc1, t1, row + (g + 1) * 16, (g + 1) * 32)                       \
            }                                                                                    \
            if (g < groups) {                                                                    \
                v16f t0 = group_table(scale, zero, first + g);                                   \
                INT4_CHUNK(MM, acc0, t0, row + g * 16, g * 32)                                   \
            }                                                                                    \
        } else { /* half: a multiple of 32 */                                                    \
            for (int64_t g = 0; g < groups; g++) {                                               \
                v16f t = group_table(scale, zero, first + g);                                    \
                for (int64_t j = 0; j < half; j += 32) {                                         \
                    INT4_CHUNK(MM, acc0, t, row + g * half + j, g * G + j)                       \
                    INT4_CHUNK(MM, acc1, t, row + g * half + j + 16, g * G + j + 16)             \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
        for (int m = 0; m < MM; m++) y[m * N + n] = hsum(acc0[m] + acc1[m]);                     \
    }                                                                                            \
}
INT4_ROWS(1) INT4_ROWS(2) INT4_ROWS(3) INT4_ROWS(4) INT4_ROWS(5) INT4_ROWS(6) INT4_ROWS(7) INT4_ROWS(8)

typedef void (*int4_rows_fn)(const float *, int64_t, int64_t, const uint8_t *, int64_t, int64_t, int64_t,
                             const uint16_t *, const uint16_t *, float *);
static const int4_rows_fn INT4_ROWS_FN[MAX_ROWS + 1] = {
    0, int4_rows_1, int4_rows_2, int4_rows_3, int4_rows_4, int4_rows_5, int4_rows_6, int4_rows_7, int4_rows_8};

/* x fp32 [M, K] (M <= 8), packed uint8 [N, K/2], scale/zero bf16 [N, K/G] (zero may be NULL),
 * G a multiple of 32 dividing K -> y fp32 [M, N] */
int qmm_int4(const float *x, int64_t M, int64_t K, int64_t G, const uint8_t *packed, int64_t N,
             const uint16_t *scale, const uint16_t *zero, float *y, int threads) {
    if (M < 1 || M > MAX_ROWS || G % 32 || K % G) return 1;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += ROW_BLOCK) {
        int64_t n1 = n0 + ROW_BLOCK < N ? n0 + ROW_BLOCK : N;
        INT4_ROWS_FN[M](x, K, G, packed, n0, n1, N, scale, zero, y);
    }
    return 0;
}
