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
 * OpenMP threads (torch's own OpenMP runtime when loaded into a torch process). Faster paths
 * keep the weights integers, on AVX-512 VNNI and on AVX2 (below); cpu.py picks a path per call.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROWS 8
#define ROW_BLOCK 16 /* output rows per OpenMP work item */
/* The integer paths ("vnni", "avx2") put x on a 16-bit grid: x16 = round(x * X16_MAX / max|x|)
 * per block of XBLOCK8 columns (int8) or per group (int4); cpu.py and the tests know these. */
#define XBLOCK8 128
#define X16_MAX 32639  /* 127 * 256 + 127: "vnni"'s int4 splits x16 into two signed bytes */

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

static int qmm_int8_fp32(const float *x, int64_t M, int64_t K, const int8_t *q, int64_t N, const float *scale,
                         const float *zero, float *y, int threads) {
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


#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
/* ---------------------------------------------------- AVX-512 VNNI: integer dot products (fastest)
 * The fp32 paths above spend 3-5 instructions per 16 weights turning integers into floats
 * before one FMA; on 2 EPYC (Zen 4) cores that is compute-bound at ~15 GB/s (int8) and ~11 GB/s
 * (int4, table) where the memory gives ~30. Here the weights stay integers and x is rounded
 * to 16-bit integers instead (per call, O(M K), vectorised), so one instruction multiplies and
 * adds 32 (vpdpwssd: int16 x int16) or 64 (vpdpbusd: uint8 x int8) products in int32:
 *
 *   x~ = sx * x16, x16 = round(x / sx), |x16| <= X16_MAX, sx = max |x| over a block of columns / X16_MAX
 *
 * so x~ is x to within half a step, 2^-16 of the block's largest |x| (a block: XBLOCK8 columns
 * for int8, one group for int4), and the kernel returns W x~ exactly but for fp32 rounding of
 * the per-block sums: far below the weights' own quantization error (~1e-2 int8, ~1e-1 int4).
 *
 * int8: the weights sign-extended to int16, vpdpwssd against x16; each block's int32 sums
 *       become fp32 and are scaled by the block's sx, the row's scale at the end.
 * int4: nibbles u = q + 8 (0..15) as the unsigned operand of vpdpbusd; x16 = 256 h + l as two
 *       signed bytes (h, l in [-128, 127]; hence X16_MAX = 127 * 256 + 127), laid out in the
 *       nibbles' byte order (byte j of a group: column j low, column j + G/2 high), so each
 *       group's sum u x16 is 4 vpdpbusd per 64 bytes of weights; then, per group,
 *       s sx sum u x16 + (z - 8 s) X~  (X~ = sum x~ over the group: the -8 offset and the zero).
 *
 * Measured on 2 EPYC (Zen 4) cores, one row of x, weights streamed from memory (not the cache):
 * int8 33-36 GB/s on 14336 x 4096 and the 32003 x 4096 lm_head, where the fp32 path above gave
 * 15-29; int4 (g64) 22-27 GB/s, table path 11-15. Rows of 14336 columns stay slower (int8 ~20,
 * int4 ~17): x's 28 KB copy no longer fits L1 beside the weight stream, so one row of x takes
 * two weight rows at a time there (PAIRS_MIN_K: each x load serves both; +10-15%; at 4096
 * columns two streams lose 40%). What did not help: software prefetch for int8 (2048 bytes
 * ahead: 34 -> 19 GB/s; it stays for int4, +20% on long rows), and passes over chunks of the
 * columns for a block of 16 rows (16 interleaved streams: 35 -> 16 GB/s). In the L3, int8 runs
 * at ~80 GB/s, int4 at ~43 (14336 x 4096 and 4096 x 14336 alike), yet from memory int4 gave
 * ~30 and ~20: its x loads (four 64-byte planes per 64 bytes of weights, from L2 once x no
 * longer fits L1) keep L1's few miss buffers busy, and a T0 prefetch of the weights queues
 * there too. Prefetching the weights into L2 only (PREFETCH4_HINT, T2: its own queue) and
 * further ahead (8 KiB) lifted both: 14336 x 4096 from 23 to 30 GB/s, 4096 x 14336 from 21 to
 * 25, the 32003 x 4096 lm_head from 28 to 33, k/v's 1024 x 4096 from 26 to 28 (medians of 15,
 * one row, interleaved). 16 KiB ahead then reaches past a pair of 7 KiB rows (PAIRS_MIN_K) into
 * the next pair: 4096 x 14336 from 31 to 42 GB/s, the rest unchanged (another hour, when
 * torch.sum read ~50 GB/s; 32 KiB: the same as 16). */
#include <immintrin.h>
#define HAVE_VNNI 1
#ifndef PAIRS_MIN_K
#define PAIRS_MIN_K 8192 /* one row of x and at least this many columns: two weight rows at a time */
#endif
#ifndef PREFETCH8
#define PREFETCH8 0    /* int8: software prefetch distance in bytes (0: none; 2048 cost 40% at K = 4096) */
#endif
#ifndef PREFETCH4
#define PREFETCH4 16384 /* int4, one row of x: the same, into L2 (PREFETCH4_HINT) */
#endif
#ifndef PREFETCH4_HINT
#define PREFETCH4_HINT _MM_HINT_T2
#endif
#ifndef PREFETCH4_MANY
#define PREFETCH4_MANY 2048 /* 2 or more rows of x: a T0 prefetch, 2 KiB ahead; the L2 one lost there on
                               long rows (4096 x 14336: 2 rows 15 -> 13 GB/s, 4 rows 11 -> 9) */
#endif

/* x [M, K] fp32 -> x16 [M, K] int16, sx [M, K / B] (blocks of B columns, B a multiple of 16)
 * and xsum [M]: the sum of x~ (for the zero term: the kernel computes W x~, every term) */
static void round_x16(const float *x, int64_t M, int64_t K, int64_t B, int16_t *x16, float *sx, float *xsum) {
    const int64_t blocks = K / B;
    for (int64_t m = 0; m < M; m++) {
        double total = 0.0;
        for (int64_t b = 0; b < blocks; b++) {
            const float *xb = x + m * K + b * B;
            __m512 top = _mm512_setzero_ps();
            for (int64_t k = 0; k < B; k += 16) top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_loadu_ps(xb + k)));
            const float amax = _mm512_reduce_max_ps(top);
            const float step = amax / X16_MAX, inv = amax > 0.f ? X16_MAX / amax : 0.f;
            sx[m * blocks + b] = step;
            const __m512 vinv = _mm512_set1_ps(inv);
            __m512i count = _mm512_setzero_si512();
            for (int64_t k = 0; k < B; k += 16) {
                __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + k), vinv)); /* nearest even */
                count = _mm512_add_epi32(count, r);
                _mm256_storeu_si256((void *)(x16 + m * K + b * B + k), _mm512_cvtepi32_epi16(r));
            }
            total += (double)step * _mm512_reduce_add_epi32(count);
        }
        xsum[m] = (float)total;
    }
}

