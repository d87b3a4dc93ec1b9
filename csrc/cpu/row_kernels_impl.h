// The row kernels of token_logprobs, linear_token_logprobs and the fused policy loss (docs/ops.md section 2),
// compiled once per CPU ISA.
//
// This header is included by csrc/cpu/isa/row_kernels_<isa>.cpp, each of which defines the
// CPU_CAPABILITY macros and is compiled with that ISA's flags (-mavx2 -mfma, -mavx512f ..., or none).
// ATen's at::vec::Vectorized<float> only becomes real SIMD code under those macros and flags; built
// without them it is a scalar emulation (measured: 366 ms vs 44 ms per forward at fp32 [4096, 32000]).
// Everything here lives in namespace reasonrl::CPU_CAPABILITY so the variants never collide at link time;
// row_kernels() (csrc/cpu/cpu_utils.h) picks one at run time (at::get_cpu_capability(), which honours the
// ATEN_CPU_CAPABILITY environment variable exactly as ATen's own kernels do).
//
// Numerics (all fp32 for fp32/bf16/fp16 input; fp64 for fp64 input, scalar code):
//  * One streaming pass per row over the vocabulary in chunks of kChunk columns. Pass 1 reads the chunk
//    (the raw maximum and the rank count), then pass 2 re-reads it from L1 and accumulates s = sum exp(d_j)
//    and the SHIFTED entropy accumulator b = sum d_j exp(d_j), d_j = z_j - m (docs/ops.md 2.2), so
//    H = log s - b / s is a difference of two non-negative numbers and never cancels.
//  * One consistent scaling (docs/numerics.md): d_j is formed by ONE expression, RowShift::d, everywhere
//    (sums, log-prob, backward), with the shift m = (hi, lo) defined as that same expression's value at the
//    row's raw maximum. So d = 0 exactly at the maximum and d <= 0 elsewhere (the expression is monotone in
//    x), which gives s >= 1 (the maximum contributes exp(0) = 1 exactly), log s >= 0, lp = d_y - log s <= 0
//    and b <= 0, H >= 0 EXACTLY, with exact zeros for V = 1 and for rows with a single finite logit.
//  * The sums are taken in base 2 (docs/numerics.md section 7): t_j = d_j log2(e) by the same two-float
//    expression with log2(e) / tau in place of 1 / tau, s = sum 2^t_j, b = sum t_j 2^t_j, converted to
//    natural logs once per row (finish_row). Everything said here of d holds for t.
//  * The running maximum starts at -inf; a chunk whose maximum is -inf is skipped and the rescale factor is
//    0 (never exp(-inf - -inf)). Terms with z = -inf are masked out of b (never -inf * 0).
//  * Cross-chunk sums are kept in double: the per-chunk vector partial sums are fp32 over at most kChunk
//    terms, so a 150k vocabulary loses no digits to the long sum.
//  * NaN / +inf logits propagate: the maximum is NaN-propagating (at::vec::maximum), so the row's LSE,
//    log-prob and entropy become NaN, and the Python layer reports it.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "row_kernels.h"

namespace reasonrl {
inline namespace CPU_CAPABILITY {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kChunk = 2048;  // 8 KiB of fp32: the chunk buffer stays in L1 between the two passes

// Horizontal sum of one vector, in double.
inline double hsum(const fVec& v) {
  alignas(64) float lanes[fVec::size()];
  v.store(lanes);
  double t = 0.0;
  for (int64_t l = 0; l < fVec::size(); ++l) t += lanes[l];
  return t;
}

template <typename scalar_t>
inline fVec load_f(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return fVec::loadu(p);
  } else {
    fVec x;
    at::vec::load_to_float<scalar_t>(p, x);
    return x;
  }
}

// The exponentials are taken in base 2 (docs/numerics.md section 7): the kernels scale the logits by
// log2(e) / tau instead of 1 / tau, with that factor held as two floats exactly as 1 / tau was (InvTau), so
// the exponent t = log2(e) (z - m) comes out of the same two FMAs with the same one rounding of the result:
// |t| 2^-24 absolute, i.e. |d| 2^-24 in d = t ln 2, as before. 2^t then needs no Cody-Waite reduction
// (t = n + f is exact): 9 vector instructions per 2^t on AVX2, 7 on AVX-512, against 16 for the former
// exp(d) (degree-7 Taylor after a two-constant reduction, then a compare and blend for the underflow).
constexpr double kLog2e = 1.4426950408889634074;
constexpr double kLn2 = 0.69314718055994530942;
// Callers clamp t at kMinT first, where 2^t is exactly 0 (so a -inf logit gives 0 and an entropy term
// t 2^t = kMinT * 0 = 0, never -inf * 0). AVX2 / default: -127, from the integer construction of 2^n below
// (2^t = 0 for t < -126.5). AVX-512: -151, below the smallest subnormal (vscalefps underflows gradually, so
// 2^t for t in [-151, -126) is the subnormal value instead of 0: a difference below 1.2e-38 per term).
#if defined(CPU_CAPABILITY_AVX512)
constexpr float kMinT = -151.f;
#else
constexpr float kMinT = -127.f;

// 2^n from kf = n + (1.5 * 2^23 + 127) (n an integer in [-127, 127]): the low mantissa bits of kf hold
// n + 127 + 2^22, and shifting the bit pattern left by 23 keeps exactly n + 127 as the exponent field, with a
// zero mantissa. n = -127 leaves an all-zero pattern, +0.0: that is how 2^t flushes to exactly 0 at kMinT
// without a compare and blend. Written with intrinsics because ATen's float<->int reinterpret helpers are
// scalar loops for these types.
inline fVec pow2_from_shifted(const fVec& kf) {
#if defined(CPU_CAPABILITY_AVX2)
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(kf), 23));
#else
  alignas(64) float lanes[fVec::size()];
  kf.store(lanes);
  for (int64_t l = 0; l < fVec::size(); ++l) {
    uint32_t bits;
    std::memcpy(&bits, &lanes[l], sizeof(bits));
    bits <<= 23;
    std::memcpy(&lanes[l], &bits, sizeof(bits));
  }
  return fVec::loadu(lanes);
