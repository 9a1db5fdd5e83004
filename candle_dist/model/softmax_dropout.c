/* Row softmax + attention dropout in one pass over a chunk of scores, and its backward.
 *
 * The chunked attention (attention.py) computes scores with BLAS and calls these for the
 * elementwise part, which in separate torch ops costs a memory pass each (softmax, mask,
 * rescale; in backward exp, mask, softmax backward) plus drawing the mask twice. Here each row
 * stays in cache and the keep mask is a counter-based hash of (seed, head, query id, key id),
 * identical in forward and backward and on any number of ranks; `dropout_keep` in
 * softmax_dropout.py is the same hash in torch ops.
 *
 * Layout: `scores` [heads, rows, keys] contiguous, row (h, i) at (h * rows + i) * keys; optional
 * `own` [heads, rows]: one extra key per row (the query's own token, key id = its query id).
 */
#include <math.h>
#include <stdint.h>

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
/* glibc's libmvec has vector exp; declaring it so lets the compiler call it in the loops. */
#pragma omp declare simd notinbranch
float expf(float);
#pragma omp declare simd notinbranch
double exp(double);
#endif

static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x21f0aaadu;
    x ^= x >> 15;
    x *= 0x735a2d97u;
    x ^= x >> 15;
    return x;
}

static inline uint32_t row_key(uint32_t seed, int64_t head, int64_t stride, int64_t query) {
    return mix32(mix32(seed) ^ (uint32_t)(head * stride + query));
}

static inline uint32_t col_key(int64_t key) { return mix32((uint32_t)key + 0x632be5abu); }

/* exp(x) flushed to 0 for x <= -86 (-707 in double): the results there would be (nearly)
 * denormal, which costs ~10x on x86; clamping the argument first keeps the vector exp fast. */
static inline float flushed_expf(float x) {
    float clamped = x > -86.0f ? x : -86.0f;
    float e = expf(clamped);
    return x > -86.0f ? e : 0.0f;
}

static inline double flushed_exp(double x) {
    double clamped = x > -707.0 ? x : -707.0;
    double e = exp(clamped);
    return x > -707.0 ? e : 0.0;
}

#define DEFINE_KERNELS(T, SUFFIX, EXP, LOG)                                                        \
    void softmax_dropout_forward_##SUFFIX(                                                         \
        T *scores, T *own, T *lse, int64_t heads, int64_t rows, int64_t keys,                      \
        const int64_t *query_ids, int64_t key_offset, int64_t stride, uint32_t seed,               \
        uint32_t threshold, T keep_scale, int threads) {                                           \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                          \
        for (int64_t r = 0; r < heads * rows; r++) {                                               \
            T *s = scores + r * keys;                                                              \
            int64_t h = r / rows, i = r % rows;                                                    \
            T m = own ? own[r] : s[0];                                                             \
            _Pragma("omp simd reduction(max : m)")                                                 \
            for (int64_t j = 0; j < keys; j++) m = s[j] > m ? s[j] : m;                            \
            T sum = own ? EXP(own[r] - m) : (T)0;                                                  \
            _Pragma("omp simd reduction(+ : sum)")                                                 \
            for (int64_t j = 0; j < keys; j++) {                                                   \
                T e = EXP(s[j] - m);                                                               \
                s[j] = e;                                                                          \
                sum += e;                                                                          \
            }                                                                                      \
            lse[r] = m + LOG(sum);                                                                 \
            T inv = keep_scale / sum;                                                              \
            uint32_t rk = row_key(seed, h, stride, query_ids[i]);                                  \
            for (int64_t j = 0; j < keys; j++) {                                                   \
                uint32_t bits = mix32(rk + col_key(key_offset + j));                               \
                s[j] = bits >= threshold ? s[j] * inv : (T)0;                                      \
            }                                                                                      \
            if (own) {                                                                             \
                uint32_t bits = mix32(rk + col_key(query_ids[i]));                                 \
                own[r] = bits >= threshold ? EXP(own[r] - m) * inv : (T)0;                         \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
                                                                                                   \
    void softmax_dropout_backward_##SUFFIX(                                                        \
        T *scores, T *grad, T *own, T *own_grad, const T *lse, const T *delta, int64_t heads,      \
        int64_t rows, int64_t keys, const int64_t *query_ids, int64_t key_offset,                  \
        int64_t stride, uint32_t seed, uint32_t threshold, T keep_scale, int threads) {            \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                          \
        for (int64_t r = 0; r < heads * rows; r++) {                                               \
            T *s = scores + r * keys, *g = grad + r * keys;                                        \
            int64_t h = r / rows, i = r % rows;                                                    \
            uint32_t rk = row_key(seed, h, stride, query_ids[i]);                                  \
            T l = lse[r], d = delta[r];                                                            \
            for (int64_t j = 0; j < keys; j++) {                                                   \
                uint32_t bits = mix32(rk + col_key(key_offset + j));                               \
                T p = EXP(s[j] - l);                                                               \
                T kept = bits >= threshold ? keep_scale : (T)0;                                    \
                s[j] = p * kept;                                                                   \
                g[j] = p * (g[j] * kept - d);                                                      \
            }                                                                                      \
            if (own) {                                                                             \
                uint32_t bits = mix32(rk + col_key(query_ids[i]));                                 \
                T p = EXP(own[r] - l);                                                             \
                T kept = bits >= threshold ? keep_scale : (T)0;                                    \
                own[r] = p * kept;                                                                 \
                own_grad[r] = p * (own_grad[r] * kept - d);                                        \
            }                                                                                      \
        }                                                                                          \
    }

DEFINE_KERNELS(float, f32, flushed_expf, logf)
DEFINE_KERNELS(double, f64, flushed_exp, log)