/* Rows n0..n1 of y, for MM rows of x: each weight row streamed once, start to end. */
#define VNNI8_ROWS(MM)                                                                            \
static void vnni8_rows_##MM(const int16_t *x16, const float *sx, int64_t K, const int8_t *q,     \
                            int64_t n0, int64_t n1, int64_t N, const float *scale,               \
                            const float *zero, const float *xsum, float *y) {                    \
    const int64_t blocks = K / XBLOCK8;                                                          \
    for (int64_t n = n0; n < n1; n++) {                                                          \
        const int8_t *row = q + n * K;                                                           \
        __m512 acc[MM];                                                                          \
        for (int m = 0; m < MM; m++) acc[m] = _mm512_setzero_ps();                               \
        for (int64_t b = 0; b < blocks; b++) {                                                   \
            __m512i s0[MM], s1[MM]; /* two independent dot-product chains */                     \
            for (int m = 0; m < MM; m++) s0[m] = s1[m] = _mm512_setzero_si512();                 \
            for (int64_t j = 0; j < XBLOCK8; j += 64) { /* a constant count: unrolled */         \
                const int64_t k = b * XBLOCK8 + j;                                               \
                if (PREFETCH8) _mm_prefetch((const char *)(row + k + PREFETCH8), _MM_HINT_T0);   \
                __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const void *)(row + k)));  \
                __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const void *)(row + k + 32))); \
                for (int m = 0; m < MM; m++) {                                                   \
                    s0[m] = _mm512_dpwssd_epi32(s0[m], w0, _mm512_loadu_si512(x16 + m * K + k));   \
                    s1[m] = _mm512_dpwssd_epi32(s1[m], w1, _mm512_loadu_si512(x16 + m * K + k + 32)); \
                }                                                                                \
            }                                                                                    \
            for (int m = 0; m < MM; m++)                                                         \
                acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0[m], s1[m])),     \
                                         _mm512_set1_ps(sx[m * blocks + b]), acc[m]);            \
        }                                                                                        \
        for (int m = 0; m < MM; m++)                                                             \
            y[m * N + n] = _mm512_reduce_add_ps(acc[m]) * scale[n] + (zero ? zero[n] * xsum[m] : 0.f); \
    }                                                                                            \
}
VNNI8_ROWS(1) VNNI8_ROWS(2) VNNI8_ROWS(3) VNNI8_ROWS(4) VNNI8_ROWS(5) VNNI8_ROWS(6) VNNI8_ROWS(7) VNNI8_ROWS(8)

typedef void (*vnni8_rows_fn)(const int16_t *, const float *, int64_t, const int8_t *, int64_t, int64_t, int64_t,
                              const float *, const float *, const float *, float *);
static const vnni8_rows_fn VNNI8_ROWS_FN[MAX_ROWS + 1] = {
    0, vnni8_rows_1, vnni8_rows_2, vnni8_rows_3, vnni8_rows_4, vnni8_rows_5, vnni8_rows_6, vnni8_rows_7, vnni8_rows_8};

/* One row of x, two weight rows at a time: each x load serves both. For long rows (x's 16-bit
 * copy no longer fits L1 next to the weight stream) this halves what x costs in L2 traffic. */
static void vnni8_pairs_1(const int16_t *x16, const float *sx, int64_t K, const int8_t *q, int64_t n0,
                          int64_t n1, int64_t N, const float *scale, const float *zero, const float *xsum,
                          float *y) {
    const int64_t blocks = K / XBLOCK8;
    int64_t n = n0;
    for (; n + 2 <= n1; n += 2) {
        const int8_t *r0 = q + n * K, *r1 = r0 + K;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (int64_t b = 0; b < blocks; b++) {
            __m512i s0 = _mm512_setzero_si512(), t0 = s0, s1 = s0, t1 = s0;
            for (int64_t j = 0; j < XBLOCK8; j += 64) {
                const int64_t k = b * XBLOCK8 + j;
                const __m512i x0 = _mm512_loadu_si512(x16 + k), x1 = _mm512_loadu_si512(x16 + k + 32);
                s0 = _mm512_dpwssd_epi32(s0, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const void *)(r0 + k))), x0);
                t0 = _mm512_dpwssd_epi32(t0, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const void *)(r0 + k + 32))), x1);
                s1 = _mm512_dpwssd_epi32(s1, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const void *)(r1 + k))), x0);
                t1 = _mm512_dpwssd_epi32(t1, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const void *)(r1 + k + 32))), x1);
            }
            const __m512 step = _mm512_set1_ps(sx[b]);
            a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, t0)), step, a0);
            a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s1, t1)), step, a1);
        }
        y[n] = _mm512_reduce_add_ps(a0) * scale[n] + (zero ? zero[n] * xsum[0] : 0.f);
        y[n + 1] = _mm512_reduce_add_ps(a1) * scale[n + 1] + (zero ? zero[n + 1] * xsum[0] : 0.f);
    }
    if (n < n1) vnni8_rows_1(x16, sx, K, q, n, n1, N, scale, zero, xsum, y);
}

