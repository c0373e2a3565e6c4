/*
 * The mask streams' AES-256-CTR with VAES, two blocks per AES instruction, and
 * quantize.encode's loop over the rounding's stream.
 *
 * Why this is ours and not OpenSSL's: on the reference machine (AMD EPYC: AES-NI, VAES,
 * AVX2, no AVX-512) OpenSSL 4.0.3 draws AES-256-CTR at AES-NI's rate, one 128-bit block
 * per instruction (6.9 GB/s, ours 10 GB/s: docs/secagg.md, Cost). The masks are
 * the largest cost of a secure round on a client, so the stream that masks.py defines is
 * drawn here with 256-bit VAES, two blocks per instruction, where the CPU has it. The AES rounds are the CPU's instructions (constant time); the only code of ours
 * is the standard AES-256 key expansion with AESKEYGENASSIST and the counter blocks.
 * masks.py checks the output against OpenSSL's stream before it uses this code, and
 * tests/test_secagg_primitives.py compares the two over many lengths and offsets.
 *
 * The stream (masks.py): AES-256 of the counter blocks 0^96 || BE32(2 + j), j = 0, 1, ...;
 * word w of a vector is word w % 4 of block w / 4, read little-endian (numpy's uint32 on
 * x86). No Python.h: masks.py loads this library with ctypes, which releases the GIL.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#define AESNI __attribute__((target("avx2,aes,vaes")))

/* 1 when this CPU has AVX2, AES-NI and VAES (checked at run time, so the library loads
 * anywhere and is used only where it can run). */
int consortia_aesctr_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("aes") &&
           __builtin_cpu_supports("vaes");
}

/* w0, w0^w1, w0^w1^w2, w0^w1^w2^w3: each word of a round key XORs all before it. */
AESNI static inline __m128i prefix_xor(__m128i t) {
    t = _mm_xor_si128(t, _mm_slli_si128(t, 4));
    t = _mm_xor_si128(t, _mm_slli_si128(t, 4));
    return _mm_xor_si128(t, _mm_slli_si128(t, 4));
}

/* The next even round key from the one two back (t1) and AESKEYGENASSIST of the last
 * (RotWord, SubWord, Rcon: word 3); the next odd one from t3 and SubWord of the new even
 * key's last word (AESKEYGENASSIST with Rcon 0: word 2). */
AESNI static inline __m128i expand_even(__m128i t1, __m128i assist) {
    return _mm_xor_si128(prefix_xor(t1), _mm_shuffle_epi32(assist, 0xff));
}

AESNI static inline __m128i expand_odd(__m128i t1, __m128i t3) {
    return _mm_xor_si128(prefix_xor(t3), _mm_shuffle_epi32(_mm_aeskeygenassist_si128(t1, 0), 0xaa));
}

/* FIPS-197's AES-256 key expansion: 15 round keys. The round constant must be an
 * immediate, hence the macro. */
#define EXPAND(i, rcon)                                                   \
    t1 = expand_even(t1, _mm_aeskeygenassist_si128(t3, rcon));           \
    rk[2 * (i)] = _mm256_broadcastsi128_si256(t1);                       \
    if ((i) < 7) {                                                        \
        t3 = expand_odd(t1, t3);                                          \
        rk[2 * (i) + 1] = _mm256_broadcastsi128_si256(t3);               \
    }

AESNI static void expand_key(const uint8_t key[32], __m256i rk[15]) {
    __m128i t1 = _mm_loadu_si128((const __m128i *)key);
    __m128i t3 = _mm_loadu_si128((const __m128i *)(key + 16));
    rk[0] = _mm256_broadcastsi128_si256(t1);
    rk[1] = _mm256_broadcastsi128_si256(t3);
    EXPAND(1, 0x01) EXPAND(2, 0x02) EXPAND(3, 0x04) EXPAND(4, 0x08)
    EXPAND(5, 0x10) EXPAND(6, 0x20) EXPAND(7, 0x40)
}

#define TILE_WORDS 64 /* 16 blocks, 8 registers of two: enough AES in flight */
#define MAX_KEYS 256

