// CUDA direction kernels (interface: direction_cuda.h; element math: hosl_direction.h).
//
// Work layout: each tensor's coordinates are covered by Philox counters (4 coordinates each);
// a "chunk" is kCountersPerChunk consecutive counters of one tensor, aligned in coordinate space.
// Each block of the grid takes chunks (grid-stride), finds their tensor by binary search in the
// device table, and each thread does one counter at a time: four normals, four elements.
// zo_update loops over all Q directions per counter with a float32 accumulator, so the weights
// are read and written once.
// Families: a thread's four coordinates are direction4<family> of its counter (hosl_direction.h,
// the definition shared with the CPU); the kernel is instantiated for every family of
// HOSL_FAMILIES (launch_family below), so this file names no family except the Gaussian sq_norms
// and Rademacher, whose randn/perturb/zo_update take a warp pass of their own (rademacher_span).
// Rademacher: one Philox call gives the signs of 128 coordinates, so direction4 (one call per 4
// coordinates) would make the 32 lanes of a warp each recompute the same counter. Instead a warp
// covers 8 counters (1024 coordinates, chunks of kRademacherChunkCoords per block): each lane
// computes one Philox call and keeps one word (32 coordinates' signs), and the lanes that need a
// word read it with one __shfl_sync per step (rademacher_lane_word and the helpers beside it in
// hosl_direction.h; tests/test_cuda_rademacher_layout.py runs that arithmetic on the host). That is
// one Philox call per 32 coordinates instead of one per 4 (the 2026-11-30 H200 run, with the
// latter, reached 15% of the copy roof on the Rademacher update: docs/results.md, "GPU"; the new
// pass is to be timed on the next GPU run, scripts/gpu_check.sh stages "rademacher" and "kernels").
// The per-tensor factor (sphere) is passed to direction4 whenever the host gave factors; sq_norms
// reduces sphere_sq_term per warp and adds it atomically (integers: exact in any order).
//
// Build with nvcc -fmad=false --prec-div=true --prec-sqrt=true; the math also uses explicit
// __f*_rn intrinsics, which nvcc never contracts into FMAs (.ci/check_cuda.sh checks the PTX).
#include "cuda/direction_cuda.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace hosl {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr uint64_t kCountersPerChunk = 4 * kThreads;       // 4096 coordinates per chunk
constexpr uint64_t kChunkCoords = 4 * kCountersPerChunk;
constexpr unsigned kMaxGrid = 1u << 20;                    // blocks beyond this loop (grid-stride)
constexpr unsigned kWarpSize = 32;
// Rademacher's randn/perturb/zo_update: each warp of a block covers kRademacherWarpCounters
// counters of 128 coordinates: 8 warps x 1024 = 8192 coordinates per chunk.
constexpr uint64_t kRademacherChunkCoords =
    (kThreads / kWarpSize) * kRademacherWarpCounters * (uint64_t{1} << kRademacherShift);

// The device table: one entry per tensor, then the directions' keys and coefficients.
struct DeviceSlot {
  const void* in;
  void* out;
  uint64_t first;       // first coordinate (the tensor's offset)
  uint64_t last;        // last coordinate, inclusive
  uint64_t first_chunk; // global index of the tensor's first chunk
};

struct Table {
  const DeviceSlot* slots;
  const uint32_t* keys_lo;
  const uint32_t* keys_hi;
  const float* coeffs;
  const float* dir_scales;  // per-tensor factors (sphere): [slot * num_dirs + q]; nullptr: none (1.0f)
  unsigned long long* sums; // sq_norms: one per slot
  int num_slots;
  int num_dirs;
  uint64_t num_chunks;
};

enum class Op { kRandn, kPerturb, kUpdate, kSqNorm };

// Whether an op of a family runs the Rademacher warp pass, and its chunk size in coordinates.
__host__ __device__ constexpr bool warp_rademacher(Family family, Op op) {
  return family == Family::kRademacher && op != Op::kSqNorm;
}
__host__ __device__ constexpr uint64_t chunk_coords(Family family, Op op) {
  return warp_rademacher(family, op) ? kRademacherChunkCoords : kChunkCoords;
}

size_t align_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

