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

// Bytes of device workspace the ops below need for `num_slots` tensors and `num_dirs` directions
// (the table). The caller allocates it (e.g. from its caching allocator) on the launch's device
// and keeps it alive until the launch has run on `stream`.
size_t workspace_bytes(size_t num_slots, size_t num_dirs);

// out[e] = z(key, offset + e), float32. `slots[j].in` is ignored.
cudaError_t randn(const TensorSlot* slots, size_t num_slots, uint32_t key_lo, uint32_t key_hi, void* workspace,
                  cudaStream_t stream);

// out = round(in + scale * z(key, offset + e)), all slots of `dtype`.
cudaError_t perturb(const TensorSlot* slots, size_t num_slots, DType dtype, uint32_t key_lo, uint32_t key_hi,
                    float scale, void* workspace, cudaStream_t stream);

// In place: acc = w - decay*w; acc -= coeffs[q] * z(key_q, .) for q < num_dirs; w = round(acc).
// Weights are read and written once, whatever num_dirs is.
cudaError_t zo_update(const TensorSlot* slots, size_t num_slots, DType dtype, const uint32_t* keys_lo,
                      const uint32_t* keys_hi, const float* coeffs, size_t num_dirs, float decay, void* workspace,
                      cudaStream_t stream);

}  // namespace cuda
}  // namespace hosl