#endif
}
#endif

// 2^t for t in [kMinT, 127] (the caller clamps). t = n + f with n = round(t) to nearest and f = t - n exact,
// |f| <= 1/2; 2^f by a degree-5 polynomial with constant term 1, Horner with FMAs, minimax for the error in
// ulps of the result over [-1/2, 1/2] (fitted in double; 1.05 ulp, 1.08 with the coefficients rounded to
// float). Then 2^n: AVX-512 vrndscaleps for n and vscalefps for p 2^n; AVX2 / default by adding
// 1.5 * 2^23 + 127 (rounds t to an integer) and pow2_from_shifted. The same n, f and p on every ISA, so the
// results agree bit for bit wherever they are normal. Measured against exp2 in double over every float in
// [-126, 0.5] (docs/numerics.md section 7): at most 1.80 ulp. 2^f(0) = 1 exactly, so 2^0 = 1: the row
// maximum contributes exactly 1 to s (docs/numerics.md section 2). No range-check branch and no blend.
inline fVec vexp2(const fVec& tc) {
#if defined(CPU_CAPABILITY_AVX512)
  const fVec n = _mm512_roundscale_ps(tc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const fVec f = tc - n;
#else
  const fVec shifter(12583039.f);  // 1.5 * 2^23 + 127
  const fVec kf = tc + shifter;
  const fVec f = tc - (kf - shifter);
#endif
  fVec poly(1.3225708e-3f);
  poly = at::vec::fmadd(poly, f, fVec(9.6717635e-3f));
  poly = at::vec::fmadd(poly, f, fVec(5.5508915e-2f));
  poly = at::vec::fmadd(poly, f, fVec(2.4022236e-1f));
  poly = at::vec::fmadd(poly, f, fVec(6.931468e-1f));
  poly = at::vec::fmadd(poly, f, fVec(1.f));
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_scalef_ps(poly, n);
#else
  return poly * pow2_from_shifted(kf);
#endif
}

// InvTau::shifted on vectors: fma(x, lo, fma(x, hi, -m)), both with one rounding. The base-2 exponent needs
// true FMAs: t(x_max) = 0 exactly needs the vector expression to round as the scalar one that defines m_lo,
// and a separately rounded x * log2(e) / tau would add |x / tau| 2^-24 (the former natural-log kernel had
// lo = 0 and hi = 1 at tau = 1, so there it did not matter). AVX2 / AVX-512 are built with -mfma, where
// at::vec::fmadd / fmsub are vfmadd / vfmsub; the portable build's Vectorized ones are a multiply and an
// add, so it goes lane by lane through std::fma (the portable build is the fallback for CPUs without AVX2,
// not a fast path).
inline fVec shifted_vec(const fVec& x, const fVec& hi, const fVec& lo, const fVec& m) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return at::vec::fmadd(x, lo, at::vec::fmsub(x, hi, m));
#else
  alignas(64) float lx[fVec::size()], lh[fVec::size()], ll[fVec::size()], lm[fVec::size()];
  x.store(lx);
  hi.store(lh);
  lo.store(ll);
  m.store(lm);
  for (int64_t l = 0; l < fVec::size(); ++l) lx[l] = std::fma(lx[l], ll[l], std::fma(lx[l], lh[l], -lm[l]));
  return fVec::loadu(lx);
#endif
}

// max(t, lo) with NaN -> lo, in one instruction: (v)maxps returns its second operand when either is NaN.
// The forward's sum pass uses it instead of clamping -inf logits to -FLT_MAX first: a -inf logit gives
// t = -inf or NaN (-inf * lo2 + -inf), and both become kMinT. Only where a NaN t cannot come from a NaN
// logit (rows with NaN logits are skipped before the sum pass); the backward keeps NaN-propagating clamps.
inline fVec clamp_t_nan(const fVec& t, const fVec& lo) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_max_ps(t, lo);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_max_ps(t, lo);
#else
  return fVec::blendv(lo, t, t > lo);
#endif
}

// The scalar form of vexp2, for the tails of the vector loops (0 below -126.5 on every ISA).
inline float exp2_clamped(float tc) { return tc < -126.5f ? 0.f : std::exp2(tc); }

// 1/tau as an unevaluated sum hi + lo of two floats (lo = 0 when tau = 1 or a power of two), so that
// z - m = fma(x, lo, fma(x, hi, -m)) is x / tau - m to about one rounding of the (small) result: more
// accurate than rounding z = x / tau first, as the fp32 reference does. With hi alone, the rounding of
// 1/tau scales every z of the row by (1 + 6e-8): at |z| ~ 10 that is ~5e-7 in log p, over the gradient
// budget of docs/ops.md section 8.
// InvTau(tau, kLog2e) is log2(e) / tau in the same form: the base-2 exponent t = d log2(e) of the sums.
struct InvTau {
  float hi, lo;
  explicit InvTau(float tau, double scale = 1.0) {
    const double inv = scale / static_cast<double>(tau);
    hi = static_cast<float>(inv);
    lo = static_cast<float>(inv - static_cast<double>(hi));
  }
  // fma(x, lo, fma(x, hi, -m)): x / tau - m_hi (-inf stays -inf: the two-term product would add
  // -inf * lo = +inf to -inf when lo < 0).
  float shifted(float x, float m_hi) const {
    if (x == -std::numeric_limits<float>::infinity()) return x - m_hi;
    return std::fma(x, lo, std::fma(x, hi, -m_hi));
  }
};

