/* Products with weights kept as 4-bit codes in blocks of 32, the form of ggml's Q4_0, Q4_1 and Q4_K tensors.

   y[m, n] = bias[n] + sum_k x[m, k] * w[n, k],   w[n, k] = scale[n, g] * code[n, k] + zero[n, g],   g = k / 32

   Every weight is rebuilt in registers with one fused multiply-add, which rounds once: the same float32 value that
   ggml's dequantisation (d * q + m, with d * q exact) gives, so the product differs from one over the dequantised
   matrix only in the order of its sums. A decode step reads each weight once for few rows of x: reading 0.625
   bytes per weight instead of 4 is what makes it faster.

   Codes: row n holds K / 2 bytes; block g is bytes [16 g, 16 g + 16): byte j's low nibble is element 32 g + j,
   its high nibble element 32 g + 16 + j (ggml's Q4_0/Q4_1 order). Threads: OpenMP, the runtime torch itself loads,
   so these loops share torch's thread pool instead of fighting it. */

#include <stdint.h>
#include <string.h>

#define BLOCK 32
#define ROWS_AT_ONCE 4 /* output rows computed together: independent sums keep the FMA units busy */
#define X_AT_ONCE 8    /* input rows sharing each rebuilt weight (4 output rows x 4 inputs, or 2 x 8: 16 sums) */

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

static inline void weights_of_block(const uint8_t *codes, float scale, float zero, __m512 *low, __m512 *high) {
    __m128i packed = _mm_loadu_si128((const __m128i *)codes);
    __m128i nibble = _mm_set1_epi8(0x0F);
    __m512 s = _mm512_set1_ps(scale), z = _mm512_set1_ps(zero);
    *low = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(packed, nibble))), s, z);
    *high = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(packed, 4), nibble))), s, z);
}

/* `nr` output rows from n, `mr` input rows from m (both at most 4; constants after inlining). */
static inline __attribute__((always_inline)) void tile(const float *x, long ldx, long K, const uint8_t *codes,
        const float *scale, const float *zero, long n, int nr, int mr, const float *bias, float *y, long ldy) {
    __m512 acc[ROWS_AT_ONCE][X_AT_ONCE];
    for (int r = 0; r < nr; r++)
        for (int i = 0; i < mr; i++) acc[r][i] = _mm512_setzero_ps();
    long groups = K / BLOCK;
    for (long g = 0; g < groups; g++) {
        __m512 xl[X_AT_ONCE], xh[X_AT_ONCE];
        for (int i = 0; i < mr; i++) {
            xl[i] = _mm512_loadu_ps(x + i * ldx + g * BLOCK);
            xh[i] = _mm512_loadu_ps(x + i * ldx + g * BLOCK + 16);
        }
        for (int r = 0; r < nr; r++) {
            long row = n + r;
            __m512 wl, wh;
            weights_of_block(codes + row * (K / 2) + g * 16, scale[row * groups + g], zero[row * groups + g], &wl, &wh);
            for (int i = 0; i < mr; i++) {
                acc[r][i] = _mm512_fmadd_ps(wl, xl[i], acc[r][i]);
                acc[r][i] = _mm512_fmadd_ps(wh, xh[i], acc[r][i]);
            }
        }
    }
    for (int r = 0; r < nr; r++)
        for (int i = 0; i < mr; i++)
            y[i * ldy + n + r] = _mm512_reduce_add_ps(acc[r][i]) + (bias ? bias[n + r] : 0.0f);
}

#else /* portable: the compiler vectorises the 16-wide inner loops */