__device__ __forceinline__ int find_slot(const Table& t, uint64_t chunk) {
  int lo = 0, hi = t.num_slots - 1;  // the last slot whose first_chunk <= chunk
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (t.slots[mid].first_chunk <= chunk) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Rademacher randn/perturb/zo_update over the chunk at coordinate `window` (kRademacherChunkCoords
// long): warp w covers counters window / 128 + 8 w .. + 7, one Philox call per lane (per direction),
// its word shared by shuffles (hosl_direction.h, rademacher_lane_word). Every lane of a warp reaches
// each __shfl_sync: the only early return depends on the warp's span, not on the lane.
template <class S, Op kOp>
__device__ __forceinline__ void rademacher_span(const Table& t, const DeviceSlot& s, uint64_t window, float scale,
                                                float decay) {
  using T = typename S::T;
  constexpr uint32_t kSteps = kRademacherWarpCounters;
  const uint32_t lane = threadIdx.x % kWarpSize;
  const uint64_t first = (window >> kRademacherShift) + (threadIdx.x / kWarpSize) * kSteps;
  const uint64_t span_lo = first << kRademacherShift;
  const uint64_t span_hi = span_lo + (uint64_t{kSteps} << kRademacherShift) - 1;
  if (span_hi < s.first || span_lo > s.last) return;
  const uint32_t bit0 = rademacher_lane_bit(lane);
  if (kOp == Op::kUpdate) {
    T* w = static_cast<T*>(s.out);
    float acc[kSteps][4];
#pragma unroll
    for (uint32_t j = 0; j < kSteps; ++j) {
      const uint64_t coord0 = rademacher_lane_coord(first, lane, j);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint64_t c = coord0 + i;
        acc[j][i] = (c >= s.first && c <= s.last) ? update_start(S::load(w[c - s.first]), decay) : 0.0f;
      }
    }
    for (int q = 0; q < t.num_dirs; ++q) {
      const uint32_t word = rademacher_lane_word(first, lane, t.keys_lo[q], t.keys_hi[q]);
      const float coeff = t.coeffs[q];
#pragma unroll
      for (uint32_t j = 0; j < kSteps; ++j) {
        const uint32_t signs = __shfl_sync(0xFFFFFFFFu, word, rademacher_source_lane(lane, j));
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[j][i] = update_step(acc[j][i], coeff, rademacher_from_word(signs, bit0 + i));
      }
    }
#pragma unroll
    for (uint32_t j = 0; j < kSteps; ++j) {
      const uint64_t coord0 = rademacher_lane_coord(first, lane, j);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint64_t c = coord0 + i;
        if (c >= s.first && c <= s.last) w[c - s.first] = S::store(acc[j][i]);
      }
    }
    return;
  }
  const uint32_t word = rademacher_lane_word(first, lane, t.keys_lo[0], t.keys_hi[0]);
#pragma unroll
  for (uint32_t j = 0; j < kSteps; ++j) {
    const uint32_t signs = __shfl_sync(0xFFFFFFFFu, word, rademacher_source_lane(lane, j));
    const uint64_t coord0 = rademacher_lane_coord(first, lane, j);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint64_t c = coord0 + i;
      if (c < s.first || c > s.last) continue;
      const uint64_t e = c - s.first;
      const float z = rademacher_from_word(signs, bit0 + i);
      if (kOp == Op::kRandn) {
        static_cast<float*>(s.out)[e] = z;
      } else {
        static_cast<T*>(s.out)[e] = S::store(perturb_element(S::load(static_cast<const T*>(s.in)[e]), scale, z));
      }
    }
  }
}

