/* Batched gather matrix-vector LoRA for one decode step on a CPU (Punica's BGMV, written for CPUs).
 *
 * For each of n batch entries j:   out[rows[j]] += round(x[rows[j]] . A[index[j]][:rank]^T) . B[index[j]][:rank]
 * with A stored [entries, padded_rank, d_in] and B (the scaled B, transposed) [entries, padded_rank, d_out], both
 * row-major. The shrink rounds to the storage type (as a bf16 torch.bmm does), the expand accumulates in fp32 and
 * rounds once, then the add rounds: the same arithmetic as out + bmm(bmm(x, A^T), B) in torch, so a row's result
 * is its own (no other row changes its bits) and matches torch's up to the order of the fp32 sums.
 *
 * Why: torch's bf16 bmm on a CPU calls one oneDNN matmul per batch entry; at decode (one token per row) that
 * per-entry overhead, not the bytes, is most of a multi-adapter step. One pass here reads each operand once.
 * Compiled at first use by adapterhub_local/inference/cpu_lora_kernel.py (cc -O3 -march=native); the fixed-width
 * lane sums vectorise without fast-math, so results do not depend on the compiler's reassociation.
 *
 * Returns 0, or 1 when rank exceeds MAX_RANK, 2 when an index is out of range (checked before anything is
 * written: a refused call writes nothing).
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define LANES 64 /* four 16-wide accumulators: the shrink is not held up by one add chain */
#define CHUNK 512
#define MAX_RANK 4096
#define SHRINK_BUFFER 65536 /* floats of shrunk activations per block of entries (256 KiB per thread) */

static inline float f32_load(float v) { return v; }
static inline float f32_round(float v) { return v; }

/* The entries run in two passes: every shrink (one linear walk through A), then every expand (one through B).
 * Interleaving them per entry switched between the two operand streams every few kilobytes, which kept the
 * hardware prefetchers from running ahead; in blocks of SHRINK_BUFFER / rank entries. */
#define DEFINE_BGMV(NAME, T, LOAD, ROUND)                                                                  \
  int NAME(int64_t n, int64_t rank, int64_t d_in, int64_t d_out, const T* x, T* out, int64_t rows_total,      \
           const int64_t* rows, const T* a, const T* b, int64_t padded_rank, int64_t entries,                  \
           const int64_t* index) {                                                                             \
    if (rank > MAX_RANK || rank > padded_rank) return 1;                                                       \
    for (int64_t j = 0; j < n; j++) {                                                                          \
      int64_t row = rows ? rows[j] : j, entry = index ? index[j] : j;                                          \
      if (row < 0 || row >= rows_total || entry < 0 || entry >= entries) return 2;                             \
    }                                                                                                          \
    if (rank == 0) return 0;                                                                                   \
    static _Thread_local float shrunk[SHRINK_BUFFER];                                                          \
    float acc[CHUNK];                                                                                          \
    int64_t block = SHRINK_BUFFER / rank;                                                                      \
    for (int64_t j0 = 0; j0 < n; j0 += block) {                                                                \
      int64_t j1 = n - j0 < block ? n : j0 + block;                                                            \
      for (int64_t j = j0; j < j1; j++) {                                                                      \
        int64_t row = rows ? rows[j] : j, entry = index ? index[j] : j;                                        \
        const T* xr = x + row * d_in;                                                                          \
        const T* ar = a + entry * padded_rank * d_in;                                                          \
        float* s = shrunk + (j - j0) * rank;                                                                   \
        for (int64_t k = 0; k < rank; k++) {                                                                   \
          const T* ak = ar + k * d_in;                                                                         \
          float lane[LANES] = {0};                                                                             \
          int64_t t = 0;                                                                                       \
          for (; t + LANES <= d_in; t += LANES)                                                                \
            for (int l = 0; l < LANES; l++) lane[l] += LOAD(ak[t + l]) * LOAD(xr[t + l]);                      \
          for (; t < d_in; t++) lane[t % LANES] += LOAD(ak[t]) * LOAD(xr[t]);                                  \
          for (int w = LANES / 2; w > 0; w /= 2)                                                               \
            for (int l = 0; l < w; l++) lane[l] += lane[l + w];                                                \
          s[k] = LOAD(ROUND(lane[0]));                                                                         \
        }                                                                                                      \
      }                                                                                                        \
      for (int64_t j = j0; j < j1; j++) {                                                                      \
        int64_t row = rows ? rows[j] : j, entry = index ? index[j] : j;                                        \
        const float* s = shrunk + (j - j0) * rank;                                                             \
        const T* br = b + entry * padded_rank * d_out;                                                         \
        T* yr = out + row * d_out;                                                                             \
        for (int64_t c = 0; c < d_out; c += CHUNK) {                                                           \
          int64_t m = d_out - c < CHUNK ? d_out - c : CHUNK;                                                   \
          for (int64_t o = 0; o < m; o++) acc[o] = 0.0f;                                                       \
          for (int64_t k = 0; k < rank; k++) {                                                                 \
            const T* bk = br + k * d_out + c;                                                                  \
            float sk = s[k];                                                                                   \
            for (int64_t o = 0; o < m; o++) acc[o] += sk * LOAD(bk[o]);                                        \
          }                                                                                                    \
          for (int64_t o = 0; o < m; o++) yr[c + o] = ROUND(LOAD(yr[c + o]) + LOAD(ROUND(acc[o])));            \
        }                                                                                                      \
      }                                                                                                        \
    }                                                                                                          \
    return 0;                                                                                                  \
  }

DEFINE_BGMV(bgmv_add_bf16, uint16_t, bf16_load, bf16_round)
DEFINE_BGMV(bgmv_add_f32, float, f32_load, f32_round)