static int qmm_int8_vnni(const float *x, int64_t M, int64_t K, const int8_t *q, int64_t N, const float *scale,
                         const float *zero, float *y, int threads) {
    const int64_t blocks = K / XBLOCK8;
    int16_t *x16 = aligned_alloc(64, ((sizeof(int16_t) * M * K + 63) / 64) * 64);
    float *sx = malloc(sizeof(float) * (M * blocks + MAX_ROWS));
    if (!x16 || !sx) { free(x16); free(sx); return 2; }
    float *xsum = sx + M * blocks;
    round_x16(x, M, K, XBLOCK8, x16, sx, xsum);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += ROW_BLOCK) {
        int64_t n1 = n0 + ROW_BLOCK < N ? n0 + ROW_BLOCK : N;
        if (M == 1 && K >= PAIRS_MIN_K)
            vnni8_pairs_1(x16, sx, K, q, n0, n1, N, scale, zero, xsum, y);
        else
            VNNI8_ROWS_FN[M](x16, sx, K, q, n0, n1, N, scale, zero, xsum, y);
    }
    free(x16); free(sx);
    return 0;
}

/* int4: x -> the four byte planes (h of the low-nibble columns, h of the high, l low, l high),
 * each [K/2] per row of x in the weights' byte order; per group: sx and X~ (sum of x~). */
static void split_x4(const float *x, int64_t M, int64_t K, int64_t G, int8_t *planes, float *sx, float *xg) {
    const int64_t groups = K / G, half = G / 2, H = K / 2;
    int16_t column[128];
    for (int64_t m = 0; m < M; m++) {
        int8_t *hl = planes + m * 2 * K, *hh = hl + H, *ll = hh + H, *lh = ll + H;
        for (int64_t g = 0; g < groups; g++) {
            const float *xg_ = x + m * K + g * G;
            __m512 top = _mm512_setzero_ps();
            for (int64_t k = 0; k < G; k += 16) top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_loadu_ps(xg_ + k)));
            const float amax = _mm512_reduce_max_ps(top);
            const float step = amax / X16_MAX, inv = amax > 0.f ? X16_MAX / amax : 0.f;
            __m512i count = _mm512_setzero_si512();
            for (int64_t k = 0; k < G; k += 16) {
                __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xg_ + k), _mm512_set1_ps(inv)));
                count = _mm512_add_epi32(count, r);
                _mm256_storeu_si256((void *)(column + k), _mm512_cvtepi32_epi16(r));
            }
            sx[m * groups + g] = step;
            xg[m * groups + g] = step * (float)_mm512_reduce_add_epi32(count);
            for (int64_t j = 0; j < half; j += 16) { /* h = (x16 + 128) >> 8 (floor), l = x16 - 256 h */
                __m256i lowc = _mm256_loadu_si256((const void *)(column + j));
                __m256i highc = _mm256_loadu_si256((const void *)(column + half + j));
                __m256i h0 = _mm256_srai_epi16(_mm256_add_epi16(lowc, _mm256_set1_epi16(128)), 8);
                __m256i h1 = _mm256_srai_epi16(_mm256_add_epi16(highc, _mm256_set1_epi16(128)), 8);
                __m256i l0 = _mm256_sub_epi16(lowc, _mm256_slli_epi16(h0, 8));
                __m256i l1 = _mm256_sub_epi16(highc, _mm256_slli_epi16(h1, 8));
                const int64_t at = g * half + j;
                _mm_storeu_si128((void *)(hl + at), _mm256_cvtepi16_epi8(h0));
                _mm_storeu_si128((void *)(hh + at), _mm256_cvtepi16_epi8(h1));
                _mm_storeu_si128((void *)(ll + at), _mm256_cvtepi16_epi8(l0));
                _mm_storeu_si128((void *)(lh + at), _mm256_cvtepi16_epi8(l1));
            }
        }
    }
}

static inline __m512 bf16x16_to_f32(const uint16_t *p, __mmask16 mask) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

/* Rows n0..n1 of y for MM rows of x. Groups go 16 at a time: their scales (times each x row's
 * sx) in one vector, from which vpermps hands every lane of a 64-byte piece its group's. */