// The row shift m = hi + lo of the scaled logits z = x / tau, as two floats, and THE expression of
// d = z - m used everywhere: d(x) = shifted(x, hi) - lo. The shift is defined from the row's raw maximum
// x_max (tau > 0, so it is also the maximum of z): hi = fl(x_max * inv.hi), lo = shifted(x_max, hi). Then
// d(x_max) = lo - lo = 0 exactly, and d(x) < 0 for every x < x_max: shifted(x, hi) is x (inv.hi + inv.lo)
// - hi to one rounding of the result, a decrease of at least ulp(x_max) / tau from x_max, against rounding
// errors ~1e-7 of that decrease (docs/numerics.md). With a single float shift m = fl(x_max / tau) instead,
// d(x_max) is the rounding error of m, up to ~6e-8 |m| of either sign, and rows dominated by one token got
// lp > 0 and H < 0 (about half of them at T = 0.7).
struct RowShift {
  float hi = -std::numeric_limits<float>::infinity();
  float lo = 0.f;
  static RowShift at_max(float x_max, const InvTau& inv) {
    RowShift m;
    if (x_max == -std::numeric_limits<float>::infinity()) return m;
    m.hi = x_max * inv.hi;
    m.lo = inv.shifted(x_max, m.hi);
    return m;
  }
  float d(float x, const InvTau& inv) const { return inv.shifted(x, hi) - lo; }
  // m as one double (hi + lo is exact in double unless lo is below 2^-29 |hi|, where it does not matter).
  double value() const { return static_cast<double>(hi) + static_cast<double>(lo); }
};

// Lane-wise maximum that ignores NaN ordering (vmaxps): NaN is detected separately, once per chunk.
inline fVec fast_max(const fVec& a, const fVec& b) { return at::vec::clamp_min(a, b); }

// Pass 1 over a chunk of n raw logits: NaN-propagating maximum of the RAW values (tau > 0, so
// max(x) / tau is max(z) exactly: rounding is monotone) and, if wanted, #{x_j > x_label}.
// kAcc independent accumulators: at::vec::maximum is a max, an unordered compare and an or, and each
// vector's result feeds the next one's. With a single accumulator that chain (~10 cycles per vector on
// AVX-512, measured on AMD Zen 5) made this pass, not the exponentials, most of the forward's time; with 8
// chains it takes ~1.5 cycles per vector. The maximum is exact in any order (and so is the count), so the
// result is bit for bit the single-chain one.
template <typename scalar_t, bool kRank>
inline float chunk_max(const scalar_t* src, int64_t n, float x_label, int64_t* rank_count) {
  constexpr int64_t W = fVec::size();
  constexpr int kAcc = 8;
  const fVec vlab(x_label), one(1.f);
  fVec vmaxs[kAcc], vcnts[kAcc];  // counts held as floats: exact up to 2^24 per lane, far above kChunk
  for (int u = 0; u < kAcc; ++u) {
    vmaxs[u] = fVec(-std::numeric_limits<float>::infinity());
    vcnts[u] = fVec(0.f);
  }
  int64_t j = 0;
  for (; j + kAcc * W <= n; j += kAcc * W) {
    for (int u = 0; u < kAcc; ++u) {
      const fVec x = load_f(src + j + u * W);
      if constexpr (kRank) vcnts[u] = vcnts[u] + (one & (x > vlab));
      vmaxs[u] = at::vec::maximum(vmaxs[u], x);  // IEEE maximum: NaN-propagating
    }
  }
  for (; j + W <= n; j += W) {
    const fVec x = load_f(src + j);
    if constexpr (kRank) vcnts[0] = vcnts[0] + (one & (x > vlab));
    vmaxs[0] = at::vec::maximum(vmaxs[0], x);
  }
  fVec vmax = vmaxs[0], vcnt = vcnts[0];
  for (int u = 1; u < kAcc; ++u) {
    vmax = at::vec::maximum(vmax, vmaxs[u]);
    if constexpr (kRank) vcnt = vcnt + vcnts[u];
  }
  alignas(64) float lanes[W];
  vmax.store(lanes);
  float m = -std::numeric_limits<float>::infinity();
  bool nan = false;
  for (int64_t l = 0; l < W; ++l) {
    nan |= std::isnan(lanes[l]);
    m = std::max(m, lanes[l]);
  }
  int64_t cnt = 0;
  if constexpr (kRank) {
    vcnt.store(lanes);
    for (int64_t l = 0; l < W; ++l) cnt += static_cast<int64_t>(lanes[l]);
  }
  for (; j < n; ++j) {
    const float x = static_cast<float>(src[j]);
    if constexpr (kRank) cnt += (x > x_label);
    nan |= std::isnan(x);
    m = std::max(m, x);
  }
  if constexpr (kRank) *rank_count += cnt;
  return nan ? std::numeric_limits<float>::quiet_NaN() : m;
}

