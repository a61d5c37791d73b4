/* dyntree's native kernels: a Llama layer stack over GGUF Q4_1 / Q8_0 weight blocks, in fp32.
 *
 * Why native: once the weights stream at the file's 0.56 bytes a weight, the work between the products
 * (norms, RoPE, attention's small ops, casts, Python) costs more than the products in eager torch. Here a
 * whole range of layers is one call.
 *
 * Exactness: greedy tree decoding is token-exact only if a row's result has the same bits whatever other
 * rows are computed beside it. Every loop below gives each row (token) its own accumulators and the same
 * sequence of operations whatever the row count, the thread count or the tile a row lands in:
 *   - products: a weight block is decoded once (w = q*d + m: exactly the fp32 value a de-quantizer writes,
 *     since q*d is exact in fp32) and multiplied into every row of the tile (up to 8 rows with AVX-512's 32
 *     registers, 4 with AVX2's 16); each (output, row) pair sums its blocks in order into two fixed
 *     accumulators;
 *   - attention: each (row, head) visits the keys it may see in slot order (= position order), so a tree
 *     node gets exactly what plain decoding of its path gets.
 * Compiled per machine (-march=native) and cached: the bits may differ between CPUs, never between rows.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#if defined(__AVX512F__)
#define VW 16
typedef __m512 vf;
#define VLOAD _mm512_loadu_ps
#define VSTORE _mm512_storeu_ps
#define VFMA _mm512_fmadd_ps
#define VMUL _mm512_mul_ps
#define VADD _mm512_add_ps
#define VSET1 _mm512_set1_ps
#define VZERO _mm512_setzero_ps
static inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
#define VW 8
typedef __m256 vf;
#define VLOAD _mm256_loadu_ps
#define VSTORE _mm256_storeu_ps
#define VFMA _mm256_fmadd_ps
#define VMUL _mm256_mul_ps
#define VADD _mm256_add_ps
#define VSET1 _mm256_set1_ps
#define VZERO _mm256_setzero_ps
static inline float vsum(vf v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}
#else
#error "dyntree's native kernels need AVX2 and FMA (or AVX-512)"
#endif

#define QK 32          /* weights per block */
#define VPB (QK / VW)  /* vectors per block */

enum { KIND_Q4_1 = 0, KIND_Q8_0 = 1 };

/* One quantized matrix [out, in]: per block of 32 along `in`, scale d (and min m for Q4_1). Q4_1 codes are
 * 16 bytes a block, ggml's order: byte j holds element j (low nibble) and element j + 16 (high nibble). */
typedef struct {
    const uint8_t *q;
    const float *d;
    const float *m; /* NULL for Q8_0 */
    const float *bias; /* NULL when none */
    int64_t out, in;
    int32_t kind;
    int32_t pad_;
} qmat;

/* The block's 32 weights as VPB vectors, in element order. */
static inline void decode_block(const qmat *w, int64_t o, int64_t b, vf *v) {
    const int64_t nb = w->in / QK;
    const float d = w->d[o * nb + b];
    if (w->kind == KIND_Q4_1) {
        const float m = w->m[o * nb + b];
        const __m128i raw = _mm_loadu_si128((const __m128i *)(w->q + (o * nb + b) * 16));
        const __m128i mask = _mm_set1_epi8(0x0F);
        const __m128i lo = _mm_and_si128(raw, mask);
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
#if VW == 16
        v[0] = VFMA(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), VSET1(d), VSET1(m));
        v[1] = VFMA(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), VSET1(d), VSET1(m));
#else
        const vf dv = VSET1(d), mv = VSET1(m);
        v[0] = VFMA(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), dv, mv);
        v[1] = VFMA(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), dv, mv);
        v[2] = VFMA(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), dv, mv);
        v[3] = VFMA(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), dv, mv);
#endif
    } else {
        const int8_t *q = (const int8_t *)w->q + (o * nb + b) * QK;
        const vf dv = VSET1(d);
#if VW == 16
        v[0] = VMUL(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q))), dv);
        v[1] = VMUL(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16)))), dv);
#else
        for (int i = 0; i < 4; i++)
            v[i] = VMUL(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * i)))), dv);
#endif
    }
}

/* A tile of TO outputs x TR rows. Each (output, row) pair has the same NACC accumulators (with two, the
 * block's first and second half) whatever the tile: a row's sum never depends on its neighbours. One
 * accumulator with AVX-512 leaves registers for two-output tiles of eight rows. */
