/* One decode step's attention on a CPU, in bf16: one query token per row, the query heads of each key/value head
 * attending together (grouped-query attention), the softmax in fp32 over all keys at once.
 *
 * For each row b and key/value head h, with the group's G query heads q[g] (pre-scaled) and the row's keys:
 *     s[g][l] = q[g] . k[l]                                   (fp32 sums, or -inf where mask[b][l] is 0)
 *     out[g]  = round_bf16( sum_l exp(s[g][l] - max_l s[g]) v[l] / sum_l exp(s[g][l] - max_l s[g]) )
 * Nothing is rounded to bf16 before the end (torch's CPU flash kernel rounds the probabilities to bf16 before it
 * multiplies them with V, and works through the keys in blocks with a running maximum): the result is at least as
 * close to the exact attention as torch's, though not bit-identical to it.
 *
 * Layouts: q and out [batch, kv_heads * group, dim] contiguous (a [B, H, 1, D] query, a [B, 1, H, D] output); k and
 * v share strides (batch, head, key) with unit stride along dim, so a view of a larger cache needs no copy; mask
 * (optional) one byte per key, rows mask_batch_stride apart (0: one row for the whole batch); scores: scratch of
 * group * keys floats.
 *
 * Why: torch 2.13's CPU flash kernel spends ~1 ms on a SmolLM2-shaped decode step's layer (32 rows, 9 query heads
 * over 3 key/value heads, ~100 keys) — about a quarter of the step once the matmuls are fast.
 *
 * Returns 0, 1 when dim or group exceed the kernel's buffers (MAX_DIM, MAX_GROUP), 3 when some row may attend to
 * no key at all (checked before anything is written: a refused call writes nothing).
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define MAX_DIM 256   /* head size: SmolLM2 64, Llama 128, Gemma 256 */
#define MAX_GROUP 32  /* query heads per key/value head */
#define LANES 16

/* e^x for x <= 0 (the softmax's shifted scores): 2^n * p(r) with r = x - n ln 2, |r| <= ln 2 / 2, and Cephes'
 * degree-6 polynomial for e^r (relative error about 1e-7); below -87 the result is 0 to fp32 precision anyway. */
static inline float exp_nonpositive(float x) {
  if (x < -87.0f) x = -87.0f;
  int32_t n = (int32_t)(x * 1.44269504088896341f - 0.5f); /* x <= 0: rounds to nearest */
  float r = x - (float)n * 0.693359375f;
  r = r + (float)n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  uint32_t bits = (uint32_t)(n + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

static inline float dot(const float* a, const float* b, int64_t dim) {
  float lanes[LANES] = {0};
  int64_t d = 0;
  for (; d + LANES <= dim; d += LANES)
    for (int t = 0; t < LANES; t++) lanes[t] += a[d + t] * b[d + t];
  for (int t = 0; t < 8; t++) lanes[t] += lanes[t + 8]; /* a fixed tree: the same sums whatever the compiler */
  for (int t = 0; t < 4; t++) lanes[t] += lanes[t + 4];
  for (int t = 0; t < 2; t++) lanes[t] += lanes[t + 2];
  float sum = lanes[0] + lanes[1];
  for (; d < dim; d++) sum += a[d] * b[d];
  return sum;
}

int decode_attention_bf16(int64_t batch, int64_t kv_heads, int64_t group, int64_t dim, int64_t keys,
                          const uint16_t* q, const uint16_t* k, const uint16_t* v, int64_t kv_batch_stride,
                          int64_t kv_head_stride, int64_t kv_key_stride, const uint8_t* mask,
                          int64_t mask_batch_stride, float scale, uint16_t* out, float* scores) {
  if (dim > MAX_DIM || group > MAX_GROUP || dim < 1 || group < 1) return 1;
  if (mask)
    for (int64_t b = 0; b < batch; b++) {
      uint8_t any = 0;
      for (int64_t l = 0; l < keys; l++) any |= mask[b * mask_batch_stride + l];
      if (!any) return 3;
    }
  else if (keys < 1)
    return 3;
  static _Thread_local float query[MAX_GROUP * MAX_DIM]; /* 32 KiB each per thread, off the stack */
  static _Thread_local float acc[MAX_GROUP * MAX_DIM];
  float row[MAX_DIM];
  float total[MAX_GROUP];
  for (int64_t b = 0; b < batch; b++) {
    const uint8_t* allowed = mask ? mask + b * mask_batch_stride : 0;
    for (int64_t h = 0; h < kv_heads; h++) {
      const int64_t first = (b * kv_heads + h) * group * dim;
      const uint16_t* kh = k + b * kv_batch_stride + h * kv_head_stride;
      const uint16_t* vh = v + b * kv_batch_stride + h * kv_head_stride;
      for (int64_t i = 0; i < group * dim; i++) query[i] = bf16_load(q[first + i]) * scale;
      for (int64_t l = 0; l < keys; l++) { /* scores */
        if (allowed && !allowed[l]) {
          for (int64_t g = 0; g < group; g++) scores[g * keys + l] = -__builtin_inff();
          continue;
        }
        const uint16_t* key = kh + l * kv_key_stride;
        for (int64_t d = 0; d < dim; d++) row[d] = bf16_load(key[d]);
        for (int64_t g = 0; g < group; g++) scores[g * keys + l] = dot(query + g * dim, row, dim);
      }
      for (int64_t g = 0; g < group; g++) { /* softmax numerators, in place, and their sums */
        float* s = scores + g * keys;
        float top = -__builtin_inff();
        for (int64_t l = 0; l < keys; l++) top = s[l] > top ? s[l] : top;
        float sum = 0.0f;
        for (int64_t l = 0; l < keys; l++) {
          float e = (allowed && !allowed[l]) ? 0.0f : exp_nonpositive(s[l] - top);
          s[l] = e;
          sum += e;
        }
        total[g] = sum;
      }
      memset(acc, 0, sizeof(float) * (size_t)(group * dim));
      for (int64_t l = 0; l < keys; l++) { /* weighted values */
        if (allowed && !allowed[l]) continue;
        const uint16_t* value = vh + l * kv_key_stride;
        for (int64_t d = 0; d < dim; d++) row[d] = bf16_load(value[d]);
        for (int64_t g = 0; g < group; g++) {
          const float weight = scores[g * keys + l];
          float* a = acc + g * dim;
          for (int64_t d = 0; d < dim; d++) a[d] += weight * row[d];
        }
      }
      for (int64_t g = 0; g < group; g++) {
        const float inverse = 1.0f / total[g];
        for (int64_t d = 0; d < dim; d++) out[first + g * dim + d] = bf16_round(acc[g * dim + d] * inverse);
      }
    }
  }
  return 0;
}