// Pass 2 over the same (L1-resident) chunk, in base 2: `inv` = InvTau(tau, kLog2e) and `m` the row shift
// in those units, so t = RowShift::d(x) = log2(e) (z - m) <= 0, and s += sum 2^t, b += sum t 2^t (b in
// base-2 units: the natural b of docs/ops.md 2.2 is b ln 2, formed once per row by the caller).
// t is clamped at kMinT first (clamp_t_nan), where 2^t is exactly 0, so a -inf logit (t = -inf or NaN)
// gives 2^t = 0 and a term kMinT * 0 = 0, never -inf * 0. Per vector on AVX-512: 3 instructions for t
// (the load folds into the first FMA), 1 clamp, 7 for 2^t, 2 for the sums: 13, against 22 before base 2
// (docs/numerics.md section 7). Four independent accumulator pairs hide the latency of the polynomial. The
// per-chunk vector sums are fp32 over at most kChunk terms, folded into the row's double sums once per chunk.
// With kStore, 2^t of every column is also written to e_out[0, n) (the fused loss reuses it, see
// fused_rows_vec).
template <typename scalar_t, bool kEntropy, bool kStore = false>
inline void chunk_sum_exp(const scalar_t* src, int64_t n, const InvTau& inv, const RowShift& m, double* s,
                          double* b, float* e_out = nullptr) {
  constexpr int64_t W = fVec::size();
  const fVec vhi(inv.hi), vlo(inv.lo), vm(m.hi), vmlo(m.lo), vmin_t(kMinT);
  fVec s0(0.f), s1(0.f), s2(0.f), s3(0.f), b0(0.f), b1(0.f), b2(0.f), b3(0.f);
  auto step = [&](const scalar_t* p, fVec& sa, fVec& ba) {
    const fVec x = load_f(p);
    const fVec t = shifted_vec(x, vhi, vlo, vm) - vmlo;  // RowShift::d
    const fVec tc = clamp_t_nan(t, vmin_t);
    const fVec e = vexp2(tc);
    if constexpr (kStore) e.store(e_out + (p - src));
    sa = sa + e;
    if constexpr (kEntropy) ba = at::vec::fmadd(tc, e, ba);
  };
  int64_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W) {
    // Pass 2 is compute-bound and pass 1 memory-bound: fetch the next chunk while computing this one so
    // the two overlap (prefetching past the row end is harmless: prefetches never fault).
    // One prefetch per 64-byte line of the next chunk's slice under this step.
    constexpr int64_t kLines = (static_cast<int64_t>(sizeof(scalar_t)) * 4 * W + 63) / 64;
    for (int64_t l = 0; l < kLines; ++l)
      __builtin_prefetch(reinterpret_cast<const char*>(src + j + kChunk) + 64 * l);
    step(src + j, s0, b0);
    step(src + j + W, s1, b1);
    step(src + j + 2 * W, s2, b2);
    step(src + j + 3 * W, s3, b3);
  }
  for (; j + W <= n; j += W) step(src + j, s0, b0);
  double st = hsum((s0 + s1) + (s2 + s3));
  double bt = kEntropy ? hsum((b0 + b1) + (b2 + b3)) : 0.0;
  for (; j < n; ++j) {
    const float tc = std::max(m.d(static_cast<float>(src[j]), inv), kMinT);  // as the vector loop
    const float e = exp2_clamped(tc);
    if constexpr (kStore) e_out[j] = e;
    st += e;
    if constexpr (kEntropy) bt += static_cast<double>(tc) * e;
  }
  *s += st;
  *b += bt;
}

// A row's outputs from its base-2 sums (chunk_sum_exp): s = sum 2^t_j, b = sum t_j 2^t_j, and the label's
// t_y = RowShift::d(x_y), exactly the exponent the sums used for the label column. lp = t_y ln 2 - log s and
// H = log s - (b ln 2) / s in double: t_y <= 0 and s >= 1, so lp <= 0; b <= 0, so H >= 0 (see the header
// comment). stats = (m_e.hi, log s + m_e.lo) with m_e the natural-log shift of the same raw maximum x_max
// (RowShift::at_max(x_max, InvTau(tau))), as before the sums moved to base 2: the backward's label term
// shifted(x_y, m_e.hi) - stats[1] is then exactly -log s at the maximum (0 for a single candidate: an exactly
// zero gradient), and m_e.hi + stats[1] is the LSE. m_e and the base-2 shift both hold x_max / tau to ~2^-48
// relative, so mixing them costs nothing measurable. All -inf row: x_max = -inf, s = 0 -> LSE = -inf,
// lp = NaN, H = NaN (docs/ops.md 2.2).
struct RowOut {
  double lse, lp, h;
  float stats0, stats1;
};
inline RowOut finish_row(float x_max, const InvTau& inv_e, double s, double b, float t_y) {
  RowOut o;
  const double log_s = std::log(s);
  const RowShift m_e = RowShift::at_max(x_max, inv_e);
  o.stats0 = m_e.hi;
  o.stats1 = static_cast<float>(log_s + m_e.lo);
  o.lse = m_e.value() + log_s;
  o.lp = static_cast<double>(t_y) * kLn2 - log_s;
  o.h = log_s - (b * kLn2) / s;
  return o;
}

// The running sums rescaled to a larger shift: delta = m - m_new (base 2) < 0 mathematically, clamped at 0
// only to guard the sign of b (<= 0) against rounding; s, b are multiplied by 2^delta and b gains delta s.
inline void rescale_sums(const RowShift& m, const RowShift& m_new, double* s, double* b) {
  const double delta = std::min(
      (static_cast<double>(m.hi) - m_new.hi) + (static_cast<double>(m.lo) - m_new.lo), 0.0);
  const double alpha = std::exp2(delta);
  *b = alpha * (*b + delta * *s);
  *s *= alpha;
}

