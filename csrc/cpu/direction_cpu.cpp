// CPU direction kernels: OpenMP over chunks of coordinates, SIMD inside a chunk.
//
// Shape of the work (same for every op):
//   * Coordinates are cut into chunks of kChunk (the OpenMP work items) and tiles of kTile (the
//     unit that fits in L1), both aligned in coordinate space, so an interior tile needs exactly
//     kTile/4 Philox counters.
//   * Per tile: (1) Philox4x32-10 for the tile's counters into four word arrays (SIMD intrinsics:
//     GCC vectorises the 32x32->64-bit multiply badly on its own); (2) the float part of the spec
//     (hosl_direction.h, auto-vectorised in every variant: 8 floats wide under AVX2, 16 under
//     AVX-512, 4 in the SSE2 baseline; it stays so only while that code has no conditional float
//     operation, see hosl_direction.h) into a float buffer of normals; (3) a per-dtype loop
//     that combines the normals with the weights and stores.
//   * zo_update keeps a float32 accumulator per tile and adds all Q directions to it before the
//     single store, so weights are read and written once whatever Q is.
//   * Families: Gaussian is steps (1)-(2); Rademacher replaces them by expanding the bits of
//     kTile/128 counters into +-1.0f (one Philox call per 128 coordinates: the ops become
//     memory-bound); sphere is the Gaussian tile times the slot's factor; sq_norms sums
//     sphere_sq_term over a chunk in uint64. Any other family of HOSL_FAMILIES (hosl_direction.h)
//     takes the generic path: direction4<family> of hosl_direction.h per group of 4 coordinates,
//     scalar code that the compiler vectorises as it can (correct, slower: about 1.7x for the
//     Gaussian family forced through it, 5x for Rademacher), until someone gives it a SIMD path in
//     Tiles::direction.
//     force_generic(true) sends every family down that path (tests compare it to the SIMD ones).
//
// SIMD variants (AVX-512, AVX2, baseline) are the same template compiled under different GCC
// `target` attributes (no target_clones: the pick below is by hand, once at load time from the CPU,
// so HOSL_CPU_ISA and set_isa can lower it); never baked in with -march=native. Requires -ffp-contract=off (no FMA
// contraction: the spec's bits) and -fno-math-errno (so sqrtf vectorises).
#include "cpu/direction_cpu.h"

#include <omp.h>

// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own _mm512_undefined_* helpers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HOSL_X86 1
#else
#define HOSL_X86 0
#endif