template <class S, Op kOp, Family kFam>
__global__ void __launch_bounds__(kThreads) direction_kernel(Table t, float scale, float decay) {
  using T = typename S::T;
  constexpr uint64_t kCoords = chunk_coords(kFam, kOp);
  for (uint64_t chunk = blockIdx.x; chunk < t.num_chunks; chunk += gridDim.x) {
    const int slot = find_slot(t, chunk);
    const DeviceSlot s = t.slots[slot];
    const uint64_t window = (s.first / kCoords + (chunk - s.first_chunk)) * kCoords;
    if constexpr (warp_rademacher(kFam, kOp)) {
      rademacher_span<S, kOp>(t, s, window, scale, decay);
    } else {
      for (uint64_t k = threadIdx.x; k < kCountersPerChunk; k += kThreads) {
        const uint64_t counter = window / 4 + k;
        const uint64_t coord0 = counter * 4;
        if (kOp == Op::kSqNorm) {  // every lane reaches the warp reduction
          unsigned long long sum = 0;
          if (coord0 + 3 >= s.first && coord0 <= s.last) {
            float z[4];
            direction4<Family::kGaussian>(counter, t.keys_lo[0], t.keys_hi[0], 1.0f, z);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              const uint64_t i = coord0 + j;
              if (i >= s.first && i <= s.last) sum += sphere_sq_term(z[j]);
            }
          }
#pragma unroll
          for (int lane_step = 16; lane_step > 0; lane_step >>= 1) sum += __shfl_down_sync(0xFFFFFFFFu, sum, lane_step);
          if ((threadIdx.x & 31) == 0 && sum) atomicAdd(t.sums + slot, sum);
          continue;
        }
        if (coord0 + 3 < s.first || coord0 > s.last) continue;
        if (kOp == Op::kUpdate) {
          float acc[4];
          T* w = static_cast<T*>(s.out);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const uint64_t i = coord0 + j;
            acc[j] = (i >= s.first && i <= s.last) ? update_start(S::load(w[i - s.first]), decay) : 0.0f;
          }
          for (int q = 0; q < t.num_dirs; ++q) {
            float z[4];
            const float factor = t.dir_scales ? t.dir_scales[slot * t.num_dirs + q] : 1.0f;
            direction4<kFam>(counter, t.keys_lo[q], t.keys_hi[q], factor, z);
            const float c = t.coeffs[q];
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[j] = update_step(acc[j], c, z[j]);
          }
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const uint64_t i = coord0 + j;
            if (i >= s.first && i <= s.last) w[i - s.first] = S::store(acc[j]);
          }
        } else {
          float z[4];
          const float factor = t.dir_scales ? t.dir_scales[slot] : 1.0f;
          direction4<kFam>(counter, t.keys_lo[0], t.keys_hi[0], factor, z);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const uint64_t i = coord0 + j;
            if (i < s.first || i > s.last) continue;
            const uint64_t e = i - s.first;
            if (kOp == Op::kRandn) {
              static_cast<float*>(s.out)[e] = z[j];
            } else {
              const float v = perturb_element(S::load(static_cast<const T*>(s.in)[e]), scale, z[j]);
              static_cast<T*>(s.out)[e] = S::store(v);
            }
          }
        }
      }
    }
  }
}

// One kernel instantiation per family of HOSL_FAMILIES (hosl_direction.h): no case to add here.
template <class S, Op kOp>
void launch_family(Family family, unsigned grid, cudaStream_t stream, const Table& t, float scale, float decay) {
  switch (family) {
#define HOSL_LAUNCH_FAMILY(name, code)                                                          \
  case Family::name:                                                                            \
    direction_kernel<S, kOp, Family::name><<<grid, kThreads, 0, stream>>>(t, scale, decay); \
    break;
    HOSL_FAMILIES(HOSL_LAUNCH_FAMILY)
#undef HOSL_LAUNCH_FAMILY
  }
}