// Forward for rows [begin, end): fp32 arithmetic, vectorised. Each chunk of kChunk columns is read from
// memory once (pass 1) and again from L1 (pass 2).
template <typename scalar_t, bool kEntropy, bool kRank>
void fwd_rows_vec(const RowArgs<scalar_t>& a, int64_t begin, int64_t end) {
  const float kInf = std::numeric_limits<float>::infinity();
  const float kNaN = std::numeric_limits<float>::quiet_NaN();
  for (int64_t r = begin; r < end; ++r) {
    const int64_t y = a.labels[r];
    const LabelSlot slot = label_slot(a, y);
    if (!slot.valid) {
      const float fill = y == a.ignore_index ? 0.f : kNaN;
      a.logprobs[r] = a.lse[r] = a.stats[2 * r] = a.stats[2 * r + 1] = fill;
      if constexpr (kEntropy) a.entropy[r] = fill;
      if constexpr (kRank) a.rank[r] = 0;
      continue;
    }
    const float tau = row_temperature(a, r);
    if (!temperature_ok(tau)) {
      a.logprobs[r] = a.lse[r] = a.stats[2 * r] = a.stats[2 * r + 1] = kNaN;
      if constexpr (kEntropy) a.entropy[r] = kNaN;
      if constexpr (kRank) a.rank[r] = 0;
      continue;
    }
    const scalar_t* row = a.logits + r * a.row_stride;
    const InvTau inv(tau, kLog2e);  // base 2: t = log2(e) (z - m), see chunk_sum_exp
    // x_label = -inf on a rank that does not own the label (vocab-parallel): lp = -inf below, and the rank
    // count uses the pivot shared by the owner instead.
    const float x_label = slot.local >= 0 ? static_cast<float>(row[slot.local]) : -kInf;
    const float x_pivot = a.label_logit ? a.label_logit[r] : x_label;
    float x_m = -kInf;  // running raw maximum, and the shift it defines
    RowShift m;
    bool bad = false;   // NaN or +inf logits
    double s = 0.0, b = 0.0;
    int64_t rank_count = 0;
    for (int64_t c0 = 0; c0 < a.vocab; c0 += kChunk) {
      const int64_t n = std::min(kChunk, a.vocab - c0);
      const float x_max = chunk_max<scalar_t, kRank>(row + c0, n, x_pivot, &rank_count);
      // NaN or +inf logits make the row NaN (docs/ops.md section 7); keep scanning only to finish the rank.
      bad |= std::isnan(x_max) || x_max == kInf;
      if (bad) continue;
      const float x_new = std::max(x_m, x_max);
      if (x_new == -kInf) continue;  // every column so far is -inf: nothing to add, nothing to rescale
      if (x_new != x_m) {
        const RowShift m_new = RowShift::at_max(x_new, inv);
        // Rescale the running sums to the new shift (never 2^(-inf - -inf)).
        if (x_m != -kInf) rescale_sums(m, m_new, &s, &b);
        m = m_new;
        x_m = x_new;
      }
      chunk_sum_exp<scalar_t, kEntropy>(row + c0, n, inv, m, &s, &b);
    }
    if (bad) {
      a.logprobs[r] = a.lse[r] = a.stats[2 * r] = a.stats[2 * r + 1] = kNaN;
      if constexpr (kEntropy) a.entropy[r] = kNaN;
      if constexpr (kRank) a.rank[r] = static_cast<int32_t>(1 + rank_count - (slot.local >= 0 && x_label > x_pivot));
      continue;
    }
    const RowOut o = finish_row(x_m, InvTau(tau), s, b, m.d(x_label, inv));
    a.lse[r] = static_cast<float>(o.lse);
    a.logprobs[r] = slot.local >= 0 ? static_cast<float>(o.lp) : -kInf;
    a.stats[2 * r] = o.stats0;
    a.stats[2 * r + 1] = o.stats1;
    if constexpr (kEntropy) a.entropy[r] = static_cast<float>(o.h);
    // The label column is excluded by index (docs/ops.md 3.3): with a shared pivot (vocab-parallel linear op: a
    // dot product, not this tile's x_y) the owner's own x_y may exceed the pivot by GEMM rounding.
    if constexpr (kRank) a.rank[r] = static_cast<int32_t>(1 + rank_count - (slot.local >= 0 && x_label > x_pivot));
  }
}

// Neumaier's compensated sum (Kahan-Babuska): sum + comp is the running total to about one rounding,
// whatever the number of terms. Used by the fp64 kernel, whose plain sequential sum lost ~V/2 ulp at large
// V (LSE 9-110x the error of torch.logsumexp at V = 40000; docs/numerics.md).
template <typename T>
struct CompensatedSum {
  T sum = 0, comp = 0;
  void add(T v) {
    const T t = sum + v;
    comp += std::abs(sum) >= std::abs(v) ? (sum - t) + v : (v - t) + sum;
    sum = t;
  }
  T value() const { return sum + comp; }
  void scale(T alpha) {  // fold the compensation in before rescaling (one rounding per rescale)
    sum = alpha * (sum + comp);
    comp = 0;
  }
};

// Forward for rows [begin, end), scalar code in the accumulation type (fp64: gradcheck and users who want
// exact numbers). z = x / tau is rounded once and used everywhere (the maximum, the sums, the label), so
// d = z - m is 0 at the maximum and <= 0 elsewhere: lp <= 0 and H >= 0 exactly, as in the fp32 kernel.
// s and b are compensated sums, so the error does not grow with V.
template <typename scalar_t, bool kEntropy, bool kRank>
void fwd_rows_scalar(const RowArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = typename RowArgs<scalar_t>::acc_t;
  const acc_t kInf = std::numeric_limits<acc_t>::infinity();
  const acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();
  for (int64_t r = begin; r < end; ++r) {
    const int64_t y = a.labels[r];
    const LabelSlot slot = label_slot(a, y);
    const acc_t tau = static_cast<acc_t>(row_temperature(a, r));
    if (!slot.valid || !temperature_ok(tau)) {
      const acc_t fill = y == a.ignore_index ? acc_t(0) : kNaN;
      a.logprobs[r] = a.lse[r] = a.stats[2 * r] = a.stats[2 * r + 1] = fill;
      if constexpr (kEntropy) a.entropy[r] = fill;
      if constexpr (kRank) a.rank[r] = 0;
      continue;
    }
    const scalar_t* row = a.logits + r * a.row_stride;
    const bool owner = slot.local >= 0;  // vocab-parallel: the label may live on another rank
    const acc_t x_label = owner ? static_cast<acc_t>(row[slot.local]) : -kInf;
    // The rank compares the raw logits in their own precision (fp64 for fp64: docs/ops.md 2.1 says raw logits;
    // an fp32-rounded comparison ranked 1.0 + 1e-12 level with 1.0).
    const acc_t x_pivot = a.label_logit ? a.label_logit[r] : x_label;
    acc_t m = -kInf;
    CompensatedSum<acc_t> s, b;
    int64_t rank_count = 0;
    bool saw_nan = false;
    for (int64_t c0 = 0; c0 < a.vocab; c0 += kChunk) {
      const int64_t n = std::min(kChunk, a.vocab - c0);
      acc_t m_blk = -kInf;
      for (int64_t j = 0; j < n; ++j) {
        const acc_t z = static_cast<acc_t>(row[c0 + j]) / tau;
        saw_nan |= std::isnan(z);
        m_blk = std::max(m_blk, z);
        if constexpr (kRank) rank_count += (static_cast<acc_t>(row[c0 + j]) > x_pivot);
      }
      const acc_t m_new = std::max(m, m_blk);
      if (saw_nan || m_new == -kInf) continue;
      if (m != -kInf && m_new != m) {
        const acc_t delta = m - m_new;  // < 0
        const acc_t alpha = std::exp(delta);
        if constexpr (kEntropy) {
          b.add(delta * s.value());
          b.scale(alpha);
        }
        s.scale(alpha);
      }
      for (int64_t j = 0; j < n; ++j) {
        const acc_t d = static_cast<acc_t>(row[c0 + j]) / tau - m_new;  // the z of the maximum above
        const acc_t e = std::exp(d);
        s.add(e);
        if constexpr (kEntropy) {
          if (e > 0) b.add(d * e);
        }
      }
      m = m_new;
    }
    if (saw_nan) m = kNaN;
    const acc_t sum = s.value();
    const acc_t log_s = std::log(sum);
    a.lse[r] = m + log_s;
    a.logprobs[r] = owner ? (x_label / tau - m) - log_s : -kInf;
    a.stats[2 * r] = m;
    a.stats[2 * r + 1] = log_s;
    if constexpr (kEntropy) a.entropy[r] = log_s - b.value() / sum;
    // The label column is excluded by index (docs/ops.md 3.3), as above.
    if constexpr (kRank) a.rank[r] = static_cast<int32_t>(1 + rank_count - (owner && x_label > x_pivot));
  }
}

