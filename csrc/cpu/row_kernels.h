// ISA-independent interface between the CPU ops (token_logprobs.cpp, linear_logprobs.cpp, policy_loss.cpp:
// checks, threading) and the per-ISA row kernels of row_kernels_impl.h; row_kernels() (cpu_utils.h) picks
// the variant. Plain structs of pointers: nothing here depends on the CPU_CAPABILITY a translation unit is
// compiled for.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <limits>
#include <type_traits>

namespace reasonrl {

// Forward arguments for one call; rows are processed in [begin, end) chunks by at::parallel_for.
template <typename scalar_t>
struct RowArgs {
  // Statistics are fp32 for fp32/bf16/fp16 input and fp64 for fp64 input (docs/ops.md section 0).
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const scalar_t* logits;     // [N, V], unit stride on V
  int64_t row_stride;
  int64_t vocab;
  const int64_t* labels;      // [N]
  int64_t ignore_index;
  const acc_t* temperature;   // [N] per-row temperature, or nullptr
  acc_t temperature_scalar;   // used when temperature == nullptr
  acc_t* logprobs;            // [N]
  acc_t* entropy;             // [N] or nullptr when not wanted (read by the backward for g_H)
  int32_t* rank;              // [N] or nullptr when not wanted
  acc_t* lse;                 // [N]
  // [N, 2]: the row maximum m of z = x / tau and log(sum_j exp(z_j - m)), written by the forward and read
  // by the backward, which forms log p_j = (x_j / tau - m) - log_sum. Keeping the two parts (rather than
  // their sum, LSE) keeps the exponent exact near the maximum: rounding LSE to fp32 would cost up to half an
  // ulp of |LSE| in every p_j (1e-5 relative at LSE ~ 200), the error log_softmax avoids.
  acc_t* stats;
  // Vocab-parallel mode (docs/ops.md 3.3). The fields default to the unsharded op, so code that fills a
  // RowArgs with fill_row_args and leaves these alone (or zero-initialises it, `RowArgs<T> a{}`) behaves as
  // before. The logits are then columns [vocab_start, vocab_start + vocab) of a vocabulary of vocab_global
  // ids, and labels are global ids: a label in [0, vocab_global) outside the local columns is legal (another
  // rank owns it). For such a row the forward writes the local statistics (stats, entropy, lse of this shard)
  // and logprobs = -inf (no label logit here), and the backward omits the one-hot term.
  int64_t vocab_start = 0;               // global id of local column 0
  int64_t vocab_global = 0;              // size of the global vocabulary; 0 = unsharded (vocab)
  // [N] raw label logit in acc_t (the owner's value, shared by an all-reduce; exact for every input dtype,
  // so the rank compares raw logits in their own precision), or nullptr: the pivot of the rank count, which
  // a non-owner rank cannot read from its own row. With nullptr an owner row reads logits[label] and a
  // non-owner row counts against -inf (meaningless: pass the pivot with want_rank).
  const acc_t* label_logit = nullptr;
};

// Where a row's label lives (docs/ops.md 3.3). `valid`: the label is a vocabulary id (not ignore_index, inside
// [0, vocab_global) or [0, vocab) when unsharded); `local`: its column in this shard, or -1 when another
// rank owns it.
struct LabelSlot {
  bool valid;
  int64_t local;
};

template <typename Args>
inline LabelSlot label_slot(const Args& a, int64_t y) {
  const int64_t v_glob = a.vocab_global > 0 ? a.vocab_global : a.vocab;
  if (y == a.ignore_index || y < 0 || y >= v_glob) return {false, -1};
  const int64_t local = y - a.vocab_start;
  return {true, (local >= 0 && local < a.vocab) ? local : int64_t(-1)};
}

// The per-row temperature is valid when finite and at least the smallest normal number of the
// accumulation type (so that 1 / tau is finite: a subnormal tau such as 1e-40 in fp32 has no finite
// reciprocal); otherwise the row's outputs are NaN and its gradient is 0 (docs/ops.md section 7, validate=False;
// the Python layer rejects such temperatures with a ValueError when validating).
template <typename T>
inline bool temperature_ok(T tau) {
  return tau >= std::numeric_limits<T>::min() && tau < std::numeric_limits<T>::infinity();
}

template <typename scalar_t>
struct BwdArgs : RowArgs<scalar_t> {
  using acc_t = typename RowArgs<scalar_t>::acc_t;
  const acc_t* grad_logprobs;  // [N] or nullptr (= zero upstream gradient)
  const acc_t* grad_entropy;   // [N] or nullptr
  scalar_t* grad;              // [N, V], unit stride on V (may alias logits for the in-place backward)
  int64_t grad_row_stride;
};

template <typename Args>
inline auto row_temperature(const Args& a, int64_t r) {
  return a.temperature ? a.temperature[r] : a.temperature_scalar;
}

// The fused loss's per-row callback (csrc/cpu/policy_loss.cpp): given a row's log-prob and entropy, the
// upstream gradients g_lp = dLoss/dlp and g_H = dLoss/dH of that token. Called once per valid row.
struct RowGrad {
  void (*fn)(const void* ctx, int64_t row, double lp, double h, double* g_lp, double* g_h);
  const void* ctx;
};

// Entry points of one ISA variant. fwd_*[i] with i = want_entropy + 2 * want_rank.
struct RowKernels {
  using FwdF32 = void (*)(const RowArgs<float>&, int64_t, int64_t);
  using FwdBF16 = void (*)(const RowArgs<c10::BFloat16>&, int64_t, int64_t);
  using FwdF16 = void (*)(const RowArgs<c10::Half>&, int64_t, int64_t);
  using FwdF64 = void (*)(const RowArgs<double>&, int64_t, int64_t);
  FwdF32 fwd_f32[4];
  FwdBF16 fwd_bf16[4];
  FwdF16 fwd_f16[4];
  FwdF64 fwd_f64[4];
  void (*bwd_f32)(const BwdArgs<float>&, int64_t, int64_t);
  void (*bwd_bf16)(const BwdArgs<c10::BFloat16>&, int64_t, int64_t);
  void (*bwd_f16)(const BwdArgs<c10::Half>&, int64_t, int64_t);
  void (*bwd_f64)(const BwdArgs<double>&, int64_t, int64_t);
  // Forward, callback and backward of each row in one pass (the fused loss). The callback must also store
  // the gradients it returns in the [N] arrays a.grad_logprobs / a.grad_entropy point to (zero-filled by
  // the caller for rows it is not called on): the fp64 variant reads them back.
  void (*fused_f32)(const BwdArgs<float>&, int64_t, int64_t, const RowGrad&);
  void (*fused_bf16)(const BwdArgs<c10::BFloat16>&, int64_t, int64_t, const RowGrad&);
  void (*fused_f16)(const BwdArgs<c10::Half>&, int64_t, int64_t, const RowGrad&);
  void (*fused_f64)(const BwdArgs<double>&, int64_t, int64_t, const RowGrad&);

