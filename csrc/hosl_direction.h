// The direction z(seed, i), element by element, for host (C++) and device (CUDA) code.
//
// This header is the C++ transcription of hosl/directions/spec.py, the executable spec. Every
// backend must give the spec's bits, so the float math here follows spec.py line by line: the same
// float32 constants (hex literals, identical to spec.py's), the same operations in the same order,
// each one rounded on its own. Only + - * / and sqrt are used; all of them are correctly rounded
// everywhere as long as nothing is contracted into a fused multiply-add:
//   * host: build with -ffp-contract=off (GCC/Clang), and -fno-math-errno so sqrtf vectorises;
//   * device: every operation is an explicit __f*_rn intrinsic, which nvcc never contracts
//     (nvcc -fmad=false --prec-div=true --prec-sqrt=true is set as well, belt and braces).
//
// Layout of the direction: coordinate i uses Philox4x32-10 counter n = i / 4 (key = the seed's two
// 32-bit halves); the four output words give two Box-Muller pairs and so coordinates 4n .. 4n+3.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define HOSL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HOSL_HOST_DEVICE inline __attribute__((always_inline))
#endif

namespace hosl {

// ---------------------------------------------------------------------------------------------
// Constants (spec.py). tests check that these literals equal spec.py's values.
// ---------------------------------------------------------------------------------------------
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

constexpr float kLn2 = 0x1.62e430p-1f;
constexpr float kSqrt2 = 0x1.6a09e6p+0f;
constexpr float kTwoPowM23 = 0x1p-23f;

// ln(m) = 2*s*(1 + s^2*(L3 + s^2*(L5 + s^2*(L7 + s^2*L9)))),  s = (m-1)/(m+1)
constexpr float kLogL3 = 0x1.555556p-2f;
constexpr float kLogL5 = 0x1.99999ap-3f;
constexpr float kLogL7 = 0x1.24924ap-3f;
constexpr float kLogL9 = 0x1.c71c72p-4f;

// sin(pi/2*f) = f*(S1 + f^2*(S3 + ... + f^2*S13))
constexpr float kSinS1 = 0x1.921fb6p+0f;
constexpr float kSinS3 = -0x1.4abbcep-1f;
constexpr float kSinS5 = 0x1.466bc6p-4f;
constexpr float kSinS7 = -0x1.32d2ccp-8f;
constexpr float kSinS9 = 0x1.507834p-13f;
constexpr float kSinS11 = -0x1.e30750p-19f;
constexpr float kSinS13 = 0x1.e8f434p-25f;

// cos(pi/2*f) = C0 + f^2*(C2 + ... + f^2*C12)
constexpr float kCosC0 = 0x1p+0f;
constexpr float kCosC2 = -0x1.3bd3ccp+0f;
constexpr float kCosC4 = 0x1.03c1f0p-2f;
constexpr float kCosC6 = -0x1.55d3c8p-6f;
constexpr float kCosC8 = 0x1.e1f506p-11f;
constexpr float kCosC10 = -0x1.a6d1f2p-16f;
constexpr float kCosC12 = 0x1.f9d38ap-22f;

// ---------------------------------------------------------------------------------------------
// Correctly rounded float32 operations that are never fused.
// ---------------------------------------------------------------------------------------------
HOSL_HOST_DEVICE float fadd(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
HOSL_HOST_DEVICE float fsub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
HOSL_HOST_DEVICE float fmul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
HOSL_HOST_DEVICE float fdiv(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
HOSL_HOST_DEVICE float fsqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return __builtin_sqrtf(a);  // one sqrtss/sqrtps with -fno-math-errno
#endif
}

HOSL_HOST_DEVICE uint32_t bits_of(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  __builtin_memcpy(&u, &x, sizeof u);
  return u;
#endif
}
HOSL_HOST_DEVICE float float_of(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  __builtin_memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// ---------------------------------------------------------------------------------------------
// Philox4x32-10.
// ---------------------------------------------------------------------------------------------
struct Philox4 {
  uint32_t x0, x1, x2, x3;
};

HOSL_HOST_DEVICE void mulhilo32(uint32_t a, uint32_t m, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(m);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// The four words for 64-bit counter `n` (counter words (n_lo, n_hi, 0, 0)) under key (k0, k1).
HOSL_HOST_DEVICE Philox4 philox4x32_10(uint64_t n, uint32_t k0, uint32_t k1) {
  uint32_t c0 = static_cast<uint32_t>(n), c1 = static_cast<uint32_t>(n >> 32), c2 = 0, c3 = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kPhiloxRounds; ++r) {
    if (r) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(c0, kPhiloxM0, hi0, lo0);
    mulhilo32(c2, kPhiloxM1, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4{c0, c1, c2, c3};
}

// ---------------------------------------------------------------------------------------------
// The float part of spec.py. Every line is one rounded float32 operation, in spec order.
// Written branch-free (selects, bit ops) so that host loops over it auto-vectorise. A select may
// pick between values but not decide whether a float operation runs (`c ? a * b : a`): without
// AVX-512 masking GCC refuses to if-convert such a loop (under the default -ftrapping-math the
// multiply might trap), and the AVX2 and baseline CPU builds of the whole loop stay scalar.
// tests/test_cpu_isa.py checks the AVX2 build's disassembly for 8-wide divides and square roots.
// ---------------------------------------------------------------------------------------------

// ((word >> 9) + 0.5) * 2^-23: exact, strictly inside (0, 1).
HOSL_HOST_DEVICE float uniform_open(uint32_t word) {
  const float k = static_cast<float>(static_cast<int32_t>(word >> 9));  // < 2^23: exact
  return fmul(fadd(k, 0.5f), kTwoPowM23);
}

// spec._log: exponent split, then the atanh series on m in [sqrt(.5), sqrt(2)].
HOSL_HOST_DEVICE float log_open(float u) {
  const uint32_t bits = bits_of(u);
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xFFu) - 127;
  float m = float_of((bits & 0x7FFFFFu) | 0x3F800000u);  // in [1, 2)
  const bool big = m > kSqrt2;
  // The spec's m * 0.5 for m in (sqrt(2), 2): exact, so it is the exponent field minus one, the
  // same bits. Done on the integer bits because a conditional float multiply kept the AVX2 and
  // baseline builds of the whole Box-Muller loop scalar (see above); computing the product
  // unconditionally and selecting does not help, GCC sinks it back under the condition.
  m = float_of(bits_of(m) - (big ? 0x00800000u : 0u));
  e = big ? e + 1 : e;
  const float ef = static_cast<float>(e);
  const float s = fdiv(fsub(m, 1.0f), fadd(m, 1.0f));
  const float s2 = fmul(s, s);
  float p = kLogL9;
  p = fadd(fmul(p, s2), kLogL7);
  p = fadd(fmul(p, s2), kLogL5);
  p = fadd(fmul(p, s2), kLogL3);
  p = fadd(fmul(p, s2), 1.0f);
  const float log_m = fmul(fadd(s, s), p);
  return fadd(fmul(ef, kLn2), log_m);
}

// spec._sincos_quarter: (sin, cos) of pi/2 * f, f in (0, 1).
HOSL_HOST_DEVICE void sincos_quarter(float f, float& sin_out, float& cos_out) {
  const float f2 = fmul(f, f);
  float s = kSinS13;
  s = fadd(fmul(s, f2), kSinS11);
  s = fadd(fmul(s, f2), kSinS9);
  s = fadd(fmul(s, f2), kSinS7);
  s = fadd(fmul(s, f2), kSinS5);
  s = fadd(fmul(s, f2), kSinS3);
  s = fadd(fmul(s, f2), kSinS1);
  sin_out = fmul(s, f);
  float c = kCosC12;
  c = fadd(fmul(c, f2), kCosC10);
  c = fadd(fmul(c, f2), kCosC8);
  c = fadd(fmul(c, f2), kCosC6);
  c = fadd(fmul(c, f2), kCosC4);
  c = fadd(fmul(c, f2), kCosC2);
  cos_out = fadd(fmul(c, f2), kCosC0);
}

// spec._box_muller: two normals (r*cos(theta), r*sin(theta)) from a radius word and an angle word.
HOSL_HOST_DEVICE void box_muller(uint32_t radius_word, uint32_t angle_word, float& z_cos, float& z_sin) {
  const float u = uniform_open(radius_word);
  const float r = fsqrt(fmul(log_open(u), -2.0f));
  const uint32_t quadrant = angle_word >> 30;
  const float f = fmul(fadd(static_cast<float>(static_cast<int32_t>((angle_word >> 7) & 0x7FFFFFu)), 0.5f),
                       kTwoPowM23);
  float s, c;
  sincos_quarter(f, s, c);
  // Rotate (c, s) by quadrant * 90 degrees: q0 (c, s), q1 (-s, c), q2 (-c, -s), q3 (s, -c).
  // Negation is a sign-bit flip, exactly as the spec's unary minus.
  const bool odd = (quadrant & 1u) != 0;
  const float a = odd ? s : c;
  const float b = odd ? c : s;
  const uint32_t cos_flip = ((quadrant ^ (quadrant >> 1)) & 1u) << 31;  // q1, q2
  const uint32_t sin_flip = (quadrant >> 1) << 31;                       // q2, q3
  const float cos_t = float_of(bits_of(a) ^ cos_flip);
  const float sin_t = float_of(bits_of(b) ^ sin_flip);
  z_cos = fmul(r, cos_t);
  z_sin = fmul(r, sin_t);
}

// The four normals of one Philox output: coordinates 4n, 4n+1, 4n+2, 4n+3.
HOSL_HOST_DEVICE void normals_from_words(uint32_t x0, uint32_t x1, uint32_t x2, uint32_t x3, float& z0,
                                         float& z1, float& z2, float& z3) {
  box_muller(x0, x1, z0, z1);
  box_muller(x2, x3, z2, z3);
}

// z(seed, i) for one coordinate (slow path: computes all four normals of its counter).
HOSL_HOST_DEVICE float normal_at(uint32_t key_lo, uint32_t key_hi, uint64_t i) {
  const Philox4 w = philox4x32_10(i >> 2, key_lo, key_hi);
  float z[4];
  normals_from_words(w.x0, w.x1, w.x2, w.x3, z[0], z[1], z[2], z[3]);
  return z[i & 3];
}

// ---------------------------------------------------------------------------------------------
// Direction families (spec.py FAMILIES).
//
// HOSL_FAMILIES is THE list of families of the compiled kernels: X(enumerator, code), the code
// being the family's entry in hosl.directions.spec.FAMILY_CODES (tests/test_family_codes.py parses
// this list and checks it against spec). It generates the enum below and the per-family dispatch
// of both backends (the launch in csrc/cuda/direction_cuda.cu, the generic tile path in
// csrc/cpu/direction_cpu.cpp), so neither of those files names a family to support it.
//
// Adding a family here = one X(...) line + one specialisation of direction4 below (see
// docs/directions.md, "Adding a direction family").
// ---------------------------------------------------------------------------------------------
#define HOSL_FAMILIES(X) \
  X(kGaussian, 0)        \
  X(kRademacher, 1)      \
  X(kSphere, 2)

enum class Family : int {
#define HOSL_FAMILY_ENUMERATOR(name, code) name = code,
  HOSL_FAMILIES(HOSL_FAMILY_ENUMERATOR)
#undef HOSL_FAMILY_ENUMERATOR
};

// Whether `code` is one of the families above.
constexpr bool is_family_code(long long code) {
#define HOSL_FAMILY_IS(name, code_) code == (code_) ||
  return HOSL_FAMILIES(HOSL_FAMILY_IS) false;
#undef HOSL_FAMILY_IS
}

// Rademacher: coordinate i uses counter i / 128 and bit i % 128 of its output: bit (i % 32) of
// word x_{(i / 32) % 4}, least significant first. Bit 0 -> +1.0f, bit 1 -> -1.0f.
constexpr int kRademacherShift = 7;  // log2(128 coordinates per counter)
HOSL_HOST_DEVICE float rademacher_from_word(uint32_t word, uint32_t bit) {
  return float_of(0x3F800000u | (((word >> bit) & 1u) << 31));
}
HOSL_HOST_DEVICE float rademacher_at(uint32_t key_lo, uint32_t key_hi, uint64_t i) {
  const Philox4 w = philox4x32_10(i >> kRademacherShift, key_lo, key_hi);
  const uint32_t which = static_cast<uint32_t>(i >> 5) & 3u;
  const uint32_t word = which == 0 ? w.x0 : which == 1 ? w.x1 : which == 2 ? w.x2 : w.x3;
  return rademacher_from_word(word, static_cast<uint32_t>(i) & 31u);
}

// The CUDA kernels' Rademacher pass (csrc/cuda/direction_cuda.cu), one warp of 32 lanes over
// kRademacherWarpCounters consecutive counters, with one Philox call per lane:
//   * lane s computes counter first + s % 8 and keeps its word x_{s / 8} (rademacher_lane_word):
//     the 8 counters' 32 words, one per lane, each holding the signs of 32 coordinates;
//   * at step j (0 .. 7) the warp covers counter first + j, lane l its coordinates
//     128 (first + j) + 4 l .. + 3: bits 4 (l % 8) .. + 3 of word x_{l / 8} of that counter, which
//     lane rademacher_source_lane(l, j) = 8 (l / 8) + j holds (one shuffle per step).
// A lane thus draws one Philox word for the 32 coordinates it covers over the 8 steps. Written for
// host and device so that a host program can check the arithmetic against rademacher_at
// (tests/test_cuda_rademacher_layout.py).
constexpr uint32_t kRademacherWarpCounters = 8;
HOSL_HOST_DEVICE uint32_t rademacher_lane_word(uint64_t first, uint32_t lane, uint32_t key_lo, uint32_t key_hi) {
  const Philox4 x = philox4x32_10(first + (lane % kRademacherWarpCounters), key_lo, key_hi);
  const uint32_t which = lane / kRademacherWarpCounters;
  return which == 0 ? x.x0 : which == 1 ? x.x1 : which == 2 ? x.x2 : x.x3;
}
HOSL_HOST_DEVICE uint32_t rademacher_source_lane(uint32_t lane, uint32_t step) {
  return (lane / kRademacherWarpCounters) * kRademacherWarpCounters + step;
}
// The first of lane `lane`'s 4 coordinates at step `step`, and the bit of the word it reads.
HOSL_HOST_DEVICE uint64_t rademacher_lane_coord(uint64_t first, uint32_t lane, uint32_t step) {
  return ((first + step) << kRademacherShift) + 4u * lane;
}
HOSL_HOST_DEVICE uint32_t rademacher_lane_bit(uint32_t lane) { return 4u * (lane % kRademacherWarpCounters); }

// direction4<F>(group, k0, k1, factor, z): the family's definition for the compiled kernels.
// z[0..3] = z(key, 4*group + j), j < 4, of family F under key (k0, k1): the four coordinates of
// one group of 4 (for the Gaussian family, exactly one Philox counter). `factor` is the per-tensor
// float32 factor the host computed for this tensor and direction (sphere: spec.sphere_scale), 1.0f
// when the host passed none; a family without one ignores it.
//
// The CUDA kernels compute every family through this function (one thread, one group); the CPU
// uses it for any family it has no SIMD tile path for (Tiles::direction in
// csrc/cpu/direction_cpu.cpp), so a family defined here runs on both backends. It must give
// spec.direction_reference's bits (spec.py order of operations; only the f* operations above).
template <Family kFam>
HOSL_HOST_DEVICE void direction4(uint64_t group, uint32_t k0, uint32_t k1, float factor, float z[4]) {
  // Instantiated only for a family without a specialisation below.
  (void)group, (void)k0, (void)k1, (void)factor, (void)z;
  static_assert(static_cast<int>(kFam) < 0, "hosl: this family has no direction4<> specialisation");
}

template <>
HOSL_HOST_DEVICE void direction4<Family::kGaussian>(uint64_t group, uint32_t k0, uint32_t k1, float /*factor*/,
                                                    float z[4]) {
  const Philox4 x = philox4x32_10(group, k0, k1);
  normals_from_words(x.x0, x.x1, x.x2, x.x3, z[0], z[1], z[2], z[3]);
}

template <>
HOSL_HOST_DEVICE void direction4<Family::kRademacher>(uint64_t group, uint32_t k0, uint32_t k1, float /*factor*/,
                                                      float z[4]) {
  // The four coordinates share one Philox word: counter coord0 / 128, word (coord0 / 32) % 4.
  const uint64_t coord0 = group * 4;
  const Philox4 x = philox4x32_10(coord0 >> kRademacherShift, k0, k1);
  const uint32_t which = static_cast<uint32_t>(coord0 >> 5) & 3u;
  const uint32_t word = which == 0 ? x.x0 : which == 1 ? x.x1 : which == 2 ? x.x2 : x.x3;
  const uint32_t bit0 = static_cast<uint32_t>(coord0) & 31u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int j = 0; j < 4; ++j) z[j] = rademacher_from_word(word, bit0 + static_cast<uint32_t>(j));
}

// Sphere is the Gaussian direction times the per-tensor factor computed on the host from the
// fixed-point norm below (sphere_sq_term, summed by the sq_norms op).
template <>
HOSL_HOST_DEVICE void direction4<Family::kSphere>(uint64_t group, uint32_t k0, uint32_t k1, float factor,
                                                  float z[4]) {
  direction4<Family::kGaussian>(group, k0, k1, 1.0f, z);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int j = 0; j < 4; ++j) z[j] = fmul(factor, z[j]);
}

// Sphere norm term: floor(float32(z*z) * 2^24). z*z < 34, so the term is < 2^30: an exact int32
// (the float -> int conversion truncates, i.e. floors a non-negative value). Summed in 64-bit
// integers, the norm is exact whatever the summation order.
constexpr float kSphereFixedOne = 0x1p+24f;
HOSL_HOST_DEVICE uint32_t sphere_sq_term(float z) {
  return static_cast<uint32_t>(static_cast<int32_t>(fmul(fmul(z, z), kSphereFixedOne)));
}

// ---------------------------------------------------------------------------------------------
// Storage conversions, done with integer operations (exact; round-to-nearest-even on the way down).
// ---------------------------------------------------------------------------------------------
HOSL_HOST_DEVICE float bf16_to_float(uint16_t h) { return float_of(static_cast<uint32_t>(h) << 16); }

HOSL_HOST_DEVICE uint16_t float_to_bf16(float x) {
  const uint32_t u = bits_of(x);
  const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // overflow carries into inf
  const uint32_t quiet_nan = (u >> 16) | 0x0040u;                  // keep sign, force a quiet NaN
  return static_cast<uint16_t>(is_nan ? quiet_nan : rounded);
}

HOSL_HOST_DEVICE float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t mag = h & 0x7FFFu;
  // Finite values: place the 15 magnitude bits under a float exponent 112 too low, then scale by
  // 2^112 (a power of two: exact, and it also normalises half subnormals).
  const float finite = fmul(float_of(mag << 13), 0x1p+112f);
  const uint32_t inf_nan = 0x7F800000u | ((mag & 0x3FFu) << 13);
  const uint32_t out = (mag >= 0x7C00u) ? inf_nan : bits_of(finite);
  return float_of(out | sign);
}

HOSL_HOST_DEVICE uint16_t float_to_fp16(float x) {
  const uint32_t u = bits_of(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  // normal half (a >= 2^-14): rebias the exponent by -112 and round 13 mantissa bits away
  const uint32_t normal = (a - (112u << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  // subnormal half (2^-25 <= a < 2^-14): shift the full significand right by 126 - exponent
  const uint32_t exp = a >> 23;
  const uint32_t sig = (a & 0x7FFFFFu) | 0x800000u;
  const uint32_t shift = 126u - exp;                       // 14 .. 24 when used
  const uint32_t safe_shift = (exp >= 102u && exp < 113u) ? shift : 24u;
  const uint32_t kept = sig >> safe_shift;
  const uint32_t rem = sig & ((1u << safe_shift) - 1u);
  const uint32_t half = 1u << (safe_shift - 1u);
  const uint32_t sub = kept + ((rem > half || (rem == half && (kept & 1u))) ? 1u : 0u);
  uint32_t h = a >= 0x38800000u ? normal : (exp >= 102u ? sub : 0u);
  h = a >= 0x477FF000u ? 0x7C00u : h;                                   // rounds to infinity
  h = a > 0x7F800000u ? (0x7E00u | ((a >> 13) & 0x3FFu)) : h;          // NaN stays a (quiet) NaN
  return static_cast<uint16_t>(sign | h);
}

// ---------------------------------------------------------------------------------------------
// The element formulas of the backend contract (hosl/ops/backends/__init__.py).
// ---------------------------------------------------------------------------------------------

// perturb: out = round(w + scale * z)
HOSL_HOST_DEVICE float perturb_element(float w, float scale, float z) { return fadd(w, fmul(scale, z)); }

// zo_update: acc = w - decay * w, then acc = acc - coeff_q * z_q for each q in order
HOSL_HOST_DEVICE float update_start(float w, float decay) { return fsub(w, fmul(decay, w)); }
HOSL_HOST_DEVICE float update_step(float acc, float coeff, float z) { return fsub(acc, fmul(coeff, z)); }

// Storage types: how each dtype loads to and stores from float32.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct Float32Storage {
  using T = float;
  HOSL_HOST_DEVICE static float load(float v) { return v; }
  HOSL_HOST_DEVICE static float store(float v) { return v; }
};
struct Float16Storage {
  using T = uint16_t;
  HOSL_HOST_DEVICE static float load(uint16_t v) { return fp16_to_float(v); }
  HOSL_HOST_DEVICE static uint16_t store(float v) { return float_to_fp16(v); }
};
struct BFloat16Storage {
  using T = uint16_t;
  HOSL_HOST_DEVICE static float load(uint16_t v) { return bf16_to_float(v); }
  HOSL_HOST_DEVICE static uint16_t store(float v) { return float_to_bf16(v); }
};

}  // namespace hosl
