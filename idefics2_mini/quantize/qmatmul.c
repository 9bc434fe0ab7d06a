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
#include <stdlib.h>
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

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
/* ------------------------------------------------------- int4 on AVX-512 BF16 (the fast path)
 * The table lookup above costs two shuffles per 32 weights on one port (~16 GB/s on 2 Xeon
 * cores). Here a nibble becomes a bf16 number with no lookup and no conversion: the zero-extended
 * byte b gives 0x4300 | (b & 15) and 0x4300 | (b >> 4), the bf16 bit patterns of 128 + u (u the
 * stored nibble, q = u - 8; exact: bf16 holds the integers 128..143), and vdpbf16ps multiplies
 * 32 of them with 32 bf16 activations per instruction, the products exact, summed in fp32.
 * Per group, with X = sum x over the group's columns:
 *
 *     sum_k W x = s * sum (u - 8) x + z * X = s * sum u x + (z - 8 s) * X
 *
 * and sum u x = sum (128 + u) x - 128 X: each lane's accumulator starts at -128 times the sum of
 * the x values it will meet (precomputed once per call), so the offset cancels inside the group
 * and what is scaled and carried across groups is the small sum u x (fp32-matmul accuracy).
 * x itself is split as x = hi + lo (two bf16 numbers, 16 significant bits: relative error
 * < 2^-16) and both halves are multiplied, unless x is bf16 already (lo == 0 everywhere: one
 * pass); the sums use hi + lo, the values the products used. */
#include <immintrin.h>

static inline uint16_t f32_to_bf16_rne(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline __m512 dp32(__m512 acc, __m512i w, const uint16_t *x) {
    return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)_mm512_loadu_si512(x));
}
static inline __m256 dp16(__m256 acc, __m256i w, const uint16_t *x) {
    return _mm256_dpbf16_ps(acc, (__m256bh)w, (__m256bh)_mm256_loadu_si256((const void *)x));
}

#define INT4_BF16_ROWS(MM)                                                                        \
static void int4bf_rows_##MM(const uint16_t *xh, const uint16_t *xl, const float *xg,             \
                             const float *lane0, int64_t K,                                        \
                             int64_t G, const uint8_t *p, int64_t n0, int64_t n1, int64_t N,      \
                             const uint16_t *scale, const uint16_t *zero, int two_pass, float *y) {\
    const int64_t groups = K / G, half = G / 2;                                                  \
    const __m512i magic = _mm512_set1_epi16(0x4300), nib = _mm512_set1_epi16(0x000F);            \
    const __m256i magic8 = _mm256_set1_epi16(0x4300), nib8 = _mm256_set1_epi16(0x000F);         \
    for (int64_t n = n0; n < n1; n++) {                                                          \
        const uint8_t *row = p + n * (K / 2);                                                    \
        const uint16_t *srow = scale + n * groups, *zrow = zero ? zero + n * groups : 0;         \
        __m512 acc[MM]; float off[MM];                                                           \
        for (int m = 0; m < MM; m++) { acc[m] = _mm512_setzero_ps(); off[m] = 0.f; }             \
        for (int64_t g = 0; g < groups; g++) {                                                   \
            const float s = bf16_to_f32(srow[g]);                                                \
            const float c = (zrow ? bf16_to_f32(zrow[g]) : 0.f) - 8.f * s;                       \
            const uint8_t *bytes = row + g * half;                                               \
            const int64_t col = g * G;                                                           \
            __m512 t[MM];                                                                        \
            for (int m = 0; m < MM; m++) t[m] = _mm512_loadu_ps(lane0 + (m * groups + g) * 16);  \
            if (half == 16) {                                                                    \
                __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const void *)bytes));          \
                __m256i lo = _mm256_ternarylogic_epi32(b, nib8, magic8, 0xEA);                   \
                __m256i hi = _mm256_or_si256(_mm256_srli_epi16(b, 4), magic8);                   \
                for (int m = 0; m < MM; m++) {                                                   \
                    __m256 u = dp16(dp16(_mm512_castps512_ps256(t[m]), lo, xh + m * K + col), hi, xh + m * K + col + 16); \
                    if (two_pass) u = dp16(dp16(u, lo, xl + m * K + col), hi, xl + m * K + col + 16); \
                    t[m] = _mm512_insertf32x8(_mm512_setzero_ps(), u, 0);                        \
                }                                                                                \
            } else {                                                                             \
                for (int64_t j = 0; j < half; j += 32) {                                         \
                    __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const void *)(bytes + j))); \
                    __m512i lo = _mm512_ternarylogic_epi32(b, nib, magic, 0xEA);                 \
                    __m512i hi = _mm512_or_si512(_mm512_srli_epi16(b, 4), magic);                \
                    for (int m = 0; m < MM; m++) {                                               \
                        const int64_t at = m * K + col + j;                                      \
                        t[m] = dp32(dp32(t[m], lo, xh + at), hi, xh + at + half);                \
                        if (two_pass) t[m] = dp32(dp32(t[m], lo, xl + at), hi, xl + at + half);  \
                    }                                                                            \
                }                                                                                \
            }                                                                                    \
            const __m512 sv = _mm512_set1_ps(s);                                                 \
            for (int m = 0; m < MM; m++) {                                                       \
                acc[m] = _mm512_fmadd_ps(t[m], sv, acc[m]);                                      \
                off[m] += c * xg[m * groups + g];                                                \
            }                                                                                    \
        }                                                                                        \
        for (int m = 0; m < MM; m++) y[m * N + n] = _mm512_reduce_add_ps(acc[m]) + off[m];       \
    }                                                                                            \
}
INT4_BF16_ROWS(1) INT4_BF16_ROWS(2) INT4_BF16_ROWS(3) INT4_BF16_ROWS(4)
INT4_BF16_ROWS(5) INT4_BF16_ROWS(6) INT4_BF16_ROWS(7) INT4_BF16_ROWS(8)