  // The entry points for logits (or GEMM output) of type scalar_t, so that an op dispatches on the dtype once
  // (AT_DISPATCH_FLOATING_TYPES_AND2) and writes one body: `k.fwd<scalar_t>()[i]`, `k.bwd<scalar_t>()`.
  template <typename scalar_t>
  const auto& fwd() const { return of<scalar_t>(fwd_f32, fwd_bf16, fwd_f16, fwd_f64); }
  template <typename scalar_t>
  const auto& bwd() const { return of<scalar_t>(bwd_f32, bwd_bf16, bwd_f16, bwd_f64); }
  template <typename scalar_t>
  const auto& fused() const { return of<scalar_t>(fused_f32, fused_bf16, fused_f16, fused_f64); }

 private:
  template <typename scalar_t, typename F32, typename BF16, typename F16, typename F64>
  static const auto& of(const F32& f32, const BF16& bf16, const F16& f16, const F64& f64) {
    if constexpr (std::is_same_v<scalar_t, float>) return f32;
    else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) return bf16;
    else if constexpr (std::is_same_v<scalar_t, c10::Half>) return f16;
    else return f64;
  }
};

// One definition per ISA variant compiled into the extension (csrc/cpu/isa/*.cpp).
RowKernels row_kernels_default();
#if defined(REASONRL_HAVE_AVX2)
RowKernels row_kernels_avx2();
#endif
#if defined(REASONRL_HAVE_AVX512)
RowKernels row_kernels_avx512();
#endif

// The variant for this CPU (at::get_cpu_capability(), so ATEN_CPU_CAPABILITY=default|avx2|avx512 works).
const RowKernels& row_kernels();
const char* row_kernels_isa();

}  // namespace reasonrl