namespace hosl {
namespace cpu {
namespace {

constexpr uint64_t kTile = 1024;         // coordinates per tile (multiple of 64)
constexpr uint64_t kChunk = 16 * kTile;  // coordinates per OpenMP work item
constexpr size_t kTileCounters = kTile / 4;

// Philox words of counters first .. first+count-1 (count a multiple of 16) into x0..x3.
using PhiloxFillFn = void (*)(uint64_t first, size_t count, uint32_t k0, uint32_t k1, uint32_t* x0, uint32_t* x1,
                              uint32_t* x2, uint32_t* x3);

void philox_fill_scalar(uint64_t first, size_t count, uint32_t k0, uint32_t k1, uint32_t* x0, uint32_t* x1,
                        uint32_t* x2, uint32_t* x3) {
  for (size_t k = 0; k < count; ++k) {
    const Philox4 w = philox4x32_10(first + k, k0, k1);
    x0[k] = w.x0;
    x1[k] = w.x1;
    x2[k] = w.x2;
    x3[k] = w.x3;
  }
}

#if HOSL_X86
#define HOSL_TARGET_AVX2 __attribute__((target("avx2")))
#define HOSL_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,prefer-vector-width=512")))

// AVX2: the 64-bit-lane form described at philox_fill_avx512 below, 4 counters per register.
HOSL_TARGET_AVX2 inline __m256i xor3_avx2(__m256i a, __m256i b, __m256i c) {
  return _mm256_xor_si256(_mm256_xor_si256(a, b), c);
}

// The low 32-bit halves of a's and b's 4 lanes, as 8 words.
HOSL_TARGET_AVX2 inline __m256i pack_low_halves_avx2(__m256i a, __m256i b) {
  const __m256i idx = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  const __m256i a_low = _mm256_permutevar8x32_epi32(a, idx);  // a's low halves in the lower 128 bits
  const __m256i b_low = _mm256_permutevar8x32_epi32(b, idx);
  return _mm256_permute2x128_si256(a_low, b_low, 0x20);
}

HOSL_TARGET_AVX2 void philox_fill_avx2(uint64_t first, size_t count, uint32_t k0, uint32_t k1, uint32_t* x0,
                                       uint32_t* x1, uint32_t* x2, uint32_t* x3) {
  __m256i round_k0[kPhiloxRounds], round_k1[kPhiloxRounds];
  for (int r = 0; r < kPhiloxRounds; ++r) {
    round_k0[r] = _mm256_set1_epi32(static_cast<int>(k0 + static_cast<uint32_t>(r) * kPhiloxW0));
    round_k1[r] = _mm256_set1_epi32(static_cast<int>(k1 + static_cast<uint32_t>(r) * kPhiloxW1));
  }
  const __m256i iota_a = _mm256_setr_epi64x(0, 1, 2, 3);
  const __m256i iota_b = _mm256_setr_epi64x(4, 5, 6, 7);
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0);
  const __m256i m1 = _mm256_set1_epi64x(kPhiloxM1);
  for (size_t k = 0; k < count; k += 8) {
    const __m256i base = _mm256_set1_epi64x(static_cast<long long>(first + k));
    __m256i c0a = _mm256_add_epi64(base, iota_a), c0b = _mm256_add_epi64(base, iota_b);  // full counters
    __m256i p0a = _mm256_mul_epu32(c0a, m0), p0b = _mm256_mul_epu32(c0b, m0);
    // round 0 with c2 = c3 = 0
    __m256i c2a = _mm256_xor_si256(_mm256_srli_epi64(p0a, 32), round_k1[0]);
    __m256i c2b = _mm256_xor_si256(_mm256_srli_epi64(p0b, 32), round_k1[0]);
    __m256i c1a = _mm256_setzero_si256(), c1b = _mm256_setzero_si256();
    c0a = _mm256_xor_si256(_mm256_srli_epi64(c0a, 32), round_k0[0]);
    c0b = _mm256_xor_si256(_mm256_srli_epi64(c0b, 32), round_k0[0]);
    __m256i c3a = p0a, c3b = p0b;
    for (int r = 1; r < kPhiloxRounds; ++r) {
      p0a = _mm256_mul_epu32(c0a, m0);
      p0b = _mm256_mul_epu32(c0b, m0);
      const __m256i p1a = _mm256_mul_epu32(c2a, m1), p1b = _mm256_mul_epu32(c2b, m1);
      c0a = xor3_avx2(_mm256_srli_epi64(p1a, 32), c1a, round_k0[r]);
      c0b = xor3_avx2(_mm256_srli_epi64(p1b, 32), c1b, round_k0[r]);
      c2a = xor3_avx2(_mm256_srli_epi64(p0a, 32), c3a, round_k1[r]);
      c2b = xor3_avx2(_mm256_srli_epi64(p0b, 32), c3b, round_k1[r]);
      c1a = p1a;
      c1b = p1b;
      c3a = p0a;
      c3b = p0b;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x0 + k), pack_low_halves_avx2(c0a, c0b));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x1 + k), pack_low_halves_avx2(c1a, c1b));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x2 + k), pack_low_halves_avx2(c2a, c2b));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x3 + k), pack_low_halves_avx2(c3a, c3b));
  }
}

// AVX-512 keeps each 32-bit Philox word in the low half of a 64-bit lane (8 counters per
// register, two registers per 16 counters): vpmuludq then yields a word's full product in place,
// so hi = product >> 32 and lo = the product itself (its garbage upper half is ignored by the next
// vpmuludq and dropped when the words are packed at the end). That saves the blends and most
// shifts of the 32-bit-lane form; the multiplies (the bottleneck) are the same.
struct Lanes64 {
  __m512i a, b;  // counters 0..7 and 8..15 of a group of 16
};