/* The 16 keystream blocks of one tile whose first counter is c. */
AESNI static inline void tile_stream(const __m256i rk[15], uint32_t c, __m256i x[8]) {
    const __m256i bswap = _mm256_setr_epi8(3, 2, 1, 0, 7, 6, 5, 4, 11, 10, 9, 8, 15, 14, 13, 12,
                                           3, 2, 1, 0, 7, 6, 5, 4, 11, 10, 9, 8, 15, 14, 13, 12);
    for (int i = 0; i < 8; i++) {
        __m256i ctr = _mm256_setr_epi32(0, 0, 0, (int)(c + 2 * i), 0, 0, 0, (int)(c + 2 * i + 1));
        x[i] = _mm256_xor_si256(_mm256_shuffle_epi8(ctr, bswap), rk[0]);
    }
    for (int r = 1; r < 14; r++)
        for (int i = 0; i < 8; i++) x[i] = _mm256_aesenc_epi128(x[i], rk[r]);
    for (int i = 0; i < 8; i++) x[i] = _mm256_aesenclast_epi128(x[i], rk[14]);
}

AESNI static inline void apply(__m256i *a, const __m256i x[8], int sign) {
    for (int i = 0; i < 8; i++) {
        __m256i v = _mm256_loadu_si256(a + i);
        v = sign > 0 ? _mm256_add_epi32(v, x[i]) : sign < 0 ? _mm256_sub_epi32(v, x[i]) : x[i];
        _mm256_storeu_si256(a + i, v);
    }
}

/* acc[w] (op)= word (4 * first_block + w) of each key's stream, for w < n_words, key by
 * key in order: op is += for sign +1, -= for -1, = for 0 (uint32, so modulo 2**32).
 * keys: m keys of 32 bytes. Returns 0, -1 when m is out of range or the stream would
 * pass block 2**32 - 3 (the counter's last value; masks.py never asks for more), -2 when
 * memory for the round keys is refused. */
AESNI int consortia_aesctr_apply(uint32_t *acc, size_t n_words, const uint8_t *keys,
                                 const int8_t *signs, size_t m, uint64_t first_block) {
    if (m == 0 || m > MAX_KEYS) return -1;
    uint64_t blocks = (n_words + 3) / 4;
    if (first_block > 0xFFFFFFFDull || blocks > 0xFFFFFFFEull - first_block) return -1;
    /* The round keys, 480 bytes a key, from the heap: 120 KiB for MAX_KEYS. */
    __m256i(*rk)[15] = aligned_alloc(32, m * sizeof *rk);
    if (rk == NULL) return -2;
    for (size_t k = 0; k < m; k++) expand_key(keys + 32 * k, rk[k]);
    uint32_t c = (uint32_t)(2 + first_block);
    size_t full = n_words - n_words % TILE_WORDS;
    __m256i x[8];
    for (size_t w = 0; w < full; w += TILE_WORDS, c += TILE_WORDS / 4)
        for (size_t k = 0; k < m; k++) {
            tile_stream(rk[k], c, x);
            apply((__m256i *)(acc + w), x, signs[k]);
        }
    if (full < n_words) { /* the last, partial tile, through a whole one */
        __m256i tail[8];
        memset(tail, 0, sizeof tail);
        memcpy(tail, acc + full, (n_words - full) * 4);
        for (size_t k = 0; k < m; k++) {
            tile_stream(rk[k], c, x);
            apply(tail, x, signs[k]);
        }
        memcpy(acc + full, tail, (n_words - full) * 4);
        memset(tail, 0, sizeof tail);
    }
    /* Leave no key material behind: the round keys and the last keystream. */
    volatile unsigned char *wipe = (volatile unsigned char *)rk;
    for (size_t i = 0; i < m * sizeof rk[0]; i++) wipe[i] = 0;
    free(rk);
    wipe = (volatile unsigned char *)x;
    for (size_t i = 0; i < sizeof x; i++) wipe[i] = 0;
    return 0;
}