static inline __attribute__((always_inline)) void tile(const float *x, long ldx, long K, const uint8_t *codes,
        const float *scale, const float *zero, long n, int nr, int mr, const float *bias, float *y, long ldy) {
    float acc[ROWS_AT_ONCE][X_AT_ONCE][16];
    memset(acc, 0, sizeof(acc));
    long groups = K / BLOCK;
    for (long g = 0; g < groups; g++) {
        for (int r = 0; r < nr; r++) {
            long row = n + r;
            const uint8_t *c = codes + row * (K / 2) + g * 16;
            float s = scale[row * groups + g], z = zero[row * groups + g];
            float wl[16], wh[16];
            for (int j = 0; j < 16; j++) {
                wl[j] = __builtin_fmaf((float)(c[j] & 0x0F), s, z);
                wh[j] = __builtin_fmaf((float)(c[j] >> 4), s, z);
            }
            for (int i = 0; i < mr; i++) {
                const float *xi = x + i * ldx + g * BLOCK;
                for (int j = 0; j < 16; j++) acc[r][i][j] += wl[j] * xi[j] + wh[j] * xi[16 + j];
            }
        }
    }
    for (int r = 0; r < nr; r++)
        for (int i = 0; i < mr; i++) {
            float sum = 0.0f;
            for (int j = 0; j < 16; j++) sum += acc[r][i][j];
            y[i * ldy + n + r] = sum + (bias ? bias[n + r] : 0.0f);
        }
}
#endif

#define TILE_CASE(NR, MR) tile(xm, K, K, codes, scale, zero, n, NR, MR, bias, ym, N)

/* Output rows n .. n + nr - 1 for input rows 0 .. mr - 1 of xm; every (nr, mr) pair gets its own fully unrolled
   tile, with at most 16 sums in registers: 4 output rows for up to 4 inputs, 2 for up to 8. */
static void rows_tile(const float *xm, long K, const uint8_t *codes, const float *scale, const float *zero,
                      long N, long n, int nr, int mr, const float *bias, float *ym) {
    switch (nr * 16 + mr) {
        case 4 * 16 + 4: TILE_CASE(4, 4); break;
        case 4 * 16 + 3: TILE_CASE(4, 3); break;
        case 4 * 16 + 2: TILE_CASE(4, 2); break;
        case 4 * 16 + 1: TILE_CASE(4, 1); break;
        case 2 * 16 + 8: TILE_CASE(2, 8); break;
        case 2 * 16 + 7: TILE_CASE(2, 7); break;
        case 2 * 16 + 6: TILE_CASE(2, 6); break;
        case 2 * 16 + 5: TILE_CASE(2, 5); break;
        case 1 * 16 + 8: TILE_CASE(1, 8); break;
        case 1 * 16 + 7: TILE_CASE(1, 7); break;
        case 1 * 16 + 6: TILE_CASE(1, 6); break;
        case 1 * 16 + 5: TILE_CASE(1, 5); break;
        case 1 * 16 + 4: TILE_CASE(1, 4); break;
        case 1 * 16 + 3: TILE_CASE(1, 3); break;
        case 1 * 16 + 2: TILE_CASE(1, 2); break;
        default: TILE_CASE(1, 1); break;
    }
}

/* x: (M, K) float32, contiguous; codes (N, K / 2); scale, zero (N, K / 32); bias (N) or NULL; y: (M, N).
   `threads`: torch's intra-op thread count, passed in because OpenMP's own setting is per calling thread. */
int lp_four_bit_linear(const float *x, long M, long K, const uint8_t *codes, const float *scale, const float *zero,
                       long N, const float *bias, float *y, int threads) {
    if (K % BLOCK || M < 0 || N < 0 || threads < 1) return 1;
    long tiles = (N + ROWS_AT_ONCE - 1) / ROWS_AT_ONCE;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long t = 0; t < tiles; t++) {
        long n = t * ROWS_AT_ONCE, end = n + ROWS_AT_ONCE < N ? n + ROWS_AT_ONCE : N;
        for (long m = 0; m < M; m += X_AT_ONCE) {
            int mr = (int)(M - m < X_AT_ONCE ? M - m : X_AT_ONCE);
            int step = mr <= 4 ? 4 : 2; /* output rows per tile: keeps 16 sums */
            long r = n;
            for (; r + step <= end; r += step) rows_tile(x + m * K, K, codes, scale, zero, N, r, step, mr, bias, y + m * N);
            for (; r < end; r++) rows_tile(x + m * K, K, codes, scale, zero, N, r, 1, mr, bias, y + m * N);
        }
    }
    return 0;
}
