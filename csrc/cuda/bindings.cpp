// hosl._C_cuda: torch-typed entry points for the CUDA direction kernels (direction_cuda.h).
//
// Arguments are validated by hosl.ops (Python) first: contiguous CUDA tensors on one device, of
// float32/float16/bfloat16. Tensors are grouped by dtype: one kernel launch per dtype present.
// The launch's device table lives in a workspace from torch's caching allocator, on the current
// stream, so it is freed only after the kernel has run.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <vector>

#include "cuda/direction_cuda.h"

namespace {

hosl::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return hosl::DType::kFloat16;
    case at::kBFloat16: return hosl::DType::kBFloat16;
    default: return hosl::DType::kFloat32;
  }
}

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

at::Tensor randn(uint32_t key_lo, uint32_t key_hi, int64_t numel, uint64_t offset, const at::Device& device) {
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor out = at::empty({numel}, at::TensorOptions().dtype(at::kFloat).device(device));
  if (numel == 0) return out;
  const hosl::cuda::TensorSlot slot{nullptr, out.data_ptr(), static_cast<uint64_t>(numel), offset};
  at::Tensor ws = workspace(out, 1, 1);
  check(hosl::cuda::randn(&slot, 1, key_lo, key_hi, ws.data_ptr(), at::cuda::getCurrentCUDAStream()));
  return out;
}

void perturb(const std::vector<at::Tensor>& tensors, const std::vector<at::Tensor>& outs,
             const std::vector<uint64_t>& offsets, uint32_t key_lo, uint32_t key_hi, float scale) {
  if (tensors.empty()) return;
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (hosl::DType dtype : {hosl::DType::kFloat32, hosl::DType::kFloat16, hosl::DType::kBFloat16}) {
    const auto slots = slots_of(tensors, outs, offsets, dtype);
    if (slots.empty()) continue;
    at::Tensor ws = workspace(tensors[0], slots.size(), 1);
    check(hosl::cuda::perturb(slots.data(), slots.size(), dtype, key_lo, key_hi, scale, ws.data_ptr(), stream));
  }
}

void zo_update(const std::vector<at::Tensor>& tensors, const std::vector<uint64_t>& offsets,
               const std::vector<uint32_t>& keys_lo, const std::vector<uint32_t>& keys_hi,
               const std::vector<float>& coeffs, float decay) {
  if (tensors.empty()) return;
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (hosl::DType dtype : {hosl::DType::kFloat32, hosl::DType::kFloat16, hosl::DType::kBFloat16}) {
    const auto slots = slots_of(tensors, tensors, offsets, dtype);
    if (slots.empty()) continue;
    at::Tensor ws = workspace(tensors[0], slots.size(), coeffs.size());
    check(hosl::cuda::zo_update(slots.data(), slots.size(), dtype, keys_lo.data(), keys_hi.data(), coeffs.data(),
                                coeffs.size(), decay, ws.data_ptr(), stream));
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hosl CUDA direction kernels (see hosl/ops/backends/__init__.py for the contract)";
  m.def("randn", &randn, "z(key, offset + e) for e < numel, float32, on `device`", py::arg("key_lo"),
        py::arg("key_hi"), py::arg("numel"), py::arg("offset"), py::arg("device"));
  m.def("perturb", &perturb, "outs[j] = round(tensors[j] + scale * z(key, offsets[j] + e)); one launch per dtype",
        py::arg("tensors"), py::arg("outs"), py::arg("offsets"), py::arg("key_lo"), py::arg("key_hi"),
        py::arg("scale"));
  m.def("zo_update", &zo_update,
        "w = round(w - decay*w - sum_q coeffs[q] * z(key_q, offsets[j] + e)); one pass, one launch per dtype",
        py::arg("tensors"), py::arg("offsets"), py::arg("keys_lo"), py::arg("keys_hi"), py::arg("coeffs"),
        py::arg("decay"));
}
