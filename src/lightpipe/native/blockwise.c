/* Products with weights kept as small integer codes in blocks, the form of ggml's quantised tensors.

   y[m, n] = bias[n] + sum_k x[m, k] * w[n, k],   w[n, k] = scale[n, g] * code[n, k] (+ zero[n, g]),   g = k / group

   Every weight is rebuilt in a register with one multiply (or fused multiply-add), which rounds once: the same
   float32 value as ggml's dequantisation (scale * code, + zero), so the product differs from one over the dequantised
   matrix only in the order of its sums. A decode step reads each weight once for few rows of x: reading 0.6 or 1.1
   bytes per weight instead of 4 is what makes it faster.

   Codes, row n (K values):
   - 4 bits (group 32): K / 2 bytes; block g is bytes [16 g, 16 g + 16): byte j's low nibble is value 32 g + j, its
     high nibble value 32 g + 16 + j (ggml's Q4_0 / Q4_1 order); codes 0..15.
   - 8 bits (group 32 or 16): K signed bytes, one per value.
   Rows of x never share sums, so a row's result has the same bits whatever rows run beside it. Threads: OpenMP, the
   runtime torch itself loads, so these loops share torch's thread pool instead of fighting it. */

#include <stdint.h>

#define UNIT 32          /* values rebuilt at a time: two vectors of 16 */
#define ROWS_AT_ONCE 4   /* output rows computed together: independent sums keep the FMA units busy */
#define X_AT_ONCE 8      /* input rows sharing each rebuilt weight (4 output rows x 4 inputs, or 2 x 8: 16 sums) */
#define AHEAD 1024       /* values fetched ahead of use in each row's stream of codes */
#define UNROLLED _Pragma("GCC unroll 8") /* the tile loops run a constant 1-8 times: sums stay in registers */

typedef struct {
    const void *codes;
    const float *scale, *zero; /* zero may be NULL: w = scale * code */
    long K;
} Blocks;

#if (defined(__AVX512F__) && defined(__AVX512BW__)) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>

/* Every row is a separate stream of codes: fetched ahead, as plain loads leave the memory idle. */
static inline __attribute__((always_inline)) void fetch_ahead(const Blocks *b, int bits, int group, long row, long u) {
    long groups = b->K / group;
    const uint8_t *codes = (const uint8_t *)b->codes + (row * b->K + UNIT * u) * bits / 8;
    _mm_prefetch((const char *)(codes + AHEAD * bits / 8), _MM_HINT_T0);
    _mm_prefetch((const char *)(codes + AHEAD * bits / 8 + 64), _MM_HINT_T0);
    if (bits == 8) {
        _mm_prefetch((const char *)(codes + AHEAD + 128), _MM_HINT_T0);
        _mm_prefetch((const char *)(codes + AHEAD + 192), _MM_HINT_T0);
    }
    long g = row * groups + u * (UNIT / group);
    _mm_prefetch((const char *)(b->scale + g + AHEAD / group), _MM_HINT_T0);
    if (b->zero) _mm_prefetch((const char *)(b->zero + g + AHEAD / group), _MM_HINT_T0);
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
typedef __m512 vec;
#define VZERO() _mm512_setzero_ps()
#define VLOAD(p) _mm512_loadu_ps(p)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VSUM(v) _mm512_reduce_add_ps(v)
#define KERNEL_PATH 512

/* 16 bytes of codes (unsigned or signed) -> 16 values w = scale * code (+ zero). */
static inline __attribute__((always_inline)) vec rebuilt(__m128i bytes, int is_signed, float scale, const float *zero) {
    vec q = _mm512_cvtepi32_ps(is_signed ? _mm512_cvtepi8_epi32(bytes) : _mm512_cvtepu8_epi32(bytes));
    vec s = _mm512_set1_ps(scale);
    return zero ? _mm512_fmadd_ps(q, s, _mm512_set1_ps(*zero)) : _mm512_mul_ps(q, s);
}

#elif defined(__AVX2__) && defined(__FMA__)
/* AVX2: a 16-value vector is two 8-lane registers, so the tiles below are the same code for both instruction sets. */
typedef struct { __m256 a, b; } vec;
static inline __attribute__((always_inline)) vec VZERO(void) {
    vec r = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    return r;
}
static inline __attribute__((always_inline)) vec VLOAD(const float *p) {
    vec r = {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)};
    return r;
}
static inline __attribute__((always_inline)) vec VFMA(vec x, vec y, vec c) {
    vec r = {_mm256_fmadd_ps(x.a, y.a, c.a), _mm256_fmadd_ps(x.b, y.b, c.b)};
    return r;
}
static inline __attribute__((always_inline)) float VSUM(vec v) {
    __m256 s = _mm256_add_ps(v.a, v.b);
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
    return _mm_cvtss_f32(q);
}
#define KERNEL_PATH 256