// Backward for rows [begin, end) (docs/ops.md 2.3):
//   dz_j = g_lp (1[j=y] - p_j) - g_H p_j (z_j - mu),  mu = LSE - H,  dx_j = dz_j / tau,
// with log p_j = d_j = (x_j / tau - m) - log_sum, x_j / tau - m formed as in the forward's sums, so each
// row's p_j sum to 1 to fp32 rounding (the gradient row-sum invariant) even for |logits| ~ 1e4. As
// z_j - mu = d_j + H, for j != y:  dx_j = p_j (c0 + c1 d_j), c0 = -(g_lp + g_H H) / tau, c1 = -g_H / tau,
// evaluated in base 2 (t_j = d_j log2(e), p_j = 2^t_j; docs/numerics.md section 7). d = -inf gives p = 0
// and, with t clamped at kMinT (where p is exactly 0), a finite coefficient: the product is 0, never 0 * inf. The label column is rewritten from a scalar evaluation of
// the full formula, so a 16-bit gradient is rounded once.
template <typename scalar_t>
void bwd_rows_vec(const BwdArgs<scalar_t>& a, int64_t begin, int64_t end) {
  constexpr int64_t W = fVec::size();
  alignas(64) float buf[kChunk];
  for (int64_t r = begin; r < end; ++r) {
    scalar_t* grow = a.grad + r * a.grad_row_stride;
    const int64_t y = a.labels[r];
    const float g_lp = a.grad_logprobs ? a.grad_logprobs[r] : 0.f;
    const float g_h = a.grad_entropy ? a.grad_entropy[r] : 0.f;
    const float tau = row_temperature(a, r);
    const LabelSlot slot = label_slot(a, y);
    if (!slot.valid || !temperature_ok(tau) || (g_lp == 0.f && g_h == 0.f)) {
      std::fill(grow, grow + a.vocab, static_cast<scalar_t>(0.f));
      continue;
    }
    const scalar_t* row = a.logits + r * a.row_stride;
    const InvTau inv(tau);
    const float inv_tau = inv.hi;
    const float m = a.stats[2 * r], log_sum = a.stats[2 * r + 1];
    const float h = a.grad_entropy ? a.entropy[r] : 0.f;
    // Read the label logit before the row is overwritten (the in-place backward aliases grad and logits).
    // A rank that does not own the label (vocab-parallel) has no one-hot term: every column is j != y.
    const bool owner = slot.local >= 0;
    const float d_y = owner ? inv.shifted(static_cast<float>(row[slot.local]), m) - log_sum : 0.f;
    const float c0 = -(g_lp + g_h * h) * inv_tau;
    const float c1 = -g_h * inv_tau;
    // The vector loop in base 2 (as the forward's sums): t_j = log2 p_j = fma(x, lo2, fma(x, hi2, -L_hi))
    // - L_lo with log2(e) / tau = hi2 + lo2 and L = (m + log_sum) log2(e) = L_hi + L_lo (split in double
    // from the two stats), so t_j has one rounding of the result as d_j had; p_j = 2^t_j and the
    // coefficient is c0 + (c1 ln 2) t_j. t is clamped at kMinT, where p = 0 exactly, so the coefficient
    // stays finite.
    const InvTau inv2(tau, kLog2e);
    const double big_l = (static_cast<double>(m) + static_cast<double>(log_sum)) * kLog2e;
    const float l_hi = static_cast<float>(big_l);
    const float l_lo = static_cast<float>(big_l - static_cast<double>(l_hi));
    const float c1_2 = static_cast<float>(static_cast<double>(c1) * kLn2);
    const fVec vhi(inv2.hi), vlo(inv2.lo), vl_hi(l_hi), vl_lo(l_lo), vc0(c0), vc1(c1_2), vmin_t(kMinT);
    const fVec vmin(std::numeric_limits<float>::lowest());
    auto grad_of = [&](const fVec& x_raw) {
      const fVec x = fast_max(x_raw, vmin);  // -inf -> -FLT_MAX: keeps x * lo finite (see InvTau)
      const fVec tc = fast_max(shifted_vec(x, vhi, vlo, vl_hi) - vl_lo, vmin_t);
      return vexp2(tc) * at::vec::fmadd(vc1, tc, vc0);
    };
    for (int64_t c = 0; c < a.vocab; c += kChunk) {
      const int64_t n = std::min(kChunk, a.vocab - c);
      const scalar_t* src = row + c;
      // fp32 writes straight to the gradient row; 16-bit types go through an fp32 L1 buffer and one
      // vectorised conversion per chunk.
      float* dst = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(grow + c) : buf;
      int64_t j = 0;
      for (; j + 2 * W <= n; j += 2 * W) {
        const fVec g0 = grad_of(load_f(src + j));
        const fVec g1 = grad_of(load_f(src + j + W));
        g0.store(dst + j);
        g1.store(dst + j + W);
      }
      for (; j + W <= n; j += W) grad_of(load_f(src + j)).store(dst + j);
      for (; j < n; ++j) {  // as the vector loop
        const float tc = std::max(inv2.shifted(static_cast<float>(src[j]), l_hi) - l_lo, kMinT);
        dst[j] = exp2_clamped(tc) * (c0 + c1_2 * tc);
      }
      if constexpr (!std::is_same_v<scalar_t, float>) at::vec::convert(buf, grow + c, n);
    }
    if (owner) {
      const float p_y = std::exp(d_y);
      const float dz_y = g_lp * (1.f - p_y) - g_h * p_y * (std::max(d_y, -200.f) + h);
      grow[slot.local] = static_cast<scalar_t>(dz_y * inv_tau);
    }
  }
}

