// Plain C++ interface of the CPU direction kernels (no torch types; bindings.cpp adds those).
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "hosl_direction.h"

namespace hosl {
namespace cpu {

// One tensor of a multi-tensor op: `numel` contiguous elements of `dtype`, read from `in` and
// written to `out` (the same pointer for in-place ops), holding coordinates offset .. offset+numel-1.
struct TensorSlot {
  const void* in;
  void* out;
  uint64_t numel;
  uint64_t offset;
  DType dtype;
};

// Every op takes the direction family (hosl_direction.h, direction4). The per-tensor factors
// (`factor`, `dir_scales`; nullptr: none, 1.0f) are passed to the family's definition, which may
// ignore them: Family::kSphere uses factor * z_gaussian (rounded); its factors come from the host
// (spec.sphere_scale of the norms from sq_norms below).

// out[e] = z(key, offset + e) for e in [0, numel), float32. Sphere: factor * z.
void randn(uint32_t key_lo, uint32_t key_hi, uint64_t offset, uint64_t numel, float* out, int num_threads,
           Family family = Family::kGaussian, float factor = 1.0f);

// out = round(in + scale * z(key, offset + e)) for every slot. Sphere: z is dir_scales[j] * z for slot j.
void perturb(const TensorSlot* slots, size_t num_slots, uint32_t key_lo, uint32_t key_hi, float scale,
             int num_threads, Family family = Family::kGaussian, const float* dir_scales = nullptr);

// In place, one pass over each slot: acc = w - decay*w; acc -= coeffs[q] * z(key_q, .) for q < num_dirs.
// Sphere: z is dir_scales[q * num_slots + j] * z for slot j.
void zo_update(const TensorSlot* slots, size_t num_slots, const uint32_t* keys_lo, const uint32_t* keys_hi,
               const float* coeffs, size_t num_dirs, float decay, int num_threads,
               Family family = Family::kGaussian, const float* dir_scales = nullptr);

// out[j] = sum over slot j's coordinates of sphere_sq_term(z_gaussian(key, .)) (exact; numel <= 2^33).
// Only numel and offset of the slots are used.
void sq_norms(const TensorSlot* slots, size_t num_slots, uint32_t key_lo, uint32_t key_hi, uint64_t* out,
              int num_threads);

// The SIMD variant in use ("avx512", "avx2" or "scalar"), picked at load time from the CPU (and the
// environment variable HOSL_CPU_ISA, which can only lower it). set_isa returns false when the CPU
// lacks the variant asked for. Meant for tests and benchmarks.
const char* isa();
bool set_isa(const char* name);

// force_generic(true): every family takes the generic path (direction4 of hosl_direction.h per group
// of 4 coordinates, scalar), which otherwise serves only the families without a SIMD path; tests
// compare the two. Returns the previous setting. Not thread-safe: meant for tests.
bool force_generic(bool on);

}  // namespace cpu
}  // namespace hosl