#define VNNI4_ROWS(MM)                                                                            \
static void vnni4_rows_##MM(const int8_t *planes, const float *sx, const float *xg, int64_t K,   \
                            int64_t G, const uint8_t *p, int64_t n0, int64_t n1, int64_t N,      \
                            const uint16_t *scale, const uint16_t *zero, float *y) {             \
    const int64_t groups = K / G, H = K / 2, per_piece = 128 / G; /* groups per 64 bytes */      \
    const __m512i nib = _mm512_set1_epi8(15);                                                    \
    const __m512i lane_group = _mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), \
                                                 G == 32 ? 2 : G == 64 ? 3 : 4);                 \
    for (int64_t n = n0; n < n1; n++) {                                                          \
        const uint8_t *row = p + n * H;                                                          \
        __m512 acc[MM]; /* lanes summed at the end: the offset terms go in too */                \
        for (int m = 0; m < MM; m++) acc[m] = _mm512_setzero_ps();                               \
        for (int64_t g0 = 0; g0 < groups; g0 += 16) {                                            \
            const int64_t count = groups - g0 < 16 ? groups - g0 : 16;                           \
            const __mmask16 mask = (__mmask16)((1u << count) - 1);                               \
            const __m512 s = bf16x16_to_f32(scale + n * groups + g0, mask);                      \
            __m512 c = _mm512_mul_ps(s, _mm512_set1_ps(-8.f));                                   \
            if (zero) c = _mm512_add_ps(c, bf16x16_to_f32(zero + n * groups + g0, mask));        \
            __m512 sm[MM];                                                                       \
            for (int m = 0; m < MM; m++) {                                                       \
                sm[m] = _mm512_mul_ps(s, _mm512_maskz_loadu_ps(mask, sx + m * groups + g0));     \
                acc[m] = _mm512_fmadd_ps(c, _mm512_maskz_loadu_ps(mask, xg + m * groups + g0), acc[m]); \
            }                                                                                    \
            const int64_t first = g0 * G / 2, last = (g0 + count) * G / 2;                       \
            __m512i index = lane_group;                                                          \
            for (int64_t at = first; at < last; at += 64) {                                      \
                if (MM == 1) _mm_prefetch((const char *)(row + at + PREFETCH4), PREFETCH4_HINT); \
                else _mm_prefetch((const char *)(row + at + PREFETCH4_MANY), _MM_HINT_T0); \
                const __m512i b = _mm512_loadu_si512(row + at);                                  \
                const __m512i lo = _mm512_and_si512(b, nib);                                     \
                const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), nib);              \
                for (int m = 0; m < MM; m++) {                                                   \
                    const int8_t *xp = planes + m * 2 * K + at;                                  \
                    __m512i h = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xp)); \
                    __m512i l = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xp + 2 * H)); \
                    h = _mm512_dpbusd_epi32(h, hi, _mm512_loadu_si512(xp + H));                  \
                    l = _mm512_dpbusd_epi32(l, hi, _mm512_loadu_si512(xp + 3 * H));              \
                    const __m512i sum = _mm512_add_epi32(_mm512_slli_epi32(h, 8), l);            \
                    acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_permutexvar_ps(index, sm[m]), acc[m]); \
                }                                                                                \
                index = _mm512_add_epi32(index, _mm512_set1_epi32((int)per_piece));              \
            }                                                                                    \
        }                                                                                        \
        for (int m = 0; m < MM; m++) y[m * N + n] = _mm512_reduce_add_ps(acc[m]);                \
    }                                                                                            \
}
VNNI4_ROWS(1) VNNI4_ROWS(2) VNNI4_ROWS(3) VNNI4_ROWS(4) VNNI4_ROWS(5) VNNI4_ROWS(6) VNNI4_ROWS(7) VNNI4_ROWS(8)

typedef void (*vnni4_rows_fn)(const int8_t *, const float *, const float *, int64_t, int64_t, const uint8_t *,
                              int64_t, int64_t, int64_t, const uint16_t *, const uint16_t *, float *);
static const vnni4_rows_fn VNNI4_ROWS_FN[MAX_ROWS + 1] = {
    0, vnni4_rows_1, vnni4_rows_2, vnni4_rows_3, vnni4_rows_4, vnni4_rows_5, vnni4_rows_6, vnni4_rows_7, vnni4_rows_8};