static inline __attribute__((always_inline)) __m256 rebuilt8(__m256i codes, __m256 s, const float *zero) {
    __m256 q = _mm256_cvtepi32_ps(codes);
    return zero ? _mm256_fmadd_ps(q, s, _mm256_set1_ps(*zero)) : _mm256_mul_ps(q, s);
}

/* 16 bytes of codes (unsigned or signed) -> 16 values w = scale * code (+ zero). */
static inline __attribute__((always_inline)) vec rebuilt(__m128i bytes, int is_signed, float scale, const float *zero) {
    __m128i upper = _mm_srli_si128(bytes, 8);
    __m256 s = _mm256_set1_ps(scale);
    vec r;
    r.a = rebuilt8(is_signed ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes), s, zero);
    r.b = rebuilt8(is_signed ? _mm256_cvtepi8_epi32(upper) : _mm256_cvtepu8_epi32(upper), s, zero);
    return r;
}

#else /* neither vector path: nothing is built, and lp_kernel_path() says so (plain C loops measured 5-8x slower
         than torch's float product, so lightpipe keeps to torch there) */
#define KERNEL_PATH 0
#endif

/* Which vector path this build holds: 512 (AVX-512), 256 (AVX2 + FMA) or 0 (neither: lightpipe does not use it). */
int lp_kernel_path(void) { return KERNEL_PATH; }

#if KERNEL_PATH
/* The 32 values of unit u of row `row`: `low` values 0..15, `high` 16..31. */
static inline __attribute__((always_inline)) void unit_weights(const Blocks *b, int bits, int group, long row, long u,
                                                               vec *low, vec *high) {
    long groups = b->K / group;
    if (u % 4 == 0) fetch_ahead(b, bits, group, row, u);
    if (bits == 4) {
        __m128i packed = _mm_loadu_si128((const __m128i *)((const uint8_t *)b->codes + row * (b->K / 2) + 16 * u));
        __m128i nibble = _mm_set1_epi8(0x0F);
        const float *z = b->zero ? b->zero + row * groups + u : NULL;
        float s = b->scale[row * groups + u];
        *low = rebuilt(_mm_and_si128(packed, nibble), 0, s, z);
        *high = rebuilt(_mm_and_si128(_mm_srli_epi16(packed, 4), nibble), 0, s, z);
    } else {
        const int8_t *c = (const int8_t *)b->codes + row * b->K + UNIT * u;
        long g = row * groups + u * (UNIT / group), h = group == 16 ? g + 1 : g;
        *low = rebuilt(_mm_loadu_si128((const __m128i *)c), 1, b->scale[g], b->zero ? b->zero + g : NULL);
        *high = rebuilt(_mm_loadu_si128((const __m128i *)(c + 16)), 1, b->scale[h], b->zero ? b->zero + h : NULL);
    }
}

/* Output rows n .. n + nr - 1 for input rows 0 .. mr - 1 of x (nr, mr, bits, group: constants after inlining). */
static inline __attribute__((always_inline)) void tile(const Blocks *b, int bits, int group, const float *x, long n,
                                                       int nr, int mr, const float *bias, float *y, long N) {
    long K = b->K;
    vec acc[ROWS_AT_ONCE][X_AT_ONCE];
    UNROLLED for (int r = 0; r < nr; r++)
        UNROLLED for (int i = 0; i < mr; i++) acc[r][i] = VZERO();
    for (long u = 0; u < K / UNIT; u++) {
        vec xl[X_AT_ONCE], xh[X_AT_ONCE];
        UNROLLED for (int i = 0; i < mr; i++) {
            xl[i] = VLOAD(x + i * K + u * UNIT);
            xh[i] = VLOAD(x + i * K + u * UNIT + 16);
        }
        UNROLLED for (int r = 0; r < nr; r++) {
            vec wl, wh;
            unit_weights(b, bits, group, n + r, u, &wl, &wh);
            UNROLLED for (int i = 0; i < mr; i++) {
                acc[r][i] = VFMA(wl, xl[i], acc[r][i]);
                acc[r][i] = VFMA(wh, xh[i], acc[r][i]);
            }
        }
    }
    UNROLLED for (int r = 0; r < nr; r++)
        UNROLLED for (int i = 0; i < mr; i++)
            y[i * N + n + r] = VSUM(acc[r][i]) + (bias ? bias[n + r] : 0.0f);
}