/* quantize.encode's loop: out[i] = trunc(clamp(x[i] * scale + u_i, 0, top)) with
 * u_i = w_i * 2**-32 + shift, w_i word i of the key's stream read as int32 (so
 * w_i * 2**-32 + 1/2 is uniform on [0, 1) and shift = offset + 1/2). x is float32
 * (x_is_f64 = 0) or float64; everything is computed in float64, product then sum,
 * each rounded once (no fused multiply-add: this function is not compiled for FMA), so
 * the result is bit for bit the numpy formula quantize.py's tests check. top must be
 * below 2**31 (the int32 conversion); quantize.py uses it only then. Returns 0, or -1
 * when top is out of range or n words pass the stream's 2**32 - 2 blocks. */
AESNI int consortia_encode(uint32_t *out, const void *x, int x_is_f64, size_t n,
                           const uint8_t *key, double scale, double shift, double top) {
    if (!(top >= 0.0 && top < 2147483648.0)) return -1;
    if ((n + 3) / 4 > 0xFFFFFFFEull) return -1;
    __m256i rk[15];
    expand_key(key, rk);
    const __m256d vscale = _mm256_set1_pd(scale), vshift = _mm256_set1_pd(shift);
    const __m256d vtop = _mm256_set1_pd(top), vzero = _mm256_setzero_pd();
    const __m256d unit = _mm256_set1_pd(1.0 / 4294967296.0);
    const float *xf = (const float *)x;
    const double *xd = (const double *)x;
    __m256i words[8];
    __m128i level[16];
    uint32_t c = 2;
    for (size_t w = 0; w < n; w += TILE_WORDS, c += TILE_WORDS / 4) {
        tile_stream(rk, c, words);
        size_t count = n - w < TILE_WORDS ? n - w : TILE_WORDS;
        const int32_t *wd = (const int32_t *)words;
        for (size_t i = 0; i < TILE_WORDS; i += 4) {
            __m256d xv;
            if (i + 4 <= count) {
                xv = x_is_f64 ? _mm256_loadu_pd(xd + w + i)
                              : _mm256_cvtps_pd(_mm_loadu_ps(xf + w + i));
            } else { /* the last, partial group: zeros beyond n, never written out */
                double part[4] = {0.0, 0.0, 0.0, 0.0};
                for (size_t j = 0; i + j < count; j++)
                    part[j] = x_is_f64 ? xd[w + i + j] : (double)xf[w + i + j];
                xv = _mm256_loadu_pd(part);
            }
            __m256d u = _mm256_add_pd(
                _mm256_mul_pd(_mm256_cvtepi32_pd(_mm_loadu_si128((const __m128i *)(wd + i))), unit),
                vshift);
            __m256d q = _mm256_add_pd(_mm256_mul_pd(xv, vscale), u);
            q = _mm256_max_pd(_mm256_min_pd(q, vtop), vzero);
            level[i / 4] = _mm256_cvttpd_epi32(q);
            if (i + 4 >= count) break;
        }
        if (count == TILE_WORDS)
            memcpy(out + w, level, sizeof level);
        else
            memcpy(out + w, level, count * 4);
    }
    volatile unsigned char *wipe = (volatile unsigned char *)rk;
    for (size_t i = 0; i < sizeof rk; i++) wipe[i] = 0;
    wipe = (volatile unsigned char *)words;
    for (size_t i = 0; i < sizeof words; i++) wipe[i] = 0;
    return 0;
}

#else /* not x86-64 with GCC or Clang: never used */

int consortia_aesctr_supported(void) { return 0; }

int consortia_aesctr_apply(uint32_t *acc, size_t n_words, const uint8_t *keys,
                           const int8_t *signs, size_t m, uint64_t first_block) {
    (void)acc; (void)n_words; (void)keys; (void)signs; (void)m; (void)first_block;
    return -1;
}

int consortia_encode(uint32_t *out, const void *x, int x_is_f64, size_t n,
                     const uint8_t *key, double scale, double shift, double top) {
    (void)out; (void)x; (void)x_is_f64; (void)n; (void)key; (void)scale; (void)shift; (void)top;
    return -1;
}

#endif