HOSL_TARGET_AVX512 void philox_fill_avx512(uint64_t first, size_t count, uint32_t k0, uint32_t k1, uint32_t* x0,
                                           uint32_t* x1, uint32_t* x2, uint32_t* x3) {
  __m512i round_k0[kPhiloxRounds], round_k1[kPhiloxRounds];
  for (int r = 0; r < kPhiloxRounds; ++r) {
    round_k0[r] = _mm512_set1_epi32(static_cast<int>(k0 + static_cast<uint32_t>(r) * kPhiloxW0));
    round_k1[r] = _mm512_set1_epi32(static_cast<int>(k1 + static_cast<uint32_t>(r) * kPhiloxW1));
  }
  const __m512i iota_a = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i iota_b = _mm512_setr_epi64(8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0);
  const __m512i m1 = _mm512_set1_epi64(kPhiloxM1);
  // low 32-bit halves of a's 8 lanes, then of b's
  const __m512i pack = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  for (size_t k = 0; k < count; k += 16) {
    const __m512i base = _mm512_set1_epi64(static_cast<long long>(first + k));
    // round 0: c2 = c3 = 0, so the second product is 0
    Lanes64 c0{_mm512_add_epi64(base, iota_a), _mm512_add_epi64(base, iota_b)};  // full 64-bit counter
    Lanes64 p0{_mm512_mul_epu32(c0.a, m0), _mm512_mul_epu32(c0.b, m0)};
    Lanes64 c1{_mm512_srli_epi64(c0.a, 32), _mm512_srli_epi64(c0.b, 32)};  // the counter's high word
    Lanes64 c2{_mm512_xor_si512(_mm512_srli_epi64(p0.a, 32), round_k1[0]),
               _mm512_xor_si512(_mm512_srli_epi64(p0.b, 32), round_k1[0])};
    c0 = Lanes64{_mm512_xor_si512(c1.a, round_k0[0]), _mm512_xor_si512(c1.b, round_k0[0])};
    c1 = Lanes64{_mm512_setzero_si512(), _mm512_setzero_si512()};
    Lanes64 c3 = p0;
    for (int r = 1; r < kPhiloxRounds; ++r) {
      p0 = Lanes64{_mm512_mul_epu32(c0.a, m0), _mm512_mul_epu32(c0.b, m0)};
      const Lanes64 p1{_mm512_mul_epu32(c2.a, m1), _mm512_mul_epu32(c2.b, m1)};
      c0 = Lanes64{_mm512_ternarylogic_epi64(_mm512_srli_epi64(p1.a, 32), c1.a, round_k0[r], 0x96),
                   _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1.b, 32), c1.b, round_k0[r], 0x96)};
      c2 = Lanes64{_mm512_ternarylogic_epi64(_mm512_srli_epi64(p0.a, 32), c3.a, round_k1[r], 0x96),
                   _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0.b, 32), c3.b, round_k1[r], 0x96)};
      c1 = p1;
      c3 = p0;
    }
    _mm512_storeu_si512(x0 + k, _mm512_permutex2var_epi32(c0.a, pack, c0.b));
    _mm512_storeu_si512(x1 + k, _mm512_permutex2var_epi32(c1.a, pack, c1.b));
    _mm512_storeu_si512(x2 + k, _mm512_permutex2var_epi32(c2.a, pack, c2.b));
    _mm512_storeu_si512(x3 + k, _mm512_permutex2var_epi32(c3.a, pack, c3.b));
  }
}
#endif  // HOSL_X86

// ---------------------------------------------------------------------------------------------
// One job = one op over a table of slots, cut into aligned chunks.
// ---------------------------------------------------------------------------------------------
enum class Op { kRandn, kPerturb, kUpdate, kSqNorm };

struct Job {
  Op op;
  const TensorSlot* slots;
  std::vector<uint64_t> first_chunk;  // first_chunk[j]: global index of slot j's first chunk; last = total
  const uint32_t* keys_lo;
  const uint32_t* keys_hi;
  const float* coeffs;  // perturb: coeffs[0] is the scale
  size_t num_dirs;
  float decay;
  Family family = Family::kGaussian;
  bool generic = false;               // every family through direction4 (force_generic)
  const float* dir_scales = nullptr;  // per-tensor factors (sphere): [q * num_slots + j] (randn: [0]); nullptr: 1.0f
  size_t num_slots = 0;
  std::vector<uint64_t> chunk_sums;   // kSqNorm: one partial sum per global chunk
};