// Pack the table on the host, copy it to `workspace`, launch one kernel.
template <Op kOp>
cudaError_t launch(const TensorSlot* slots, size_t num_slots, DType dtype, const uint32_t* keys_lo,
                   const uint32_t* keys_hi, const float* coeffs, size_t num_dirs, float scale, float decay,
                   void* workspace, cudaStream_t stream, Family family = Family::kGaussian,
                   const float* dir_scales = nullptr, unsigned long long* sums = nullptr) {
  std::vector<DeviceSlot> table;
  std::vector<float> factors;  // per-tensor factors (sphere), if any: [kept slot * num_dirs + q]
  table.reserve(num_slots);
  uint64_t chunks = 0;
  const uint64_t chunk = chunk_coords(family, kOp);  // the kernel's (direction_kernel's kCoords)
  for (size_t j = 0; j < num_slots; ++j) {
    if (slots[j].numel == 0) continue;
    const uint64_t first = slots[j].offset, last = slots[j].offset + (slots[j].numel - 1);
    table.push_back({slots[j].in, slots[j].out, first, last, chunks});
    chunks += last / chunk - first / chunk + 1;
    if (dir_scales)
      for (size_t q = 0; q < num_dirs; ++q) factors.push_back(dir_scales[q * num_slots + j]);
  }
  if (table.empty()) return cudaSuccess;

  const size_t slots_bytes = align_up(table.size() * sizeof(DeviceSlot), 16);
  const size_t dirs_bytes = align_up(num_dirs * sizeof(uint32_t), 16);
  std::vector<unsigned char> packed(slots_bytes + 3 * dirs_bytes + factors.size() * sizeof(float));
  std::memcpy(packed.data(), table.data(), table.size() * sizeof(DeviceSlot));
  if (num_dirs) {
    std::memcpy(packed.data() + slots_bytes, keys_lo, num_dirs * sizeof(uint32_t));
    std::memcpy(packed.data() + slots_bytes + dirs_bytes, keys_hi, num_dirs * sizeof(uint32_t));
    std::memcpy(packed.data() + slots_bytes + 2 * dirs_bytes, coeffs, num_dirs * sizeof(float));
  }
  if (!factors.empty())
    std::memcpy(packed.data() + slots_bytes + 3 * dirs_bytes, factors.data(), factors.size() * sizeof(float));
  // From pageable memory: returns once the bytes are staged, so `packed` may die after it.
  cudaError_t err = cudaMemcpyAsync(workspace, packed.data(), packed.size(), cudaMemcpyHostToDevice, stream);
  if (err != cudaSuccess) return err;

  unsigned char* base = static_cast<unsigned char*>(workspace);
  Table t;
  t.slots = reinterpret_cast<const DeviceSlot*>(base);
  t.keys_lo = reinterpret_cast<const uint32_t*>(base + slots_bytes);
  t.keys_hi = reinterpret_cast<const uint32_t*>(base + slots_bytes + dirs_bytes);
  t.coeffs = reinterpret_cast<const float*>(base + slots_bytes + 2 * dirs_bytes);
  t.dir_scales = factors.empty() ? nullptr : reinterpret_cast<const float*>(base + slots_bytes + 3 * dirs_bytes);
  t.sums = sums;
  t.num_slots = static_cast<int>(table.size());
  t.num_dirs = static_cast<int>(num_dirs);
  t.num_chunks = chunks;

  const unsigned grid = static_cast<unsigned>(std::min<uint64_t>(chunks, kMaxGrid));
  if (kOp == Op::kSqNorm) {  // dtype-free: only coordinates are read
    direction_kernel<Float32Storage, Op::kSqNorm, Family::kGaussian><<<grid, kThreads, 0, stream>>>(t, scale, decay);
    return cudaGetLastError();
  }
  switch (dtype) {
    case DType::kFloat32: launch_family<Float32Storage, kOp>(family, grid, stream, t, scale, decay); break;
    case DType::kFloat16: launch_family<Float16Storage, kOp>(family, grid, stream, t, scale, decay); break;
    case DType::kBFloat16: launch_family<BFloat16Storage, kOp>(family, grid, stream, t, scale, decay); break;
  }
  return cudaGetLastError();
}

}  // namespace

size_t workspace_bytes(size_t num_slots, size_t num_dirs) {
  const size_t dirs = num_dirs ? num_dirs : 1;
  return align_up(num_slots * sizeof(DeviceSlot), 16) + 3 * align_up(dirs * sizeof(uint32_t), 16) +
         num_slots * dirs * sizeof(float);
}

cudaError_t randn(const TensorSlot* slots, size_t num_slots, uint32_t key_lo, uint32_t key_hi, void* workspace,
                  cudaStream_t stream, Family family, float factor) {
  const float one = 1.0f;
  std::vector<float> factors(num_slots, factor);
  return launch<Op::kRandn>(slots, num_slots, DType::kFloat32, &key_lo, &key_hi, &one, 1, 0.0f, 0.0f, workspace,
                            stream, family, factors.data());
}

cudaError_t perturb(const TensorSlot* slots, size_t num_slots, DType dtype, uint32_t key_lo, uint32_t key_hi,
                    float scale, void* workspace, cudaStream_t stream, Family family, const float* dir_scales) {
  return launch<Op::kPerturb>(slots, num_slots, dtype, &key_lo, &key_hi, &scale, 1, scale, 0.0f, workspace, stream,
                              family, dir_scales);
}

cudaError_t zo_update(const TensorSlot* slots, size_t num_slots, DType dtype, const uint32_t* keys_lo,
                      const uint32_t* keys_hi, const float* coeffs, size_t num_dirs, float decay, void* workspace,
                      cudaStream_t stream, Family family, const float* dir_scales) {
  return launch<Op::kUpdate>(slots, num_slots, dtype, keys_lo, keys_hi, coeffs, num_dirs, 0.0f, decay, workspace,
                             stream, family, dir_scales);
}

cudaError_t sq_norms(const TensorSlot* slots, size_t num_slots, uint32_t key_lo, uint32_t key_hi,
                     unsigned long long* out, void* workspace, cudaStream_t stream) {
  const float one = 1.0f;
  return launch<Op::kSqNorm>(slots, num_slots, DType::kFloat32, &key_lo, &key_hi, &one, 1, 0.0f, 0.0f, workspace,
                             stream, Family::kGaussian, nullptr, out);
}

}  // namespace cuda
}  // namespace hosl