/* One row of x, two weight rows at a time (see vnni8_pairs_1). */
static void vnni4_pairs_1(const int8_t *planes, const float *sx, const float *xg, int64_t K, int64_t G,
                          const uint8_t *p, int64_t n0, int64_t n1, int64_t N, const uint16_t *scale,
                          const uint16_t *zero, float *y) {
    const int64_t groups = K / G, H = K / 2, per_piece = 128 / G;
    const __m512i nib = _mm512_set1_epi8(15);
    const __m512i lane_group = _mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                 G == 32 ? 2 : G == 64 ? 3 : 4);
    int64_t n = n0;
    for (; n + 2 <= n1; n += 2) {
        const uint8_t *r0 = p + n * H, *r1 = r0 + H;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (int64_t g0 = 0; g0 < groups; g0 += 16) {
            const int64_t count = groups - g0 < 16 ? groups - g0 : 16;
            const __mmask16 mask = (__mmask16)((1u << count) - 1);
            const __m512 xs = _mm512_maskz_loadu_ps(mask, sx + g0), xsum = _mm512_maskz_loadu_ps(mask, xg + g0);
            const __m512 s0 = bf16x16_to_f32(scale + n * groups + g0, mask);
            const __m512 s1 = bf16x16_to_f32(scale + (n + 1) * groups + g0, mask);
            __m512 c0 = _mm512_mul_ps(s0, _mm512_set1_ps(-8.f)), c1 = _mm512_mul_ps(s1, _mm512_set1_ps(-8.f));
            if (zero) {
                c0 = _mm512_add_ps(c0, bf16x16_to_f32(zero + n * groups + g0, mask));
                c1 = _mm512_add_ps(c1, bf16x16_to_f32(zero + (n + 1) * groups + g0, mask));
            }
            a0 = _mm512_fmadd_ps(c0, xsum, a0);
            a1 = _mm512_fmadd_ps(c1, xsum, a1);
            const __m512 sm0 = _mm512_mul_ps(s0, xs), sm1 = _mm512_mul_ps(s1, xs);
            const int64_t first = g0 * G / 2, last = (g0 + count) * G / 2;
            __m512i index = lane_group;
            for (int64_t at = first; at < last; at += 64) {
                _mm_prefetch((const char *)(r0 + at + PREFETCH4), PREFETCH4_HINT);
                _mm_prefetch((const char *)(r1 + at + PREFETCH4), PREFETCH4_HINT);
                const __m512i xhl = _mm512_loadu_si512(planes + at), xhh = _mm512_loadu_si512(planes + H + at);
                const __m512i xll = _mm512_loadu_si512(planes + 2 * H + at), xlh = _mm512_loadu_si512(planes + 3 * H + at);
                const __m512i b0 = _mm512_loadu_si512(r0 + at), b1 = _mm512_loadu_si512(r1 + at);
                const __m512i lo0 = _mm512_and_si512(b0, nib), hi0 = _mm512_and_si512(_mm512_srli_epi16(b0, 4), nib);
                const __m512i lo1 = _mm512_and_si512(b1, nib), hi1 = _mm512_and_si512(_mm512_srli_epi16(b1, 4), nib);
                __m512i h0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo0, xhl);
                __m512i l0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo0, xll);
                __m512i h1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo1, xhl);
                __m512i l1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo1, xll);
                h0 = _mm512_dpbusd_epi32(h0, hi0, xhh);
                l0 = _mm512_dpbusd_epi32(l0, hi0, xlh);
                h1 = _mm512_dpbusd_epi32(h1, hi1, xhh);
                l1 = _mm512_dpbusd_epi32(l1, hi1, xlh);
                const __m512i sum0 = _mm512_add_epi32(_mm512_slli_epi32(h0, 8), l0);
                const __m512i sum1 = _mm512_add_epi32(_mm512_slli_epi32(h1, 8), l1);
                a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum0), _mm512_permutexvar_ps(index, sm0), a0);
                a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum1), _mm512_permutexvar_ps(index, sm1), a1);
                index = _mm512_add_epi32(index, _mm512_set1_epi32((int)per_piece));
            }
        }
        y[n] = _mm512_reduce_add_ps(a0);
        y[n + 1] = _mm512_reduce_add_ps(a1);
    }
    if (n < n1) vnni4_rows_1(planes, sx, xg, K, G, p, n, n1, N, scale, zero, y);
}

static int qmm_int4_vnni(const float *x, int64_t M, int64_t K, int64_t G, const uint8_t *packed, int64_t N,
                         const uint16_t *scale, const uint16_t *zero, float *y, int threads) {
    const int64_t groups = K / G;
    int8_t *planes = aligned_alloc(64, ((2 * M * K + 63) / 64) * 64);
    float *sx = malloc(sizeof(float) * 2 * M * groups);
    if (!planes || !sx) { free(planes); free(sx); return 2; }
    float *xg = sx + M * groups;
    split_x4(x, M, K, G, planes, sx, xg);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += ROW_BLOCK) {
        int64_t n1 = n0 + ROW_BLOCK < N ? n0 + ROW_BLOCK : N;
        if (M == 1 && K >= PAIRS_MIN_K)
            vnni4_pairs_1(planes, sx, xg, K, G, packed, n0, n1, N, scale, zero, y);
        else
            VNNI4_ROWS_FN[M](planes, sx, xg, K, G, packed, n0, n1, N, scale, zero, y);
    }
    free(planes); free(sx);
    return 0;
}
#else
#define HAVE_VNNI 0
#endif

#if defined(__AVX2__) && defined(__FMA__)
/* -------------------------------------------------- AVX2: integer dot products without AVX-512
 * For CPUs with AVX2 and no AVX-512 (AMD Zen 2/3, Intel client cores, most laptops), where the
 * fp32 paths above are at their worst: GCC splits their 16-lane vectors in two, and the int4
 * table lookup (a 16-entry vpermps) has no AVX2 instruction, so it runs scalar (~1 GB/s on 2
 * AMD EPYC Zen 3 cores; int8 ~3 GB/s, where the memory gives ~17). The math is "vnni"'s: x on
 * the same 16-bit grid (X16_MAX, per XBLOCK8 columns for int8, per group for int4), the weights
 * integers, so the path returns W x~ like "vnni" (the same integer sums; only the fp32 order of
 * the per-block terms differs). vpmaddwd multiplies 16 int16 pairs and adds neighbours into 8
 * int32 lanes (exact: |w| <= 127 or 15, |x16| <= X16_MAX, a block's sums stay far below 2^31).
 *
 * int8: the weights sign-extended to int16 (vpmovsxbw), against x16.
 * int4: 16 bytes zero-extended to int16 lanes (vpmovzxbw); the low nibble (a mask) is column
 *       j of the group and the high nibble (a shift) column j + G/2, so x16 stays in column
 *       order. Per group: s sx sum u x16 + (z - 8 s) X~, u = q + 8 the stored nibble, X~ the
 *       sum of x~ over the group (the -8 offset and the zero point).
 *
 * Software prefetch AVX2_PREFETCH bytes ahead in the weight row: in decode steps of the 8B-wide
 * model on 2 Zen 3 cores, int4 31-35 ms a step against 40-49 without (int8 within the noise);
 * alone, 14336 x 4096 went from 11.9 to 13.4 GB/s (int4) and 14.4 to 16.1 (int8). The NTA
 * hint (to spare the caches the stream) was no better in the decode step. */