// The aligned window [begin, end) of coordinates that contains `i`, of width `width`, clipped to
// the slot's coordinates [lo, hi_inclusive].
inline void clip_window(uint64_t window_start, uint64_t width, uint64_t lo, uint64_t hi_inclusive,
                        uint64_t& begin, uint64_t& last) {
  begin = std::max(window_start, lo);
  last = std::min(window_start + (width - 1), hi_inclusive);
}

// All the per-tile work, instantiated once per SIMD variant by the wrappers below, which inline
// it under their own target attribute (so that its loops vectorise for that variant).
template <PhiloxFillFn kFill>
struct Tiles {
  alignas(64) uint32_t x0[kTileCounters], x1[kTileCounters], x2[kTileCounters], x3[kTileCounters];
  alignas(64) float z[kTile];
  alignas(64) float acc[kTile];

  // z[0 .. 4*count) = the normals of counters first .. first+count-1 (count <= kTileCounters).
  __attribute__((always_inline)) inline void normals(uint64_t first, size_t count, uint32_t k0, uint32_t k1) {
    const size_t padded = (count + 15) & ~size_t(15);
    kFill(first, padded, k0, k1, x0, x1, x2, x3);
    for (size_t k = 0; k < count; ++k) {
      float a, b, c, d;
      normals_from_words(x0[k], x1[k], x2[k], x3[k], a, b, c, d);
      z[4 * k] = a;
      z[4 * k + 1] = b;
      z[4 * k + 2] = c;
      z[4 * k + 3] = d;
    }
  }

  // z[0 .. 128*count) = +-1.0f for Rademacher counters first .. first+count-1 (count <= kTile/128).
  __attribute__((always_inline)) inline void signs(uint64_t first, size_t count, uint32_t k0, uint32_t k1) {
    kFill(first, 16, k0, k1, x0, x1, x2, x3);  // the SIMD fill works in groups of 16 counters
    const uint32_t* words[4] = {x0, x1, x2, x3};
    for (size_t k = 0; k < count; ++k) {
      for (size_t w = 0; w < 4; ++w) {
        const uint32_t word = words[w][k];
        float* zw = z + 128 * k + 32 * w;
        for (uint32_t b = 0; b < 32; ++b) zw[b] = rademacher_from_word(word, b);
      }
    }
  }

  // z[0 .. 4*count) = direction4<kFam> of groups first .. first+count-1 (count <= kTile/4): the
  // family's shared definition (hosl_direction.h), one group of 4 coordinates at a time.
  template <Family kFam>
  __attribute__((always_inline)) inline void generic(uint64_t first, size_t count, uint32_t k0, uint32_t k1,
                                                     float factor) {
    for (size_t k = 0; k < count; ++k) direction4<kFam>(first + k, k0, k1, factor, z + 4 * k);
  }

  // The direction of coordinates [begin, last] (inside one aligned tile) into z; returns the
  // index in z of coordinate `begin`. `factor`: the slot's per-tensor factor (sphere), else 1.0f.
  // The SIMD paths of the families that have one come first; every family (any other, or all of
  // them when `use_generic`) can take the generic path below.
  __attribute__((always_inline)) inline size_t direction(Family family, bool use_generic, uint64_t begin,
                                                         uint64_t last, uint32_t k0, uint32_t k1, float factor) {
    if (!use_generic) {
      switch (family) {
        case Family::kRademacher: {
          const uint64_t first = begin >> kRademacherShift;
          signs(first, static_cast<size_t>((last >> kRademacherShift) - first + 1), k0, k1);
          return static_cast<size_t>(begin & 127);
        }
        case Family::kGaussian:
        case Family::kSphere: {
          const uint64_t first = begin >> 2;
          const size_t count = static_cast<size_t>((last >> 2) - first + 1);
          normals(first, count, k0, k1);
          if (family == Family::kSphere) {
            for (size_t t = 0; t < 4 * count; ++t) z[t] = fmul(factor, z[t]);
          }
          return static_cast<size_t>(begin & 3);
        }
        default:
          break;  // no SIMD path: the generic one
      }
    }
    const uint64_t first = begin >> 2;
    const size_t count = static_cast<size_t>((last >> 2) - first + 1);
    switch (family) {
#define HOSL_GENERIC_FAMILY(name, code) \
  case Family::name:                    \
    generic<Family::name>(first, count, k0, k1, factor); \
    break;
      HOSL_FAMILIES(HOSL_GENERIC_FAMILY)
#undef HOSL_GENERIC_FAMILY
    }
    return static_cast<size_t>(begin & 3);
  }