template <typename scalar_t>
void bwd_rows_scalar(const BwdArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = typename RowArgs<scalar_t>::acc_t;
  for (int64_t r = begin; r < end; ++r) {
    scalar_t* grow = a.grad + r * a.grad_row_stride;
    const int64_t y = a.labels[r];
    const acc_t g_lp = a.grad_logprobs ? a.grad_logprobs[r] : acc_t(0);
    const acc_t g_h = a.grad_entropy ? a.grad_entropy[r] : acc_t(0);
    const acc_t tau = static_cast<acc_t>(row_temperature(a, r));
    const LabelSlot slot = label_slot(a, y);
    if (!slot.valid || !temperature_ok(tau)) {
      std::fill(grow, grow + a.vocab, static_cast<scalar_t>(0));
      continue;
    }
    const scalar_t* row = a.logits + r * a.row_stride;
    const acc_t m = a.stats[2 * r], log_sum = a.stats[2 * r + 1];
    const acc_t h = a.grad_entropy ? a.entropy[r] : acc_t(0);
    for (int64_t j = 0; j < a.vocab; ++j) {
      const acc_t d = (static_cast<acc_t>(row[j]) / tau - m) - log_sum;  // log p_j
      const acc_t p = std::exp(d);
      acc_t dz = (j == slot.local) ? g_lp : acc_t(0);  // local = -1: the label is on another rank
      if (d != -std::numeric_limits<acc_t>::infinity()) dz -= p * (g_lp + g_h * (d + h));
      grow[j] = static_cast<scalar_t>(dz / tau);
    }
  }
}

