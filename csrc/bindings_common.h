// What csrc/cpu/bindings.cpp and csrc/cuda/bindings.cpp share: converting torch arguments for the
// plain kernel interfaces, and the Python signatures of the four direction ops. Both extensions
// (hosl._C, hosl._C_cuda) expose the ops with the same signatures, so one Python shim serves both
// (hosl/ops/backends/_compiled.py).
//
// Arguments are validated by hosl.ops (Python) before they get here: contiguous tensors on one
// device of float32/float16/bfloat16, outs matching their inputs, offsets and seeds in range.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

#include "hosl_direction.h"

namespace hosl {
namespace bindings {

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: return DType::kFloat32;
  }
}

// The family code of hosl.directions.spec.FAMILY_CODES as the enum (any code of HOSL_FAMILIES;
// tests/test_family_codes.py keeps the two lists in step).
inline Family family_of(int64_t code) {
  TORCH_CHECK(is_family_code(code), "hosl: unknown direction family code ", code);
  return static_cast<Family>(code);
}

// The sphere factors of the tensors a launch keeps (`keep(tensor)`), laid out [q * kept + k] from
// dir_scales[q * tensors + j]. Empty when dir_scales is (the other families).
template <class Keep>
std::vector<float> kept_scales(const std::vector<at::Tensor>& ins, const std::vector<float>& dir_scales, Keep keep) {
  std::vector<float> kept;
  if (dir_scales.empty() || ins.empty()) return kept;
  const size_t dirs = dir_scales.size() / ins.size();
  for (size_t q = 0; q < dirs; ++q)
    for (size_t j = 0; j < ins.size(); ++j)
      if (keep(ins[j])) kept.push_back(dir_scales[q * ins.size() + j]);
  return kept;
}

// Indices of the non-zero numels: the tensors sq_norms computes (an empty one has norm 0).
inline std::vector<size_t> nonempty(const std::vector<uint64_t>& numels) {
  std::vector<size_t> index;
  for (size_t j = 0; j < numels.size(); ++j)
    if (numels[j] != 0) index.push_back(j);
  return index;
}

using RandnFn = at::Tensor (*)(uint32_t key_lo, uint32_t key_hi, int64_t numel, uint64_t offset,
                               const at::Device& device, int64_t family, float factor);
using PerturbFn = void (*)(const std::vector<at::Tensor>& tensors, const std::vector<at::Tensor>& outs,
                           const std::vector<uint64_t>& offsets, uint32_t key_lo, uint32_t key_hi, float scale,
                           int64_t family, const std::vector<float>& dir_scales);
using ZoUpdateFn = void (*)(const std::vector<at::Tensor>& tensors, const std::vector<uint64_t>& offsets,
                            const std::vector<uint32_t>& keys_lo, const std::vector<uint32_t>& keys_hi,
                            const std::vector<float>& coeffs, float decay, int64_t family,
                            const std::vector<float>& dir_scales);
using SqNormsFn = std::vector<uint64_t> (*)(const std::vector<uint64_t>& numels, const std::vector<uint64_t>& offsets,
                                            uint32_t key_lo, uint32_t key_hi, const at::Device& device);

// The four ops of the backend contract (hosl/ops/backends/__init__.py) on module `m`. family: the
// code of hosl.directions.spec.FAMILY_CODES; dir_scales: the sphere factors, [q * len(tensors) + j],
// empty for the other families.
inline void define_direction_ops(pybind11::module_& m, RandnFn randn, PerturbFn perturb, ZoUpdateFn zo_update,
                                 SqNormsFn sq_norms) {
  namespace py = pybind11;
  m.def("randn", randn, "z(key, offset + e) for e < numel, float32, on `device`", py::arg("key_lo"),
        py::arg("key_hi"), py::arg("numel"), py::arg("offset"), py::arg("device"), py::arg("family") = 0,
        py::arg("factor") = 1.0f);
  m.def("perturb", perturb, "outs[j] = round(tensors[j] + scale * z(key, offsets[j] + e)); outs may be tensors",
        py::arg("tensors"), py::arg("outs"), py::arg("offsets"), py::arg("key_lo"), py::arg("key_hi"),
        py::arg("scale"), py::arg("family") = 0, py::arg("dir_scales") = std::vector<float>{});
  m.def("zo_update", zo_update, "w = round(w - decay*w - sum_q coeffs[q] * z(key_q, offsets[j] + e)), one pass",
        py::arg("tensors"), py::arg("offsets"), py::arg("keys_lo"), py::arg("keys_hi"), py::arg("coeffs"),
        py::arg("decay"), py::arg("family") = 0, py::arg("dir_scales") = std::vector<float>{});
  m.def("sq_norms", sq_norms, "per tensor: sum of floor(float32(z*z) * 2^24) over its Gaussian slice (exact)",
        py::arg("numels"), py::arg("offsets"), py::arg("key_lo"), py::arg("key_hi"), py::arg("device"));
}

}  // namespace bindings
}  // namespace hosl