#if VW == 16
#define NACC 1
#else
#define NACC 2
#endif
#define TILE(TO, TR)                                                                                       \
    static void tile_##TO##_##TR(const qmat *w, const float *x, int64_t ldx, float *y, int64_t ldy,        \
                                 int64_t o0, int64_t r0, const float *res) {                               \
        vf acc[TO][TR][NACC];                                                                              \
        for (int a = 0; a < TO; a++)                                                                       \
            for (int r = 0; r < TR; r++)                                                                   \
                for (int c = 0; c < NACC; c++) acc[a][r][c] = VZERO();                                     \
        const int64_t nb = w->in / QK;                                                                     \
        for (int64_t b = 0; b < nb; b++) {                                                                 \
            for (int a = 0; a < TO; a++) {                                                                 \
                vf wv[VPB];                                                                                \
                decode_block(w, o0 + a, b, wv);                                                            \
                for (int r = 0; r < TR; r++) {                                                             \
                    const float *xr = x + (r0 + r) * ldx + b * QK;                                         \
                    for (int i = 0; i < VPB; i++)                                                          \
                        acc[a][r][i * NACC / VPB] = VFMA(VLOAD(xr + i * VW), wv[i], acc[a][r][i * NACC / VPB]); \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
        for (int a = 0; a < TO; a++)                                                                       \
            for (int r = 0; r < TR; r++) {                                                                 \
                float s = vsum(NACC == 1 ? acc[a][r][0] : VADD(acc[a][r][0], acc[a][r][NACC - 1]));       \
                if (w->bias) s += w->bias[o0 + a];                                                         \
                const int64_t at = (r0 + r) * ldy + o0 + a;                                                \
                y[at] = res ? res[at] + s : s;                                                             \
            }                                                                                              \
    }
TILE(4, 1)
TILE(2, 1)
TILE(2, 2)
TILE(1, 1)
TILE(1, 2)
TILE(1, 3)
TILE(1, 4)
typedef void (*tile_fn)(const qmat *, const float *, int64_t, float *, int64_t, int64_t, int64_t, const float *);
#if VW == 16 /* 32 vector registers: two outputs x up to eight rows share the decoded blocks */
TILE(1, 5)
TILE(1, 6)
TILE(1, 7)
TILE(1, 8)
TILE(2, 3)
TILE(2, 4)
TILE(2, 5)
TILE(2, 6)
TILE(2, 7)
TILE(2, 8)
#define MAX_TILE_ROWS 8
static const tile_fn ONE_OUTPUT[9] = {0, tile_1_1, tile_1_2, tile_1_3, tile_1_4, tile_1_5, tile_1_6, tile_1_7, tile_1_8};
static const tile_fn TWO_OUTPUTS[9] = {0, tile_2_1, tile_2_2, tile_2_3, tile_2_4, tile_2_5, tile_2_6, tile_2_7, tile_2_8};
#else /* 16 registers: one output x up to four rows */
#define MAX_TILE_ROWS 4
static const tile_fn ONE_OUTPUT[5] = {0, tile_1_1, tile_1_2, tile_1_3, tile_1_4};
#endif

#define ROW_BLOCK_FLOATS 32768 /* activations of one row block: 128 KiB, well inside L2 */

/* y[r, o] = (res[r, o] +) sum_k x[r, k] w[o, k] (+ bias[o]) for outputs [o_begin, o_end). One or two rows
 * take tiles of several outputs; more rows visit each output (pair) once and cover all rows with tiles of up
 * to MAX_TILE_ROWS, as even as possible (9 rows as 5 + 4), so an output's blocks come from memory once and
 * stay in L1 for the next row tile. Past one row the products are bound by multiply-adds, not memory;
 * measured on a Sapphire Rapids VM, two-output tiles cut 3-6 rows by 10-25% against one-output tiles. */
static void qmatmul_range(const qmat *w, const float *x, int64_t rows, float *y, const float *res,
                          int64_t o_begin, int64_t o_end) {
    const int64_t ldx = w->in, ldy = w->out;
    int64_t o = o_begin;
    if (rows == 1) {
        for (; o + 4 <= o_end; o += 4) tile_4_1(w, x, ldx, y, ldy, o, 0, res);
        for (; o + 2 <= o_end; o += 2) tile_2_1(w, x, ldx, y, ldy, o, 0, res);
        for (; o < o_end; o++) tile_1_1(w, x, ldx, y, ldy, o, 0, res);
        return;
    }
    if (rows == 2) {
        for (; o + 2 <= o_end; o += 2) tile_2_2(w, x, ldx, y, ldy, o, 0, res);
        for (; o < o_end; o++) tile_1_2(w, x, ldx, y, ldy, o, 0, res);
        return;
    }
    /* Many rows (a prefill) go in blocks whose activations stay in cache while every output visits them:
     * streaming all rows' activations once per output made a 16 x 128-token prefill 3x slower per token
     * than one of 64 tokens. A row's operations are the same in any block, so its bits are too. */
    const int64_t block = ROW_BLOCK_FLOATS / ldx > MAX_TILE_ROWS ? ROW_BLOCK_FLOATS / ldx : MAX_TILE_ROWS;
    for (int64_t r0 = 0; r0 < rows; r0 += block) {
        const int64_t nr = rows - r0 < block ? rows - r0 : block;
        const int64_t tiles = (nr + MAX_TILE_ROWS - 1) / MAX_TILE_ROWS;
        int64_t oo = o;
#if VW == 16
        for (; oo + 2 <= o_end; oo += 2)
            for (int64_t t = 0, r = 0; t < tiles; t++) {
                const int64_t n = (nr - r) / (tiles - t);
                TWO_OUTPUTS[n](w, x, ldx, y, ldy, oo, r0 + r, res);
                r += n;
            }
#endif
        for (; oo < o_end; oo++)
            for (int64_t t = 0, r = 0; t < tiles; t++) {
                const int64_t n = (nr - r) / (tiles - t);
                ONE_OUTPUT[n](w, x, ldx, y, ldy, oo, r0 + r, res);
                r += n;
            }
    }
}

/* Inside a parallel region: the outputs split evenly over the team (multiples of 4 keep tiles whole). */
static void qmatmul_team(const qmat *w, const float *x, int64_t rows, float *y, const float *res) {
    const int nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t quads = (w->out + 3) / 4;
    const int64_t begin = quads * t / nt * 4, end = quads * (t + 1) / nt * 4;
    qmatmul_range(w, x, rows, y, res, begin, end < w->out ? end : w->out);
}

int dyntree_qmatmul(const qmat *w, const float *x, int64_t rows, float *y, int threads) {
#pragma omp parallel num_threads(threads)
    qmatmul_team(w, x, rows, y, NULL);
    return 0;
}

/* ---- the layer stack ---------------------------------------------------------------------------------- */

typedef struct {
    const float *attn_norm, *mlp_norm; /* [H] */
    qmat qkv, o, gate_up, down;
} qlayer;

typedef struct {
    int64_t hidden, inter, heads, kv_heads, head_dim;
    float eps;
    int32_t pad_;
    const float *rope_cos, *rope_sin; /* [max_positions, head_dim] */
} qconfig;

static float dot(const float *a, const float *b, int64_t n) { /* n a multiple of VW */
    vf s0 = VZERO(), s1 = VZERO();
    int64_t i = 0;
    for (; i + 2 * VW <= n; i += 2 * VW) {
        s0 = VFMA(VLOAD(a + i), VLOAD(b + i), s0);
        s1 = VFMA(VLOAD(a + i + VW), VLOAD(b + i + VW), s1);
    }
    for (; i < n; i += VW) s0 = VFMA(VLOAD(a + i), VLOAD(b + i), s0);
    return vsum(VADD(s0, s1));
}

static void rms_norm(const float *x, const float *weight, float *out, int64_t n, float eps) {
    const float inv = 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * inv * weight[i];
}

static void rope(float *x, const float *cos_row, const float *sin_row, int64_t heads, int64_t dim) {
    const int64_t half = dim / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *v = x + h * dim;
        for (int64_t i = 0; i < half; i++) {
            const float a = v[i], b = v[i + half];
            v[i] = a * cos_row[i] - b * sin_row[i];
            v[i + half] = b * cos_row[i + half] + a * sin_row[i + half];
        }
    }
}

/* Softmax attention of one query head over `count` keys (slots `visible`), fp32, in slot order. */
static void attend_one(const float *q, const float *keys, const float *values, int64_t slot_stride,
                       const int32_t *visible, int64_t count, int64_t dim, float scale, float *scores, float *out) {
    float best = -INFINITY;
    for (int64_t j = 0; j < count; j++) {
        const float s = dot(q, keys + (int64_t)visible[j] * slot_stride, dim) * scale;
        scores[j] = s;
        if (s > best) best = s;
    }
    float total = 0.0f;
    for (int64_t j = 0; j < count; j++) {
        scores[j] = expf(scores[j] - best);
        total += scores[j];
    }
    vf acc[128 / VW];
    const int64_t nv = dim / VW;
    for (int64_t i = 0; i < nv; i++) acc[i] = VZERO();
    for (int64_t j = 0; j < count; j++) {
        const float *v = values + (int64_t)visible[j] * slot_stride;
        const vf p = VSET1(scores[j]);
        for (int64_t i = 0; i < nv; i++) acc[i] = VFMA(p, VLOAD(v + i * VW), acc[i]);
    }
    const vf inv = VSET1(1.0f / total);
    for (int64_t i = 0; i < nv; i++) VSTORE(out + i * VW, VMUL(acc[i], inv));
}

static inline float silu(float x) { return x / (1.0f + expf(-x)); }

/* Run layers [start, end) on `hidden` [B*n, H] (updated in place); token r of sequence b = r / n sits at
 * `positions[r]`, writes its key/value at cache slot `slots[r]` and sees the slots where mask[r, :total] is
 * nonzero. Cache tensors [layers, B, KV, max_len, D] fp32 with element strides `strides` (layer, batch, kv
 * head, slot; D contiguous). `scratch` holds dyntree_scratch_floats(...) floats. */
int dyntree_run_layers(const qconfig *cfg, const qlayer *layers, int32_t start, int32_t end, float *hidden,
                       int64_t batch, int64_t n, const int64_t *positions, const int64_t *slots,
                       const uint8_t *mask, int64_t total, float *cache_keys, float *cache_values,
                       const int64_t *strides, float *scratch, int threads) {
    const int64_t rows = batch * n, H = cfg->hidden, D = cfg->head_dim, NH = cfg->heads, KV = cfg->kv_heads;
    const int64_t qkv_width = (NH + 2 * KV) * D, group = NH / KV, I = cfg->inter;
    float *normed = scratch;                       /* [rows, max(H, I)] */
    float *qkv = normed + rows * (H > I ? H : I);  /* [rows, qkv_width] */
    float *attn = qkv + rows * qkv_width;          /* [rows, NH * D] */
    float *gate_up = attn + rows * NH * D;         /* [rows, 2I] */
    float *scores = gate_up + rows * 2 * I;        /* [threads, total] */
    int32_t *visible = (int32_t *)(scores + (int64_t)threads * total); /* [rows, total] */
    int32_t counts[rows > 0 ? rows : 1];
    for (int64_t r = 0; r < rows; r++) { /* the slots a row sees, in slot (= position) order */
        int32_t c = 0;
        for (int64_t j = 0; j < total; j++)
            if (mask[r * total + j]) visible[r * total + c++] = (int32_t)j;
        counts[r] = c;
    }
    const float scale = 1.0f / sqrtf((float)D);
#pragma omp parallel num_threads(threads)
    {
        float *my_scores = scores + (int64_t)omp_get_thread_num() * total;
        for (int32_t li = start; li < end; li++) {
            const qlayer *L = layers + li;
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++) rms_norm(hidden + r * H, L->attn_norm, normed + r * H, H, cfg->eps);
            qmatmul_team(&L->qkv, normed, rows, qkv, NULL);
#pragma omp barrier
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++) {
                float *row = qkv + r * qkv_width;
                const float *c = cfg->rope_cos + positions[r] * D, *s = cfg->rope_sin + positions[r] * D;
                rope(row, c, s, NH + KV, D); /* q heads and k heads are adjacent */
                const int64_t b = r / n;
                for (int64_t g = 0; g < KV; g++) {
                    const int64_t at = li * strides[0] + b * strides[1] + g * strides[2] + slots[r] * strides[3];
                    memcpy(cache_keys + at, row + (NH + g) * D, D * sizeof(float));
                    memcpy(cache_values + at, row + (NH + KV + g) * D, D * sizeof(float));
                }
            }
#pragma omp for schedule(static)
            for (int64_t t = 0; t < rows * NH; t++) {
                const int64_t r = t / NH, h = t % NH, b = r / n, g = h / group;
                const int64_t base = li * strides[0] + b * strides[1] + g * strides[2];
                attend_one(qkv + r * qkv_width + h * D, cache_keys + base, cache_values + base, strides[3],
                           visible + r * total, counts[r], D, scale, my_scores, attn + r * NH * D + h * D);
            }
            qmatmul_team(&L->o, attn, rows, hidden, hidden);
#pragma omp barrier
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++) rms_norm(hidden + r * H, L->mlp_norm, normed + r * H, H, cfg->eps);
            qmatmul_team(&L->gate_up, normed, rows, gate_up, NULL);
#pragma omp barrier
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++) {
                const float *g = gate_up + r * 2 * I, *u = g + I;
                float *a = normed + r * I;
                for (int64_t i = 0; i < I; i++) a[i] = silu(g[i]) * u[i];
            }
            qmatmul_team(&L->down, normed, rows, hidden, hidden);
#pragma omp barrier
        }
    }
    return 0;
}

int64_t dyntree_scratch_floats(const qconfig *cfg, int64_t rows, int64_t total, int threads) {
    const int64_t H = cfg->hidden, I = cfg->inter, D = cfg->head_dim;
    const int64_t qkv_width = (cfg->heads + 2 * cfg->kv_heads) * D;
    return rows * ((H > I ? H : I) + qkv_width + cfg->heads * D + 2 * I + total) + (int64_t)threads * total;
}

int dyntree_vector_width(void) { return VW; }