  // sum of sphere_sq_term over z[lead .. lead+n)
  __attribute__((always_inline)) inline uint64_t sq_sum(size_t n, size_t lead) {
    const float* zt = z + lead;
    uint64_t sum = 0;
    for (size_t t = 0; t < n; ++t) sum += sphere_sq_term(zt[t]);
    return sum;
  }

  template <class S>
  __attribute__((always_inline)) inline void perturb(const void* in_v, void* out_v, size_t n, size_t lead,
                                                     float scale) {
    const typename S::T* in = static_cast<const typename S::T*>(in_v);
    typename S::T* out = static_cast<typename S::T*>(out_v);
    const float* zt = z + lead;
    for (size_t t = 0; t < n; ++t) out[t] = S::store(perturb_element(S::load(in[t]), scale, zt[t]));
  }

  // The update's elements live at acc[acc_lead .. acc_lead + n): acc_lead is 0, except for the
  // Rademacher update, which keeps them at their position in the tile's 128-aligned counters.
  size_t acc_lead = 0;

  template <class S>
  __attribute__((always_inline)) inline void update_start(const void* w_v, size_t n, float decay) {
    const typename S::T* w = static_cast<const typename S::T*>(w_v);
    float* a = acc + acc_lead;
    for (size_t t = 0; t < n; ++t) a[t] = hosl::update_start(S::load(w[t]), decay);
  }

  __attribute__((always_inline)) inline void update_step(size_t n, size_t lead, float coeff) {
    const float* zt = z + lead;
    float* a = acc + acc_lead;
    for (size_t t = 0; t < n; ++t) a[t] = hosl::update_step(a[t], coeff, zt[t]);
  }

  template <class S>
  __attribute__((always_inline)) inline void update_store(void* w_v, size_t n) {
    typename S::T* w = static_cast<typename S::T*>(w_v);
    const float* a = acc + acc_lead;
    for (size_t t = 0; t < n; ++t) w[t] = S::store(a[t]);
  }

  // All Q Rademacher directions applied to acc[acc_lead .. acc_lead + n) (coordinates [begin, last]).
  // coeff * (+-1) is coeff with its sign bit flipped by the coordinate's bit (exact, as the
  // multiply), so each direction costs a shift, a mask/xor and a subtract per element; the
  // accumulators of a 32-coordinate group (one Philox word per direction) stay in registers
  // across the directions, which are taken in batches of kBatch. The SIMD Philox fill makes 16
  // counters (2048 coordinates, two tiles): with a single batch, the next tile reuses them.
  static constexpr size_t kBatch = 16, kFillCounters = 16;
  alignas(64) uint32_t rad_words[kBatch][4 * kFillCounters];
  uint64_t rad_first = ~uint64_t(0);  // counter of rad_words[.][0..3]; ~0: nothing cached

  // G consecutive 32-coordinate groups from group g, all nq directions of the batch. G=4 keeps
  // 4x32 independent accumulator chains in flight (about 6% faster at Q=10 than one group at a
  // time; the loop is bound by its sign-select and subtract count, not by memory).
  static constexpr size_t kGroups = 4;
  template <size_t G>
  __attribute__((always_inline)) inline void rademacher_groups(size_t g, size_t word0, size_t nq,
                                                               const uint32_t* coeff_bits) {
    float a[G][32];
    for (size_t i = 0; i < G; ++i)
      for (uint32_t b = 0; b < 32; ++b) a[i][b] = acc[32 * (g + i) + b];
    for (size_t q = 0; q < nq; ++q) {
      const uint32_t cb = coeff_bits[q];
      for (size_t i = 0; i < G; ++i) {
        const uint32_t word = rad_words[q][word0 + g + i];
        for (uint32_t b = 0; b < 32; ++b) a[i][b] = fsub(a[i][b], float_of(cb ^ ((word << (31 - b)) & 0x80000000u)));
      }
    }
    for (size_t i = 0; i < G; ++i)
      for (uint32_t b = 0; b < 32; ++b) acc[32 * (g + i) + b] = a[i][b];
  }

