// hosl._C: torch-typed entry points for the CPU direction kernels (direction_cpu.h).
//
// Arguments are validated by hosl.ops (Python) before they reach this file: tensors are
// contiguous CPU tensors of float32/float16/bfloat16, outs match their inputs, offsets and seeds
// are in range. Nothing here checks again.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

#include "cpu/direction_cpu.h"

namespace {

hosl::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return hosl::DType::kFloat16;
    case at::kBFloat16: return hosl::DType::kBFloat16;
    default: return hosl::DType::kFloat32;
  }
}

std::vector<hosl::cpu::TensorSlot> slots_of(const std::vector<at::Tensor>& ins, const std::vector<at::Tensor>& outs,
                                            const std::vector<uint64_t>& offsets) {
  std::vector<hosl::cpu::TensorSlot> slots;
  slots.reserve(ins.size());
  for (size_t j = 0; j < ins.size(); ++j) {
    if (ins[j].numel() == 0) continue;
    slots.push_back({ins[j].data_ptr(), outs[j].data_ptr(), static_cast<uint64_t>(ins[j].numel()), offsets[j],
                     dtype_of(ins[j])});
  }
  return slots;
}

hosl::Family family_of(int64_t code) { return static_cast<hosl::Family>(code); }

// The sphere factors of the non-empty tensors (the slots), [q * slots + j'] from [q * tensors + j].
std::vector<float> slot_scales(const std::vector<at::Tensor>& ins, const std::vector<float>& dir_scales) {
  std::vector<float> kept;
  if (dir_scales.empty() || ins.empty()) return kept;
  const size_t dirs = dir_scales.size() / ins.size();
  for (size_t q = 0; q < dirs; ++q)
    for (size_t j = 0; j < ins.size(); ++j)
      if (ins[j].numel() != 0) kept.push_back(dir_scales[q * ins.size() + j]);
  return kept;
}

at::Tensor randn(uint32_t key_lo, uint32_t key_hi, int64_t numel, uint64_t offset, int64_t family, float factor) {
  at::Tensor out = at::empty({numel}, at::TensorOptions().dtype(at::kFloat));
  if (numel > 0) {
    const int threads = at::get_num_threads();
    py::gil_scoped_release no_gil;
    hosl::cpu::randn(key_lo, key_hi, offset, static_cast<uint64_t>(numel), out.data_ptr<float>(), threads,
                     family_of(family), factor);
  }
  return out;
}

void perturb(const std::vector<at::Tensor>& tensors, const std::vector<at::Tensor>& outs,
             const std::vector<uint64_t>& offsets, uint32_t key_lo, uint32_t key_hi, float scale, int64_t family,
             const std::vector<float>& dir_scales) {
  const auto slots = slots_of(tensors, outs, offsets);
  const auto scales = slot_scales(tensors, dir_scales);
  const int threads = at::get_num_threads();
  py::gil_scoped_release no_gil;
  hosl::cpu::perturb(slots.data(), slots.size(), key_lo, key_hi, scale, threads, family_of(family),
                     scales.empty() ? nullptr : scales.data());
}

void zo_update(const std::vector<at::Tensor>& tensors, const std::vector<uint64_t>& offsets,
               const std::vector<uint32_t>& keys_lo, const std::vector<uint32_t>& keys_hi,
               const std::vector<float>& coeffs, float decay, int64_t family, const std::vector<float>& dir_scales) {
  const auto slots = slots_of(tensors, tensors, offsets);
  const auto scales = slot_scales(tensors, dir_scales);
  const int threads = at::get_num_threads();
  py::gil_scoped_release no_gil;
  hosl::cpu::zo_update(slots.data(), slots.size(), keys_lo.data(), keys_hi.data(), coeffs.data(), coeffs.size(),
                       decay, threads, family_of(family), scales.empty() ? nullptr : scales.data());
}

std::vector<uint64_t> sq_norms(const std::vector<uint64_t>& numels, const std::vector<uint64_t>& offsets,
                               uint32_t key_lo, uint32_t key_hi) {
  std::vector<hosl::cpu::TensorSlot> slots;
  std::vector<size_t> index;  // tensor of each slot (empty tensors have norm 0 and no slot)
  for (size_t j = 0; j < numels.size(); ++j) {
    if (numels[j] == 0) continue;
    slots.push_back({nullptr, nullptr, numels[j], offsets[j], hosl::DType::kFloat32});
    index.push_back(j);
  }
  std::vector<uint64_t> slot_sums(slots.size()), out(numels.size(), 0);
  const int threads = at::get_num_threads();
  {
    py::gil_scoped_release no_gil;
    hosl::cpu::sq_norms(slots.data(), slots.size(), key_lo, key_hi, slot_sums.data(), threads);
  }
  for (size_t k = 0; k < slots.size(); ++k) out[index[k]] = slot_sums[k];
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hosl CPU direction kernels (see hosl/ops/backends/__init__.py for the contract)";
  // family: 0 gaussian, 1 rademacher, 2 sphere (hosl::Family); dir_scales: the sphere factors,
  // [q * len(tensors) + j], empty for the other families.
  m.def("randn", &randn, "z(key, offset + e) for e < numel, float32", py::arg("key_lo"), py::arg("key_hi"),
        py::arg("numel"), py::arg("offset"), py::arg("family") = 0, py::arg("factor") = 1.0f);
  m.def("perturb", &perturb, "outs[j] = round(tensors[j] + scale * z(key, offsets[j] + e))", py::arg("tensors"),
        py::arg("outs"), py::arg("offsets"), py::arg("key_lo"), py::arg("key_hi"), py::arg("scale"),
        py::arg("family") = 0, py::arg("dir_scales") = std::vector<float>{});
  m.def("zo_update", &zo_update, "w = round(w - decay*w - sum_q coeffs[q] * z(key_q, offsets[j] + e)), one pass",
        py::arg("tensors"), py::arg("offsets"), py::arg("keys_lo"), py::arg("keys_hi"), py::arg("coeffs"),
        py::arg("decay"), py::arg("family") = 0, py::arg("dir_scales") = std::vector<float>{});
  m.def("sq_norms", &sq_norms, "per tensor: sum of floor(float32(z*z) * 2^24) over its Gaussian slice (exact)",
        py::arg("numels"), py::arg("offsets"), py::arg("key_lo"), py::arg("key_hi"));
  m.def("isa", &hosl::cpu::isa, "the SIMD variant in use: avx512, avx2 or scalar");
  m.def("set_isa", [](const std::string& name) { return hosl::cpu::set_isa(name.c_str()); },
        "use another SIMD variant (for tests); False if this CPU lacks it");
}