#include <immintrin.h>
#define HAVE_AVX2 1
#ifndef AVX2_PREFETCH
#define AVX2_PREFETCH 1024 /* software prefetch distance in bytes of weights (0: none) */
#endif
/* int4's distance and hint. "vnni"'s 16 KiB L2 prefetch (-DAVX2_PREFETCH4=16384
 * -DAVX2_PREFETCH4_HINT=_MM_HINT_T2), tried on Zen 4 with this path forced: one row of 4096 x 14336
 * 1.59-1.72 -> 1.16-1.21 ms, 14336 x 4096 and the lm_head unchanged or up to 6% slower, a decode
 * step of the int4 g64 checkpoint 60.2 against 59.4 tok/s (medians of 6 interleaved, +-15% noise):
 * not taken; the CPUs this path is for (Zen 3) were not at hand to measure. */
#ifndef AVX2_PREFETCH4
#define AVX2_PREFETCH4 AVX2_PREFETCH
#endif
#ifndef AVX2_PREFETCH4_HINT
#define AVX2_PREFETCH4_HINT _MM_HINT_T0
#endif

static inline int32_t hsum8_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}
static inline float hsum8_f32(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
/* 8 bf16 numbers -> fp32 (exact) */
static inline __m256 bf16x8_to_f32(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const void *)p)), 16));
}

/* x [M, K] fp32 -> x16 [M, K] on the grid of blocks of B columns (B a multiple of 8): the step
 * sx [M, K / B], per block the sum of x~ (xb, may be NULL), per row the sum of x~ (xsum, may
 * be NULL). Rounds as "vnni"'s round_x16 / split_x4: nearest even of x * (X16_MAX / max|x|). */
static void grid_x16(const float *x, int64_t M, int64_t K, int64_t B, int16_t *x16, float *sx, float *xb,
                     float *xsum) {
    const int64_t blocks = K / B;
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (int64_t m = 0; m < M; m++) {
        double total = 0.0;
        for (int64_t b = 0; b < blocks; b++) {
            const float *xp = x + m * K + b * B;
            __m256 top = _mm256_setzero_ps();
            for (int64_t k = 0; k < B; k += 8) top = _mm256_max_ps(top, _mm256_and_ps(_mm256_loadu_ps(xp + k), magnitude));
            __m128 t = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
            t = _mm_max_ps(t, _mm_movehl_ps(t, t));
            t = _mm_max_ss(t, _mm_movehdup_ps(t));
            const float amax = _mm_cvtss_f32(t);
            const float step = amax / X16_MAX, inv = amax > 0.f ? X16_MAX / amax : 0.f;
            const __m256 vinv = _mm256_set1_ps(inv);
            __m256i count = _mm256_setzero_si256();
            for (int64_t k = 0; k < B; k += 8) {
                const __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xp + k), vinv)); /* nearest even */
                count = _mm256_add_epi32(count, r);
                _mm_storeu_si128((void *)(x16 + m * K + b * B + k),
                                 _mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
            }
            const int32_t c = hsum8_i32(count);
            sx[m * blocks + b] = step;
            if (xb) xb[m * blocks + b] = step * (float)c;
            total += (double)step * c;
        }
        if (xsum) xsum[m] = (float)total;
    }
}

/* Rows n0..n1 of y for MM rows of x, each weight row streamed once. */
#define AVX2_INT8_ROWS(MM)                                                                        \
static void avx2_8_rows_##MM(const int16_t *x16, const float *sx, int64_t K, const int8_t *q,    \
                             int64_t n0, int64_t n1, int64_t N, const float *scale,              \
                             const float *zero, const float *xsum, float *y) {                   \
    const int64_t blocks = K / XBLOCK8;                                                          \
    for (int64_t n = n0; n < n1; n++) {                                                          \
        const int8_t *row = q + n * K;                                                           \
        __m256 acc[MM];                                                                          \
        for (int m = 0; m < MM; m++) acc[m] = _mm256_setzero_ps();                               \
        for (int64_t b = 0; b < blocks; b++) {                                                   \
            __m256i s[MM];                                                                       \
            for (int m = 0; m < MM; m++) s[m] = _mm256_setzero_si256();                          \
            for (int64_t j = 0; j < XBLOCK8; j += 32) { /* a constant count: unrolled */         \
                const int64_t k = b * XBLOCK8 + j;                                               \
                if (AVX2_PREFETCH) _mm_prefetch((const char *)(row + k + AVX2_PREFETCH), _MM_HINT_T0); \
                const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const void *)(row + k))); \
                const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const void *)(row + k + 16))); \
                for (int m = 0; m < MM; m++) {                                                   \
                    const int16_t *xp = x16 + m * K + k;                                         \
                    s[m] = _mm256_add_epi32(s[m], _mm256_add_epi32(                              \
                        _mm256_madd_epi16(w0, _mm256_loadu_si256((const void *)xp)),             \
                        _mm256_madd_epi16(w1, _mm256_loadu_si256((const void *)(xp + 16)))));    \
                }                                                                                \
            }                                                                                    \
            for (int m = 0; m < MM; m++)                                                         \
                acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[m]), _mm256_set1_ps(sx[m * blocks + b]), acc[m]); \
        }                                                                                        \
        for (int m = 0; m < MM; m++)                                                             \
            y[m * N + n] = hsum8_f32(acc[m]) * scale[n] + (zero ? zero[n] * xsum[m] : 0.f);      \
    }                                                                                            \
}
AVX2_INT8_ROWS(1) AVX2_INT8_ROWS(2) AVX2_INT8_ROWS(3) AVX2_INT8_ROWS(4)
AVX2_INT8_ROWS(5) AVX2_INT8_ROWS(6) AVX2_INT8_ROWS(7) AVX2_INT8_ROWS(8)

typedef void (*avx2_8_rows_fn)(const int16_t *, const float *, int64_t, const int8_t *, int64_t, int64_t, int64_t,
                               const float *, const float *, const float *, float *);