  __attribute__((always_inline)) inline void rademacher_update(const Job& job, uint64_t begin, uint64_t last, size_t n) {
    uint32_t coeff_bits[kBatch];
    const uint64_t first = begin >> kRademacherShift;
    const uint64_t last_counter = last >> kRademacherShift;
    const size_t g0 = acc_lead / 32, g1 = (acc_lead + n - 1) / 32;
    // the group edges outside the elements: defined values (never stored)
    for (size_t t = 32 * g0; t < acc_lead; ++t) acc[t] = 0.0f;
    for (size_t t = acc_lead + n; t < 32 * (g1 + 1); ++t) acc[t] = 0.0f;
    for (size_t q0 = 0; q0 < job.num_dirs; q0 += kBatch) {
      const size_t nq = std::min(kBatch, job.num_dirs - q0);
      const bool cached = job.num_dirs <= kBatch && rad_first != ~uint64_t(0) && first >= rad_first &&
                          last_counter < rad_first + kFillCounters;
      if (!cached) {
        rad_first = job.num_dirs <= kBatch ? first : ~uint64_t(0);
        for (size_t q = 0; q < nq; ++q) {
          kFill(first, kFillCounters, job.keys_lo[q0 + q], job.keys_hi[q0 + q], x0, x1, x2, x3);
          for (size_t k = 0; k < kFillCounters; ++k) {
            rad_words[q][4 * k] = x0[k];
            rad_words[q][4 * k + 1] = x1[k];
            rad_words[q][4 * k + 2] = x2[k];
            rad_words[q][4 * k + 3] = x3[k];
          }
        }
      }
      const size_t word0 = 4 * static_cast<size_t>(first - (cached ? rad_first : first));  // group g0's word
      for (size_t q = 0; q < nq; ++q) coeff_bits[q] = bits_of(job.coeffs[q0 + q]);
      size_t g = g0;
      for (; g + kGroups - 1 <= g1; g += kGroups) rademacher_groups<kGroups>(g, word0, nq, coeff_bits);
      for (; g <= g1; ++g) rademacher_groups<1>(g, word0, nq, coeff_bits);
    }
  }

