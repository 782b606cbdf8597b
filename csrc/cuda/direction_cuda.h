// Plain C++ interface of the CUDA direction kernels: pointers, sizes, a stream. No torch types
// (bindings.cpp adds those), so this can be called from any C++/CUDA host code.
//
// Every op is ONE kernel launch for all the tensors it is given (they must share one dtype): the
// tensors' pointers, sizes and coordinate offsets go to a small table in device memory, and the
// launch's blocks are spread over the tensors' chunks (apex multi_tensor_apply style, but with a
// device-side table so there is no limit on the number of tensors per launch).
#pragma once

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include "hosl_direction.h"

namespace hosl {
namespace cuda {

// One tensor: `numel` contiguous elements read from `in` (unused by randn) and written to `out`
// (the same pointer for in-place ops), holding coordinates offset .. offset+numel-1.
struct TensorSlot {
  const void* in;
  void* out;
  uint64_t numel;
  uint64_t offset;
};

// Families (hosl_direction.h, direction4): the per-tensor factors, when given (`dir_scales`, host
// memory, [q * num_slots + j] for slot j and direction q; nullptr: none), are passed to the
// family's definition. Family::kSphere uses factor * z_gaussian, its factors being spec.sphere_scale
// of the norms that sq_norms computes; the other families ignore them.

// Bytes of device workspace the ops below need for `num_slots` tensors and `num_dirs` directions
// (the table, including room for the sphere factors). The caller allocates it (e.g. from its caching allocator) on the launch's device
// and keeps it alive until the launch has run on `stream`.
size_t workspace_bytes(size_t num_slots, size_t num_dirs);

// out[e] = z(key, offset + e), float32. `slots[j].in` is ignored.
// Sphere: factor * z.
cudaError_t randn(const TensorSlot* slots, size_t num_slots, uint32_t key_lo, uint32_t key_hi, void* workspace,
                  cudaStream_t stream, Family family = Family::kGaussian, float factor = 1.0f);

// out = round(in + scale * z(key, offset + e)), all slots of `dtype`.
cudaError_t perturb(const TensorSlot* slots, size_t num_slots, DType dtype, uint32_t key_lo, uint32_t key_hi,
                    float scale, void* workspace, cudaStream_t stream, Family family = Family::kGaussian,
                    const float* dir_scales = nullptr);

// In place: acc = w - decay*w; acc -= coeffs[q] * z(key_q, .) for q < num_dirs; w = round(acc).
// Weights are read and written once, whatever num_dirs is.
cudaError_t zo_update(const TensorSlot* slots, size_t num_slots, DType dtype, const uint32_t* keys_lo,
                      const uint32_t* keys_hi, const float* coeffs, size_t num_dirs, float decay, void* workspace,
                      cudaStream_t stream, Family family = Family::kGaussian, const float* dir_scales = nullptr);

// out[j] += sum over slot j's coordinates of sphere_sq_term(z_gaussian) (exact 64-bit integer sums,
// order-free). `out` is device memory of num_slots zeroed words; slots' in/out are ignored.
cudaError_t sq_norms(const TensorSlot* slots, size_t num_slots, uint32_t key_lo, uint32_t key_hi,
                     unsigned long long* out, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace hosl