static const avx2_8_rows_fn AVX2_8_ROWS_FN[MAX_ROWS + 1] = {
    0, avx2_8_rows_1, avx2_8_rows_2, avx2_8_rows_3, avx2_8_rows_4, avx2_8_rows_5, avx2_8_rows_6, avx2_8_rows_7,
    avx2_8_rows_8};

static int qmm_int8_avx2(const float *x, int64_t M, int64_t K, const int8_t *q, int64_t N, const float *scale,
                         const float *zero, float *y, int threads) {
    const int64_t blocks = K / XBLOCK8;
    int16_t *x16 = malloc(sizeof(int16_t) * M * K);
    float *sx = malloc(sizeof(float) * (M * blocks + MAX_ROWS));
    if (!x16 || !sx) { free(x16); free(sx); return 2; }
    float *xsum = sx + M * blocks;
    grid_x16(x, M, K, XBLOCK8, x16, sx, NULL, xsum);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += ROW_BLOCK) {
        int64_t n1 = n0 + ROW_BLOCK < N ? n0 + ROW_BLOCK : N;
        AVX2_8_ROWS_FN[M](x16, sx, K, q, n0, n1, N, scale, zero, xsum, y);
    }
    free(x16); free(sx);
    return 0;
}

/* Rows n0..n1 of y for MM rows of x. Groups go 8 at a time: their scales (times each x row's
 * sx) and offsets as vectors; each group's int32 sums are scaled by one broadcast. */
#define AVX2_INT4_ROWS(MM)                                                                        \
static void avx2_4_rows_##MM(const int16_t *x16, const float *sx, const float *xg, int64_t K,    \
                             int64_t G, const uint8_t *p, int64_t n0, int64_t n1, int64_t N,     \
                             const uint16_t *scale, const uint16_t *zero, float *y) {            \
    const int64_t groups = K / G, half = G / 2;                                                  \
    const __m256i nib = _mm256_set1_epi16(15);                                                   \
    float sm[MM][8];                                                                             \
    for (int64_t n = n0; n < n1; n++) {                                                          \
        const uint8_t *row = p + n * (K / 2);                                                    \
        const uint16_t *srow = scale + n * groups, *zrow = zero ? zero + n * groups : 0;         \
        __m256 acc[MM], off[MM]; /* off: the (z - 8 s) X~ terms, lane per group */               \
        for (int m = 0; m < MM; m++) acc[m] = off[m] = _mm256_setzero_ps();                      \
        for (int64_t g0 = 0; g0 < groups; g0 += 8) {                                             \
            const int64_t count = groups - g0 < 8 ? groups - g0 : 8;                             \
            if (count == 8) {                                                                    \
                const __m256 s = bf16x8_to_f32(srow + g0);                                       \
                __m256 c = _mm256_mul_ps(s, _mm256_set1_ps(-8.f));                               \
                if (zrow) c = _mm256_add_ps(c, bf16x8_to_f32(zrow + g0));                        \
                for (int m = 0; m < MM; m++) {                                                   \
                    _mm256_storeu_ps(sm[m], _mm256_mul_ps(s, _mm256_loadu_ps(sx + m * groups + g0))); \
                    off[m] = _mm256_fmadd_ps(c, _mm256_loadu_ps(xg + m * groups + g0), off[m]);  \
                }                                                                                \
            } else {                                                                             \
                float tail[MAX_ROWS] = {0};                                                      \
                for (int64_t i = 0; i < count; i++) {                                            \
                    const float s = bf16_to_f32(srow[g0 + i]);                                   \
                    const float c = (zrow ? bf16_to_f32(zrow[g0 + i]) : 0.f) - 8.f * s;          \
                    for (int m = 0; m < MM; m++) {                                               \
                        sm[m][i] = s * sx[m * groups + g0 + i];                                  \
                        tail[m] += c * xg[m * groups + g0 + i];                                  \
                    }                                                                            \
                }                                                                                \
                for (int m = 0; m < MM; m++) off[m] = _mm256_add_ps(off[m], _mm256_set_ps(0, 0, 0, 0, 0, 0, 0, tail[m])); \
            }                                                                                    \
            for (int64_t i = 0; i < count; i++) {                                                \
                const int64_t g = g0 + i, col = g * G;                                           \
                const uint8_t *bytes = row + g * half;                                           \
                __m256i t[MM];                                                                   \
                for (int m = 0; m < MM; m++) t[m] = _mm256_setzero_si256();                      \
                for (int64_t j = 0; j < half; j += 16) {                                         \
                    if (AVX2_PREFETCH4) _mm_prefetch((const char *)(bytes + j + AVX2_PREFETCH4), AVX2_PREFETCH4_HINT); \
                    const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const void *)(bytes + j))); \
                    const __m256i lo = _mm256_and_si256(b, nib), hi = _mm256_srli_epi16(b, 4);   \
                    for (int m = 0; m < MM; m++) {                                               \
                        const int16_t *xp = x16 + m * K + col + j;                               \
                        t[m] = _mm256_add_epi32(t[m], _mm256_add_epi32(                          \
                            _mm256_madd_epi16(lo, _mm256_loadu_si256((const void *)xp)),         \
                            _mm256_madd_epi16(hi, _mm256_loadu_si256((const void *)(xp + half))))); \
                    }                                                                            \
                }                                                                                \
                for (int m = 0; m < MM; m++)                                                     \
                    acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t[m]), _mm256_broadcast_ss(&sm[m][i]), acc[m]); \
            }                                                                                    \
        }                                                                                        \
        for (int m = 0; m < MM; m++) y[m * N + n] = hsum8_f32(_mm256_add_ps(acc[m], off[m]));   \
    }                                                                                            \
}
AVX2_INT4_ROWS(1) AVX2_INT4_ROWS(2) AVX2_INT4_ROWS(3) AVX2_INT4_ROWS(4)
AVX2_INT4_ROWS(5) AVX2_INT4_ROWS(6) AVX2_INT4_ROWS(7) AVX2_INT4_ROWS(8)

