// hosl._C_cuda: torch-typed entry points for the CUDA direction kernels (direction_cuda.h).
// Argument conversion and the Python signatures are shared with hosl._C (bindings_common.h).
//
// Tensors are grouped by dtype: one kernel launch per dtype present. The launch's device table
// lives in a workspace from torch's caching allocator, on the current stream, so it is freed only
// after the kernel has run.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <vector>

#include "bindings_common.h"
#include "cuda/direction_cuda.h"

namespace {

using hosl::bindings::dtype_of;
using hosl::bindings::family_of;

constexpr hosl::DType kDTypes[] = {hosl::DType::kFloat32, hosl::DType::kFloat16, hosl::DType::kBFloat16};

void check(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "hosl CUDA kernel: ", cudaGetErrorString(err)); }

at::Tensor workspace(const at::Tensor& like, size_t num_slots, size_t num_dirs) {
  const auto bytes = static_cast<int64_t>(hosl::cuda::workspace_bytes(num_slots, num_dirs));
  return at::empty({bytes}, like.options().dtype(at::kByte));
}

// The slots of one dtype, in list order.
std::vector<hosl::cuda::TensorSlot> slots_of(const std::vector<at::Tensor>& ins, const std::vector<at::Tensor>& outs,
                                             const std::vector<uint64_t>& offsets, hosl::DType dtype) {
  std::vector<hosl::cuda::TensorSlot> slots;
  for (size_t j = 0; j < ins.size(); ++j) {
    if (ins[j].numel() == 0 || dtype_of(ins[j]) != dtype) continue;
    slots.push_back({ins[j].data_ptr(), outs[j].data_ptr(), static_cast<uint64_t>(ins[j].numel()), offsets[j]});
  }
  return slots;
}

// The sphere factors of slots_of(ins, ., ., dtype).
std::vector<float> scales_of(const std::vector<at::Tensor>& ins, const std::vector<float>& dir_scales,
                             hosl::DType dtype) {
  return hosl::bindings::kept_scales(
      ins, dir_scales, [dtype](const at::Tensor& t) { return t.numel() != 0 && dtype_of(t) == dtype; });
}

at::Tensor randn(uint32_t key_lo, uint32_t key_hi, int64_t numel, uint64_t offset, const at::Device& device,
                 int64_t family, float factor) {
  const hosl::Family fam = family_of(family);
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor out = at::empty({numel}, at::TensorOptions().dtype(at::kFloat).device(device));
  if (numel == 0) return out;
  const hosl::cuda::TensorSlot slot{nullptr, out.data_ptr(), static_cast<uint64_t>(numel), offset};
  at::Tensor ws = workspace(out, 1, 1);
  check(hosl::cuda::randn(&slot, 1, key_lo, key_hi, ws.data_ptr(), at::cuda::getCurrentCUDAStream(), fam, factor));
  return out;
}

void perturb(const std::vector<at::Tensor>& tensors, const std::vector<at::Tensor>& outs,
             const std::vector<uint64_t>& offsets, uint32_t key_lo, uint32_t key_hi, float scale, int64_t family,
             const std::vector<float>& dir_scales) {
  if (tensors.empty()) return;
  const hosl::Family fam = family_of(family);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (hosl::DType dtype : kDTypes) {
    const auto slots = slots_of(tensors, outs, offsets, dtype);
    if (slots.empty()) continue;
    const auto scales = scales_of(tensors, dir_scales, dtype);
    at::Tensor ws = workspace(tensors[0], slots.size(), 1);
    check(hosl::cuda::perturb(slots.data(), slots.size(), dtype, key_lo, key_hi, scale, ws.data_ptr(), stream, fam,
                              scales.empty() ? nullptr : scales.data()));
  }
}

void zo_update(const std::vector<at::Tensor>& tensors, const std::vector<uint64_t>& offsets,
               const std::vector<uint32_t>& keys_lo, const std::vector<uint32_t>& keys_hi,
               const std::vector<float>& coeffs, float decay, int64_t family, const std::vector<float>& dir_scales) {
  if (tensors.empty()) return;
  const hosl::Family fam = family_of(family);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (hosl::DType dtype : kDTypes) {
    const auto slots = slots_of(tensors, tensors, offsets, dtype);
    if (slots.empty()) continue;
    const auto scales = scales_of(tensors, dir_scales, dtype);
    at::Tensor ws = workspace(tensors[0], slots.size(), coeffs.size());
    check(hosl::cuda::zo_update(slots.data(), slots.size(), dtype, keys_lo.data(), keys_hi.data(), coeffs.data(),
                                coeffs.size(), decay, ws.data_ptr(), stream, fam,
                                scales.empty() ? nullptr : scales.data()));
  }
}

std::vector<uint64_t> sq_norms(const std::vector<uint64_t>& numels, const std::vector<uint64_t>& offsets,
                               uint32_t key_lo, uint32_t key_hi, const at::Device& device) {
  const auto index = hosl::bindings::nonempty(numels);
  std::vector<uint64_t> out(numels.size(), 0);
  if (index.empty()) return out;
  std::vector<hosl::cuda::TensorSlot> slots;
  for (size_t j : index) slots.push_back({nullptr, nullptr, numels[j], offsets[j]});
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor sums = at::zeros({static_cast<int64_t>(slots.size())}, at::TensorOptions().dtype(at::kLong).device(device));
  at::Tensor ws = workspace(sums, slots.size(), 1);
  check(hosl::cuda::sq_norms(slots.data(), slots.size(), key_lo, key_hi,
                             reinterpret_cast<unsigned long long*>(sums.data_ptr<int64_t>()), ws.data_ptr(),
                             at::cuda::getCurrentCUDAStream()));
  const at::Tensor host = sums.cpu();  // synchronises
  for (size_t k = 0; k < slots.size(); ++k) out[index[k]] = static_cast<uint64_t>(host.data_ptr<int64_t>()[k]);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hosl CUDA direction kernels, one launch per dtype (see hosl/ops/backends/__init__.py for the contract)";
  hosl::bindings::define_direction_ops(m, &randn, &perturb, &zo_update, &sq_norms);
}