  // Coordinates [begin, last] of slot j (all inside one aligned tile). Returns the sq-norm sum
  // for Op::kSqNorm, else 0.
  __attribute__((always_inline)) inline uint64_t run_tile(const Job& job, size_t j, uint64_t begin, uint64_t last) {
    const TensorSlot& s = job.slots[j];
    const size_t n = static_cast<size_t>(last - begin + 1);
    const uint64_t e0 = begin - s.offset;  // element index of the tile's first coordinate
    const bool scaled = job.dir_scales != nullptr;
    // the SIMD Rademacher update (rademacher_update) keeps its elements at their place in the tile's counters
    const bool rademacher_simd = job.family == Family::kRademacher && !job.generic;
    switch (job.op) {
      case Op::kSqNorm: {
        const size_t lead =
            direction(Family::kGaussian, job.generic, begin, last, job.keys_lo[0], job.keys_hi[0], 1.0f);
        return sq_sum(n, lead);
      }
      case Op::kRandn: {
        const float factor = scaled ? job.dir_scales[0] : 1.0f;
        const size_t lead = direction(job.family, job.generic, begin, last, job.keys_lo[0], job.keys_hi[0], factor);
        std::memcpy(static_cast<float*>(s.out) + e0, z + lead, n * sizeof(float));
        break;
      }
      case Op::kPerturb: {
        const float factor = scaled ? job.dir_scales[j] : 1.0f;
        const size_t lead = direction(job.family, job.generic, begin, last, job.keys_lo[0], job.keys_hi[0], factor);
        const float scale = job.coeffs[0];
        switch (s.dtype) {
          case DType::kFloat32:
            perturb<Float32Storage>(static_cast<const float*>(s.in) + e0, static_cast<float*>(s.out) + e0, n, lead,
                                    scale);
            break;
          case DType::kFloat16:
            perturb<Float16Storage>(static_cast<const uint16_t*>(s.in) + e0, static_cast<uint16_t*>(s.out) + e0, n,
                                    lead, scale);
            break;
          case DType::kBFloat16:
            perturb<BFloat16Storage>(static_cast<const uint16_t*>(s.in) + e0, static_cast<uint16_t*>(s.out) + e0, n,
                                     lead, scale);
            break;
        }
        break;
      }
      case Op::kUpdate: {
        acc_lead = rademacher_simd ? static_cast<size_t>(begin & 127) : 0;
        switch (s.dtype) {
          case DType::kFloat32: update_start<Float32Storage>(static_cast<const float*>(s.in) + e0, n, job.decay); break;
          case DType::kFloat16: update_start<Float16Storage>(static_cast<const uint16_t*>(s.in) + e0, n, job.decay); break;
          case DType::kBFloat16: update_start<BFloat16Storage>(static_cast<const uint16_t*>(s.in) + e0, n, job.decay); break;
        }
        if (rademacher_simd && job.num_dirs) {
          rademacher_update(job, begin, last, n);
        } else {
          for (size_t q = 0; q < job.num_dirs; ++q) {
            const float factor = scaled ? job.dir_scales[q * job.num_slots + j] : 1.0f;
            const size_t lead =
                direction(job.family, job.generic, begin, last, job.keys_lo[q], job.keys_hi[q], factor);
            update_step(n, lead, job.coeffs[q]);
          }
        }
        switch (s.dtype) {
          case DType::kFloat32: update_store<Float32Storage>(static_cast<float*>(s.out) + e0, n); break;
          case DType::kFloat16: update_store<Float16Storage>(static_cast<uint16_t*>(s.out) + e0, n); break;
          case DType::kBFloat16: update_store<BFloat16Storage>(static_cast<uint16_t*>(s.out) + e0, n); break;
        }
        break;
      }
    }
    return 0;
  }
};

// Run global chunk `chunk` of the job: find its slot, then its tiles.
template <PhiloxFillFn kFill>
__attribute__((always_inline)) inline void run_chunk_impl(const Job& job, uint64_t chunk) {
  const size_t j = static_cast<size_t>(
      std::upper_bound(job.first_chunk.begin(), job.first_chunk.end(), chunk) - job.first_chunk.begin() - 1);
  const TensorSlot& s = job.slots[j];
  const uint64_t lo = s.offset, hi = s.offset + (s.numel - 1);
  const uint64_t window = (lo / kChunk + (chunk - job.first_chunk[j])) * kChunk;
  uint64_t begin, last;
  clip_window(window, kChunk, lo, hi, begin, last);
  Tiles<kFill> tiles;  // ~13 KiB on the stack
  uint64_t sum = 0;
  for (uint64_t tile = begin / kTile * kTile; tile <= last; tile += kTile) {
    uint64_t tile_begin, tile_last;
    clip_window(tile, kTile, begin, last, tile_begin, tile_last);
    sum += tiles.run_tile(job, j, tile_begin, tile_last);
    if (tile + kTile < tile) break;  // the last tile of the 2^64 coordinate space
  }
  if (job.op == Op::kSqNorm) const_cast<Job&>(job).chunk_sums[chunk] = sum;  // one writer per chunk
}

using RunChunkFn = void (*)(const Job&, uint64_t);

void run_chunk_scalar(const Job& job, uint64_t chunk) { run_chunk_impl<philox_fill_scalar>(job, chunk); }
#if HOSL_X86
HOSL_TARGET_AVX2 void run_chunk_avx2(const Job& job, uint64_t chunk) { run_chunk_impl<philox_fill_avx2>(job, chunk); }
HOSL_TARGET_AVX512 void run_chunk_avx512(const Job& job, uint64_t chunk) {
  run_chunk_impl<philox_fill_avx512>(job, chunk);
}
#endif

struct Variant {
  const char* name;
  RunChunkFn run;
  bool (*supported)();
};

bool always() { return true; }
#if HOSL_X86
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2");
}
bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && has_avx2();
}
#endif