typedef void (*avx2_4_rows_fn)(const int16_t *, const float *, const float *, int64_t, int64_t, const uint8_t *,
                               int64_t, int64_t, int64_t, const uint16_t *, const uint16_t *, float *);
static const avx2_4_rows_fn AVX2_4_ROWS_FN[MAX_ROWS + 1] = {
    0, avx2_4_rows_1, avx2_4_rows_2, avx2_4_rows_3, avx2_4_rows_4, avx2_4_rows_5, avx2_4_rows_6, avx2_4_rows_7,
    avx2_4_rows_8};

static int qmm_int4_avx2(const float *x, int64_t M, int64_t K, int64_t G, const uint8_t *packed, int64_t N,
                         const uint16_t *scale, const uint16_t *zero, float *y, int threads) {
    const int64_t groups = K / G;
    int16_t *x16 = malloc(sizeof(int16_t) * M * K);
    float *sx = malloc(sizeof(float) * 2 * M * groups);
    if (!x16 || !sx) { free(x16); free(sx); return 2; }
    float *xg = sx + M * groups;
    grid_x16(x, M, K, G, x16, sx, xg, NULL);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += ROW_BLOCK) {
        int64_t n1 = n0 + ROW_BLOCK < N ? n0 + ROW_BLOCK : N;
        AVX2_4_ROWS_FN[M](x16, sx, xg, K, G, packed, n0, n1, N, scale, zero, y);
    }
    free(x16); free(sx);
    return 0;
}
#else
#define HAVE_AVX2 0
#endif

/* Which kernels this build has, as bits: 1 the AVX-512 VNNI paths (int8 and int4), 2 the
 * AVX-512 BF16 int4 path, 4 the AVX2 paths (cpu.py reports them and chooses per call). */
int qmm_paths(void) { return (HAVE_VNNI ? 1 : 0) | (HAVE_INT4_BF16 ? 2 : 0) | (HAVE_AVX2 ? 4 : 0); }

/* ------------------------------------------------------------------------------- entry points
 * `path` (chosen by cpu.py, which knows what was measured where): PATH_PORTABLE the fp32 code
 * above (int4: the table), PATH_VNNI, PATH_BF16 (int4 only), PATH_AVX2. Status: 0 done, 1 bad shape,
 * 2 out of memory, 3 that path is not in this build or not for these shapes. */
enum { PATH_PORTABLE = 0, PATH_VNNI = 1, PATH_BF16 = 2, PATH_AVX2 = 3 };

/* 1 when `path` takes these shapes in this build */
int qmm_takes(int bits, int path, int64_t K, int64_t G) {
    if (path == PATH_PORTABLE) return 1;
    if (path == PATH_VNNI) return HAVE_VNNI && (bits == 8 ? K % 128 == 0 : K % 128 == 0 && G <= 128);
    if (path == PATH_BF16) return HAVE_INT4_BF16 && bits == 4;
    if (path == PATH_AVX2) return HAVE_AVX2 && (bits == 8 ? K % XBLOCK8 == 0 : G % 16 == 0);
    return 0;
}

/* x fp32 [M, K] (M <= 8), q int8 [N, K], scale/zero fp32 [N] (zero may be NULL) -> y fp32 [M, N] */
int qmm_int8(const float *x, int64_t M, int64_t K, const int8_t *q, int64_t N, const float *scale,
             const float *zero, float *y, int threads, int path) {
    if (M < 1 || M > MAX_ROWS) return 1;
    if (!qmm_takes(8, path, K, K)) return 3;
#if HAVE_VNNI
    if (path == PATH_VNNI) return qmm_int8_vnni(x, M, K, q, N, scale, zero, y, threads);
#endif
#if HAVE_AVX2
    if (path == PATH_AVX2) return qmm_int8_avx2(x, M, K, q, N, scale, zero, y, threads);
#endif
    return qmm_int8_fp32(x, M, K, q, N, scale, zero, y, threads);
}

/* x fp32 [M, K] (M <= 8), packed uint8 [N, K/2], scale/zero bf16 [N, K/G] (zero may be NULL),
 * G a multiple of 32 dividing K -> y fp32 [M, N] */
int qmm_int4(const float *x, int64_t M, int64_t K, int64_t G, const uint8_t *packed, int64_t N,
             const uint16_t *scale, const uint16_t *zero, float *y, int threads, int path) {
    if (M < 1 || M > MAX_ROWS || G % 32 || K % G) return 1;
    if (!qmm_takes(4, path, K, G)) return 3;
#if HAVE_VNNI
    if (path == PATH_VNNI) return qmm_int4_vnni(x, M, K, G, packed, N, scale, zero, y, threads);
#endif
#if HAVE_INT4_BF16
    if (path == PATH_BF16) return qmm_int4_bf16(x, M, K, G, packed, N, scale, zero, y, threads);
#endif
#if HAVE_AVX2
    if (path == PATH_AVX2) return qmm_int4_avx2(x, M, K, G, packed, N, scale, zero, y, threads);
#endif
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += ROW_BLOCK) {
        int64_t n1 = n0 + ROW_BLOCK < N ? n0 + ROW_BLOCK : N;
        INT4_ROWS_FN[M](x, K, G, packed, n0, n1, N, scale, zero, y);
    }
    return 0;
}