// The single-pass fused loss for rows [begin, end) (docs/losses.md 13.1; csrc/cpu/policy_loss.cpp): the forward
// sweep of fwd_rows_vec, which also keeps exp(z_j - m_c) of every column (m_c = the running maximum when the
// column's chunk was summed) in a row-sized fp32 scratch buffer; then `rg` turns the row's (lp, H) into the
// upstream gradients (g_lp, g_H); then one sweep writes the gradient of bwd_rows_vec, re-reading the row from
// cache (L2 for a 32k fp32 row) and taking p_j = exp(z_j - m_c) * exp(m_c - m - log s) from the scratch
// buffer instead of a second exponential: one exp per logit instead of two. p_j is within a few ulp of the
// backward kernel's 2^(log2 p_j); log p_j itself (the entropy term) is formed in natural units from the
// stats, as the backward's label column is. Writes
// lp, H, LSE and stats like the forward; `a.grad` may alias `a.logits` (each column is read before written).
template <typename scalar_t>
void fused_rows_vec(const BwdArgs<scalar_t>& a, int64_t begin, int64_t end, const RowGrad& rg) {
  constexpr int64_t W = fVec::size();
  const float kInf = std::numeric_limits<float>::infinity();
  const float kNaN = std::numeric_limits<float>::quiet_NaN();
  const int64_t n_chunks = (a.vocab + kChunk - 1) / kChunk;
  std::vector<float> ebuf(static_cast<size_t>(n_chunks * kChunk));
  std::vector<RowShift> chunk_m(static_cast<size_t>(n_chunks));
  alignas(64) float buf[kChunk];
  for (int64_t r = begin; r < end; ++r) {
    scalar_t* grow = a.grad + r * a.grad_row_stride;
    const int64_t y = a.labels[r];
    const float tau = row_temperature(a, r);
    const bool label_ok = y != a.ignore_index && y >= 0 && y < a.vocab;
    if (!label_ok || !temperature_ok(tau)) {
      const float fill = y == a.ignore_index ? 0.f : kNaN;
      a.logprobs[r] = a.lse[r] = a.stats[2 * r] = a.stats[2 * r + 1] = a.entropy[r] = fill;
      std::fill(grow, grow + a.vocab, static_cast<scalar_t>(0.f));
      continue;
    }
    const scalar_t* row = a.logits + r * a.row_stride;
    const InvTau inv2(tau, kLog2e), inv(tau);  // the sums in base 2 (as fwd_rows_vec); the gradient in base e
    const float x_label = static_cast<float>(row[y]);
    float x_m = -kInf;  // as fwd_rows_vec: the running raw maximum and the shift it defines
    RowShift m;
    bool bad = false;
    double s = 0.0, b = 0.0;
    int64_t unused_rank = 0;
    for (int64_t k = 0; k < n_chunks; ++k) {
      const int64_t c0 = k * kChunk, n = std::min(kChunk, a.vocab - c0);
      const float x_max = chunk_max<scalar_t, false>(row + c0, n, x_label, &unused_rank);
      bad |= std::isnan(x_max) || x_max == kInf;
      chunk_m[k] = RowShift();  // a skipped chunk contributes p = 0 (its scale below is 0)
      if (bad) continue;
      const float x_new = std::max(x_m, x_max);
      if (x_new == -kInf) continue;
      if (x_new != x_m) {
        const RowShift m_new = RowShift::at_max(x_new, inv2);
        if (x_m != -kInf) rescale_sums(m, m_new, &s, &b);
        m = m_new;
        x_m = x_new;
      }
      chunk_sum_exp<scalar_t, true, true>(row + c0, n, inv2, m, &s, &b, ebuf.data() + c0);
      chunk_m[k] = m;
    }
    const RowOut o = finish_row(x_m, inv, bad ? static_cast<double>(kNaN) : s, b, m.d(x_label, inv2));
    const double log_s = std::log(bad ? static_cast<double>(kNaN) : s);
    const float lp = static_cast<float>(o.lp);
    const float h = static_cast<float>(o.h);
    a.lse[r] = static_cast<float>(o.lse);
    a.logprobs[r] = lp;
    a.entropy[r] = h;
    a.stats[2 * r] = bad ? kNaN : o.stats0;
    a.stats[2 * r + 1] = o.stats1;
    double g_lp = 0.0, g_h = 0.0;
    if (!std::isnan(lp)) rg.fn(rg.ctx, r, lp, h, &g_lp, &g_h);  // NaN row: no gradient (reported upstream)
    if (g_lp == 0.0 && g_h == 0.0) {
      std::fill(grow, grow + a.vocab, static_cast<scalar_t>(0.f));
      continue;
    }
    const float fg_lp = static_cast<float>(g_lp), fg_h = static_cast<float>(g_h);
    const float inv_tau = inv.hi;
    // log p_j = shifted(x_j, M) - ls in natural units with the stats (M, ls) (the coefficient only: the
    // probabilities come from the stored 2^t).
    const float m_nat = a.stats[2 * r], ls = a.stats[2 * r + 1];
    const float c0 = -(fg_lp + fg_h * h) * inv_tau, c1 = -fg_h * inv_tau;
    const fVec vhi(inv.hi), vlo(inv.lo), vm(m_nat), vlog_sum(ls), vc0(c0), vc1(c1), lo(-200.f);
    const fVec vmin(std::numeric_limits<float>::lowest());
    for (int64_t k = 0; k < n_chunks; ++k) {
      const int64_t c = k * kChunk, n = std::min(kChunk, a.vocab - c);
      // p_j = e_j * exp((m_c - m) ln 2 - log s): the chunk's shift to the final maximum and normaliser.
      const RowShift& mc = chunk_m[k];
      const float scale = mc.hi == -kInf ? 0.f
          : static_cast<float>(std::exp(((static_cast<double>(mc.hi) - m.hi) + (static_cast<double>(mc.lo) -
                                                                                m.lo)) * kLn2 - log_s));
      const fVec vscale(scale);
      const scalar_t* src = row + c;
      const float* e = ebuf.data() + c;
      float* dst = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(grow + c) : buf;
      int64_t j = 0;
      for (; j + W <= n; j += W) {
        const fVec x = fast_max(load_f(src + j), vmin);
        const fVec d = at::vec::fmadd(x, vlo, at::vec::fmsub(x, vhi, vm)) - vlog_sum;
        const fVec p = fVec::loadu(e + j) * vscale;
        (p * at::vec::fmadd(vc1, fast_max(d, lo), vc0)).store(dst + j);
      }
      for (; j < n; ++j) {
        const float d = inv.shifted(static_cast<float>(src[j]), m_nat) - ls;
        dst[j] = (e[j] * scale) * (c0 + c1 * std::max(d, -200.f));
      }
      if constexpr (!std::is_same_v<scalar_t, float>) at::vec::convert(buf, grow + c, n);
    }
    const float dl = inv.shifted(x_label, m_nat) - ls;
    const float p_y = std::exp(dl);
    const float dz_y = fg_lp * (1.f - p_y) - fg_h * p_y * (std::max(dl, -200.f) + h);
    grow[y] = static_cast<scalar_t>(dz_y * inv_tau);
  }
}

// fp64: the forward and backward row kernels in sequence, row by row (the row stays in cache). The backward
// reads the upstream gradients from a.grad_logprobs / a.grad_entropy, the arrays the callback fills.
template <typename scalar_t>
void fused_rows_scalar(const BwdArgs<scalar_t>& a, int64_t begin, int64_t end, const RowGrad& rg) {
  for (int64_t r = begin; r < end; ++r) {
    fwd_rows_scalar<scalar_t, true, false>(a, r, r + 1);
    double g_lp = 0.0, g_h = 0.0;
    if (!std::isnan(a.logprobs[r]) && a.labels[r] != a.ignore_index) {
      rg.fn(rg.ctx, r, a.logprobs[r], a.entropy[r], &g_lp, &g_h);
    }
    bwd_rows_scalar<scalar_t>(a, r, r + 1);
  }
}

// The table of entry points this ISA variant exports (see row_kernels.h).
inline RowKernels make_row_kernels() {
  RowKernels k;
#define REASONRL_FILL(T, field_fwd, field_bwd, field_fused)                     \
  k.field_fwd[0] = &fwd_rows_vec<T, false, false>;                 \
  k.field_fwd[1] = &fwd_rows_vec<T, true, false>;                  \
  k.field_fwd[2] = &fwd_rows_vec<T, false, true>;                  \
  k.field_fwd[3] = &fwd_rows_vec<T, true, true>;                   \
  k.field_bwd = &bwd_rows_vec<T>;                                  \
  k.field_fused = &fused_rows_vec<T>;
  REASONRL_FILL(float, fwd_f32, bwd_f32, fused_f32)
  REASONRL_FILL(c10::BFloat16, fwd_bf16, bwd_bf16, fused_bf16)
  REASONRL_FILL(c10::Half, fwd_f16, bwd_f16, fused_f16)
#undef REASONRL_FILL
  k.fwd_f64[0] = &fwd_rows_scalar<double, false, false>;
  k.fwd_f64[1] = &fwd_rows_scalar<double, true, false>;
  k.fwd_f64[2] = &fwd_rows_scalar<double, false, true>;
  k.fwd_f64[3] = &fwd_rows_scalar<double, true, true>;
  k.bwd_f64 = &bwd_rows_scalar<double>;
  k.fused_f64 = &fused_rows_scalar<double>;
  return k;
}

}  // namespace CPU_CAPABILITY
}  // namespace reasonrl