// Best first.
const Variant kVariants[] = {
#if HOSL_X86
    {"avx512", run_chunk_avx512, has_avx512},
    {"avx2", run_chunk_avx2, has_avx2},
#endif
    {"scalar", run_chunk_scalar, always},
};

const Variant* pick_variant(const char* wanted) {
  bool reached = wanted == nullptr || *wanted == '\0';
  for (const Variant& v : kVariants) {
    if (!reached && std::strcmp(v.name, wanted) == 0) reached = true;
    if (reached && v.supported()) return &v;
  }
  return nullptr;
}

const Variant* g_variant = [] {
  const Variant* v = pick_variant(std::getenv("HOSL_CPU_ISA"));
  return v ? v : pick_variant(nullptr);
}();

bool g_generic = false;  // force_generic

void run_job(Job& job, size_t num_slots, int num_threads) {
  job.num_slots = num_slots;
  job.generic = g_generic;
  job.first_chunk.resize(num_slots + 1);
  uint64_t total = 0;
  for (size_t j = 0; j < num_slots; ++j) {
    job.first_chunk[j] = total;
    const TensorSlot& s = job.slots[j];
    if (s.numel) total += (s.offset + (s.numel - 1)) / kChunk - s.offset / kChunk + 1;
  }
  job.first_chunk[num_slots] = total;
  if (job.op == Op::kSqNorm) job.chunk_sums.assign(total, 0);
  const RunChunkFn run = g_variant->run;
  if (num_threads <= 1 || total <= 1) {
    for (uint64_t c = 0; c < total; ++c) run(job, c);
    return;
  }
  const int64_t n = static_cast<int64_t>(total);
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t c = 0; c < n; ++c) run(job, static_cast<uint64_t>(c));
}

}  // namespace

void randn(uint32_t key_lo, uint32_t key_hi, uint64_t offset, uint64_t numel, float* out, int num_threads,
           Family family, float factor) {
  const TensorSlot slot{nullptr, out, numel, offset, DType::kFloat32};
  Job job{Op::kRandn, &slot, {}, &key_lo, &key_hi, nullptr, 1, 0.0f};
  job.family = family;
  job.dir_scales = &factor;
  run_job(job, 1, num_threads);
}

void perturb(const TensorSlot* slots, size_t num_slots, uint32_t key_lo, uint32_t key_hi, float scale,
             int num_threads, Family family, const float* dir_scales) {
  Job job{Op::kPerturb, slots, {}, &key_lo, &key_hi, &scale, 1, 0.0f};
  job.family = family;
  job.dir_scales = dir_scales;
  run_job(job, num_slots, num_threads);
}

void zo_update(const TensorSlot* slots, size_t num_slots, const uint32_t* keys_lo, const uint32_t* keys_hi,
               const float* coeffs, size_t num_dirs, float decay, int num_threads, Family family,
               const float* dir_scales) {
  Job job{Op::kUpdate, slots, {}, keys_lo, keys_hi, coeffs, num_dirs, decay};
  job.family = family;
  job.dir_scales = dir_scales;
  run_job(job, num_slots, num_threads);
}

void sq_norms(const TensorSlot* slots, size_t num_slots, uint32_t key_lo, uint32_t key_hi, uint64_t* out,
              int num_threads) {
  Job job{Op::kSqNorm, slots, {}, &key_lo, &key_hi, nullptr, 1, 0.0f};
  run_job(job, num_slots, num_threads);
  for (size_t j = 0; j < num_slots; ++j) {  // integer sums: exact in any order
    uint64_t sum = 0;
    for (uint64_t c = job.first_chunk[j]; c < job.first_chunk[j + 1]; ++c) sum += job.chunk_sums[c];
    out[j] = sum;
  }
}

const char* isa() { return g_variant->name; }

bool force_generic(bool on) {
  const bool was = g_generic;
  g_generic = on;
  return was;
}

bool set_isa(const char* name) {
  for (const Variant& v : kVariants) {
    if (std::strcmp(v.name, name) == 0 && v.supported()) {
      g_variant = &v;
      return true;
    }
  }
  return false;
}

}  // namespace cpu
}  // namespace hosl