/* Every (nr, mr) pair gets its own fully unrolled tile, with at most 16 sums: 4 output rows for up to 4 inputs, 2 for
   up to 8, 1 for the last rows. */
#define TILES(BITS, GROUP)                                                                                          \
    static void tile_##BITS##_##GROUP(const Blocks *b, const float *x, long n, int nr, int mr, const float *bias,   \
                                      float *y, long N) {                                                           \
        switch (nr * 16 + mr) {                                                                                     \
            case 4 * 16 + 4: tile(b, BITS, GROUP, x, n, 4, 4, bias, y, N); break;                                   \
            case 4 * 16 + 3: tile(b, BITS, GROUP, x, n, 4, 3, bias, y, N); break;                                   \
            case 4 * 16 + 2: tile(b, BITS, GROUP, x, n, 4, 2, bias, y, N); break;                                   \
            case 4 * 16 + 1: tile(b, BITS, GROUP, x, n, 4, 1, bias, y, N); break;                                   \
            case 2 * 16 + 8: tile(b, BITS, GROUP, x, n, 2, 8, bias, y, N); break;                                   \
            case 2 * 16 + 7: tile(b, BITS, GROUP, x, n, 2, 7, bias, y, N); break;                                   \
            case 2 * 16 + 6: tile(b, BITS, GROUP, x, n, 2, 6, bias, y, N); break;                                   \
            case 2 * 16 + 5: tile(b, BITS, GROUP, x, n, 2, 5, bias, y, N); break;                                   \
            case 1 * 16 + 8: tile(b, BITS, GROUP, x, n, 1, 8, bias, y, N); break;                                   \
            case 1 * 16 + 7: tile(b, BITS, GROUP, x, n, 1, 7, bias, y, N); break;                                   \
            case 1 * 16 + 6: tile(b, BITS, GROUP, x, n, 1, 6, bias, y, N); break;                                   \
            case 1 * 16 + 5: tile(b, BITS, GROUP, x, n, 1, 5, bias, y, N); break;                                   \
            case 1 * 16 + 4: tile(b, BITS, GROUP, x, n, 1, 4, bias, y, N); break;                                   \
            case 1 * 16 + 3: tile(b, BITS, GROUP, x, n, 1, 3, bias, y, N); break;                                   \
            case 1 * 16 + 2: tile(b, BITS, GROUP, x, n, 1, 2, bias, y, N); break;                                   \
            default: tile(b, BITS, GROUP, x, n, 1, 1, bias, y, N); break;                                           \
        }                                                                                                           \
    }
TILES(4, 32)
TILES(8, 32)
TILES(8, 16)

typedef void (*TileFn)(const Blocks *, const float *, long, int, int, const float *, float *, long);

/* x: (M, K) float32, contiguous; codes as above; scale (and zero, or NULL) (N, K / group); bias (N) or NULL;
   y: (M, N). `threads`: torch's intra-op thread count, passed in because OpenMP's own setting is per calling thread.
   Returns 0, or 1 for arguments it does not take. */
int lp_block_linear(const float *x, long M, long K, const void *codes, const float *scale, const float *zero,
                    int bits, int group, long N, const float *bias, float *y, int threads) {
    TileFn fn = bits == 4 && group == 32 ? tile_4_32 : bits == 8 && group == 32 ? tile_8_32
              : bits == 8 && group == 16 ? tile_8_16 : NULL;
    if (!fn || K % UNIT || M < 0 || N < 0 || threads < 1) return 1;
    Blocks b = {codes, scale, zero, K};
    long tiles = (N + ROWS_AT_ONCE - 1) / ROWS_AT_ONCE;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long t = 0; t < tiles; t++) {
        long n = t * ROWS_AT_ONCE, end = n + ROWS_AT_ONCE < N ? n + ROWS_AT_ONCE : N;
        for (long m = 0; m < M; m += X_AT_ONCE) {
            int mr = (int)(M - m < X_AT_ONCE ? M - m : X_AT_ONCE);
            int step = mr <= 4 ? 4 : 2; /* output rows per tile: keeps 16 sums */
            long r = n;
            for (; r + step <= end; r += step) fn(&b, x + m * K, r, step, mr, bias, y + m * N, N);
            for (; r < end; r++) fn(&b, x + m * K, r, 1, mr, bias, y + m * N, N);
        }
    }
    return 0;
}
#else
int lp_block_linear(const float *x, long M, long K, const void *codes, const float *scale, const float *zero,
                    int bits, int group, long N, const float *bias, float *y, int threads) {
    return 1;
}
#endif
