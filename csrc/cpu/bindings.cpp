// hosl._C: torch-typed entry points for the CPU direction kernels (direction_cpu.h). Argument
// conversion and the Python signatures are shared with hosl._C_cuda (bindings_common.h); `device`
// is always the CPU here. Nothing is checked again (hosl.ops validated it).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

#include "bindings_common.h"
#include "cpu/direction_cpu.h"

namespace {

using hosl::bindings::dtype_of;
using hosl::bindings::family_of;

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

// The sphere factors of the slots (the non-empty tensors).
std::vector<float> slot_scales(const std::vector<at::Tensor>& ins, const std::vector<float>& dir_scales) {
  return hosl::bindings::kept_scales(ins, dir_scales, [](const at::Tensor& t) { return t.numel() != 0; });
}

at::Tensor randn(uint32_t key_lo, uint32_t key_hi, int64_t numel, uint64_t offset, const at::Device& /*cpu*/,
                 int64_t family, float factor) {
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
  const hosl::Family fam = family_of(family);
  const int threads = at::get_num_threads();
  py::gil_scoped_release no_gil;
  hosl::cpu::perturb(slots.data(), slots.size(), key_lo, key_hi, scale, threads, fam,
                     scales.empty() ? nullptr : scales.data());
}

void zo_update(const std::vector<at::Tensor>& tensors, const std::vector<uint64_t>& offsets,
               const std::vector<uint32_t>& keys_lo, const std::vector<uint32_t>& keys_hi,
               const std::vector<float>& coeffs, float decay, int64_t family, const std::vector<float>& dir_scales) {
  const auto slots = slots_of(tensors, tensors, offsets);
  const auto scales = slot_scales(tensors, dir_scales);
  const hosl::Family fam = family_of(family);
  const int threads = at::get_num_threads();
  py::gil_scoped_release no_gil;
  hosl::cpu::zo_update(slots.data(), slots.size(), keys_lo.data(), keys_hi.data(), coeffs.data(), coeffs.size(),
                       decay, threads, fam, scales.empty() ? nullptr : scales.data());
}

std::vector<uint64_t> sq_norms(const std::vector<uint64_t>& numels, const std::vector<uint64_t>& offsets,
                               uint32_t key_lo, uint32_t key_hi, const at::Device& /*cpu*/) {
  const auto index = hosl::bindings::nonempty(numels);
  std::vector<hosl::cpu::TensorSlot> slots;
  for (size_t j : index) slots.push_back({nullptr, nullptr, numels[j], offsets[j], hosl::DType::kFloat32});
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
  hosl::bindings::define_direction_ops(m, &randn, &perturb, &zo_update, &sq_norms);
  m.def("isa", &hosl::cpu::isa, "the SIMD variant in use: avx512, avx2 or scalar");
  m.def("set_isa", [](const std::string& name) { return hosl::cpu::set_isa(name.c_str()); },
        "use another SIMD variant (for tests); False if this CPU lacks it");
  m.def("force_generic", &hosl::cpu::force_generic, py::arg("on"),
        "True: every family takes the generic path (direction4 of hosl_direction.h, scalar) instead of its SIMD "
        "one (for tests); returns the previous setting");
}
