/* bf16 <-> fp32 for the CPU kernels (bgmv.c, decode_attention.c): widening is exact; narrowing rounds to nearest
 * even and keeps NaN quiet, as torch rounds. */
#ifndef ADAPTERHUB_BF16_H
#define ADAPTERHUB_BF16_H
#include <stdint.h>
#include <string.h>

static inline float bf16_load(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static inline uint16_t bf16_round(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

#endif