typedef void (*int4bf_rows_fn)(const uint16_t *, const uint16_t *, const float *, const float *, int64_t, int64_t,
                               const uint8_t *, int64_t, int64_t, int64_t, const uint16_t *,
                               const uint16_t *, int, float *);
static const int4bf_rows_fn INT4BF_ROWS_FN[MAX_ROWS + 1] = {
    0, int4bf_rows_1, int4bf_rows_2, int4bf_rows_3, int4bf_rows_4, int4bf_rows_5, int4bf_rows_6,
    int4bf_rows_7, int4bf_rows_8};

static int qmm_int4_bf16(const float *x, int64_t M, int64_t K, int64_t G, const uint8_t *packed,
                         int64_t N, const uint16_t *scale, const uint16_t *zero, float *y, int threads) {
    const int64_t groups = K / G, half = G / 2;
    uint16_t *xh = malloc(sizeof(uint16_t) * 2 * M * K);
    float *xg = malloc(sizeof(float) * M * groups * 17); /* per group: X, then 16 lanes' starts */
    if (!xh || !xg) { free(xh); free(xg); return 2; }
    float *lane0 = xg + M * groups;
    uint16_t *xl = xh + M * K;
    int two_pass = 0;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < groups; g++) {
            double sum = 0.0, lanes[16] = {0};
            for (int64_t k = g * G; k < (g + 1) * G; k++) {
                const float v = x[m * K + k];
                const uint16_t h = f32_to_bf16_rne(v);
                const uint16_t l = f32_to_bf16_rne(v - bf16_to_f32(h));
                xh[m * K + k] = h; xl[m * K + k] = l;
                two_pass |= (l & 0x7FFF) != 0;
                const double used = (double)bf16_to_f32(h) + (double)bf16_to_f32(l);
                sum += used;
                lanes[((k - g * G) % half % 32) / 2] += used; /* the lane vdpbf16ps adds it into */
            }
            xg[m * groups + g] = (float)sum;
            for (int i = 0; i < 16; i++) lane0[(m * groups + g) * 16 + i] = (float)(-128.0 * lanes[i]);
        }
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += ROW_BLOCK) {
        int64_t n1 = n0 + ROW_BLOCK < N ? n0 + ROW_BLOCK : N;
        INT4BF_ROWS_FN[M](xh, xl, xg, lane0, K, G, packed, n0, n1, N, scale, zero, two_pass, y);
    }
    free(xh); free(xg);
    return 0;
}
#define HAVE_INT4_BF16 1
#else
#define HAVE_INT4_BF16 0
#endif

/* 1 when qmm_int4 can take the AVX-512 BF16 path on this build (cpu.py reports it) */
int qmm_int4_path(void) { return HAVE_INT4_BF16; }

/* x fp32 [M, K] (M <= 8), packed uint8 [N, K/2], scale/zero bf16 [N, K/G] (zero may be NULL),
 * G a multiple of 32 dividing K -> y fp32 [M, N] */
int qmm_int4(const float *x, int64_t M, int64_t K, int64_t G, const uint8_t *packed, int64_t N,
             const uint16_t *scale, const uint16_t *zero, float *y, int threads) {
    if (M < 1 || M > MAX_ROWS || G % 32 || K % G) return 1;
#if HAVE_INT4_BF16
    /* Measured (benchmarks/quantize.py ops, Xeon, 2 threads): vdpbf16ps is no cheaper here than
     * the table path's lookups + FMAs, so two passes (fp32 x) lose to the table (2.35 vs 2.14 ms
     * on 14336x4096 g64), and with 8 rows even one pass loses (11.7 vs 7.1 ms); one pass at one
     * row wins (bf16 x: 1.76 ms, 18.8 GB/s). So: one row of bf16-exact x, groups of >= 64. */
    if (!getenv("IDEFICS2_MINI_QMM_INT4_TABLE")) { /* set: the portable table path (comparisons) */
        int bf16_exact = 1;
        for (int64_t i = 0; i < M * K && bf16_exact; i++) {
            uint32_t u; memcpy(&u, x + i, 4);
            bf16_exact = (u & 0xFFFFu) == 0;
        }
        if (bf16_exact && M == 1 && G >= 64)
            return qmm_int4_bf16(x, M, K, G, packed, N, scale, zero, y, threads);
    }
#endif
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += ROW_BLOCK) {
        int64_t n1 = n0 + ROW_BLOCK < N ? n0 + ROW_BLOCK : N;
        INT4_ROWS_FN[M](x, K, G, packed, n0, n1, N, scale, zero, y);
    }
    return 0;
}
