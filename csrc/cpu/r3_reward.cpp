// r3_reward (docs/ops.md section 5): DRO's reasoning-reflection reward, fused on the CPU. Forward only.
//
// One at::parallel_for task per group of prompts; a prompt's whole computation (sigma over the valid
// rollouts, the weights, the per-rollout rewards with the optional propagation term) runs in one task on
// the prompt's valid reference columns, so nothing of size [G, K, L] is materialised (the reference builds
// several such tensors). The semantics follow reasonrl/reference/r3_reward.py, the oracle, step by step:
// two-pass population std, the all-zero fallback to uniform weights for every weighting, top-k ranks by a
// stable descending sort (ties to the lower index, NaN ranked first as torch.sort does), the propagation
// term through log1p(expm1(l) exp(-gamma d)).
//
// Layouts (the Python layer, reasonrl/ops/r3_reward.py, checks shapes and values; here only what keeps the
// kernel memory-safe is checked):
//   padded: ref_logprobs [G, K, L] (any strides), ref_mask [G, L] bool (contiguous); weights / sigma [G, L];
//   packed: ref_logprobs [K, M], ref_cu_seqlens [G + 1] int64; weights / sigma [M].
// rollout_mask [G, K] bool, baseline [G, L] / [M] in the accumulation dtype (contiguous) or absent,
// k_g [G] int64 (the top-k size of every prompt, resolved in Python by the reference's resolve_topk).
// Precision: fp64 accumulation for fp64 input, fp32 for fp32 / bf16 / fp16 input (the reference's compute
// dtype); the outputs are in the accumulation dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <optional>
#include <vector>

namespace reasonrl {
namespace {

// Codes shared with reasonrl/ops/r3_reward.py (WEIGHTING_CODES / REDUCTION_CODES) and kernels/r3_reward.py.
enum Weighting : int64_t { kLinear = 0, kSoftmax = 1, kTopk = 2, kUniform = 3 };
enum Reduction : int64_t { kWeightedMean = 0, kSum = 1 };

template <typename scalar_t, typename acc_t>
struct R3Args {
  const scalar_t* lp;
  int64_t stride_g, stride_k, stride_c;  // padded: element (g, k, c); packed: stride_g = 0, c absolute
  int64_t G, K, L;                       // L: padded width (unused when packed)
  const bool* tok_mask;                  // [G, L] or nullptr (packed)
  const int64_t* cu;                     // [G + 1] or nullptr (padded)
  const bool* roll;                      // [G, K]
  const acc_t* base;                     // [G, L] / [M] or nullptr
  const int64_t* k_g;                    // [G]
  int64_t weighting, reduction, min_valid;
  double tau;
  bool has_gamma;
  double gamma;
  acc_t* reward;  // [G, K]
  acc_t* weights; // [G, L] / [M]
  acc_t* sigma;   // [G, L] / [M]
  int32_t* n_valid;
};

// Ranks before: NaN first (torch.sort with descending=True places NaN first), then larger values.
template <typename acc_t>
inline bool ranks_before(acc_t a, acc_t b) {
  return (std::isnan(a) && !std::isnan(b)) || a > b;
}

template <typename scalar_t, typename acc_t>
void r3_prompt(const R3Args<scalar_t, acc_t>& a, int64_t g, std::vector<int64_t>& cols,
               std::vector<int64_t>& rolls, std::vector<acc_t>& sig, std::vector<acc_t>& w,
               std::vector<int64_t>& order, std::vector<char>& top, std::vector<acc_t>& em1) {
  const bool packed = a.cu != nullptr;
  // The prompt's valid reference columns, in order (absolute column index: c of [G, K, L] or of [K, M]).
  cols.clear();
  if (packed) {
    for (int64_t c = a.cu[g]; c < a.cu[g + 1]; ++c) cols.push_back(c);
  } else {
    for (int64_t c = 0; c < a.L; ++c)
      if (a.tok_mask[g * a.L + c]) cols.push_back(c);
  }
  rolls.clear();
  for (int64_t k = 0; k < a.K; ++k)
    if (a.roll[g * a.K + k]) rolls.push_back(k);
  const int64_t Lg = static_cast<int64_t>(cols.size());
  const int64_t n = static_cast<int64_t>(rolls.size());
  a.n_valid[g] = static_cast<int32_t>(n);
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  const acc_t zero = 0;
  // Output slot of column c in weights / sigma.
  auto out_idx = [&](int64_t c) { return packed ? c : g * a.L + c; };
  auto elem = [&](int64_t k, int64_t c) -> acc_t {
    return static_cast<acc_t>(a.lp[g * a.stride_g + k * a.stride_k + c * a.stride_c]);
  };
  if (!packed)
    for (int64_t c = 0; c < a.L; ++c) a.weights[g * a.L + c] = a.sigma[g * a.L + c] = zero;
  if (Lg == 0) {  // only reachable with validate=False: the reference's rewards are NaN, nothing else set
    for (int64_t k = 0; k < a.K; ++k) a.reward[g * a.K + k] = nan;
    return;
  }

  // sigma: two passes (mean, then squared deviations), population std (ddof 0), so equal log-probs give
  // exactly 0; 0 for the whole prompt when n < min_valid_rollouts.
  sig.assign(Lg, zero);
  const acc_t n_f = static_cast<acc_t>(std::max<int64_t>(n, 1));
  if (n >= a.min_valid) {
    for (int64_t i = 0; i < Lg; ++i) {
      acc_t s = 0;
      for (int64_t k : rolls) s += elem(k, cols[i]);
      const acc_t mean = s / n_f;
      acc_t ss = 0;
      for (int64_t k : rolls) {
        const acc_t d = elem(k, cols[i]) - mean;
        ss += d * d;
      }
      sig[i] = std::sqrt(ss / n_f);
    }
  }
  acc_t sig_sum = 0;
  for (int64_t i = 0; i < Lg; ++i) sig_sum += sig[i];
  const bool all_zero = sig_sum == zero;  // NaN is not zero: a NaN sigma propagates
  const acc_t uniform = acc_t(1) / static_cast<acc_t>(Lg);

  // The top-k set (topk weighting and the propagation form's reflective set): a stable sort by sigma,
  // descending, ties to the lower index; empty when every sigma is 0.
  const bool need_top = a.weighting == kTopk || a.has_gamma;
  const int64_t kg = a.k_g[g];
  top.assign(Lg, 0);
  if (need_top && !all_zero) {
    order.resize(Lg);
    std::iota(order.begin(), order.end(), int64_t(0));
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t x, int64_t y) { return ranks_before(sig[x], sig[y]); });
    for (int64_t r = 0; r < std::min(kg, Lg); ++r) top[order[r]] = 1;
  }

  w.assign(Lg, uniform);
  if (!all_zero) {
    if (a.weighting == kLinear) {
      for (int64_t i = 0; i < Lg; ++i) w[i] = sig[i] / sig_sum;
    } else if (a.weighting == kSoftmax) {
      // max subtracted (clamped at 0 as the reference does; sigma >= 0), NaN propagates through the max.
      const acc_t tau = static_cast<acc_t>(a.tau);
      acc_t m = 0;
      bool any_nan = false;
      for (int64_t i = 0; i < Lg; ++i) {
        const acc_t z = sig[i] / tau;
        any_nan |= std::isnan(z);
        m = std::max(m, z);
      }
      if (any_nan) m = nan;
      acc_t denom = 0;
      for (int64_t i = 0; i < Lg; ++i) denom += (w[i] = std::exp(sig[i] / tau - m));
      if (!(denom >= std::numeric_limits<acc_t>::min()) && !std::isnan(denom))
        denom = std::numeric_limits<acc_t>::min();
      for (int64_t i = 0; i < Lg; ++i) w[i] /= denom;
    } else if (a.weighting == kTopk) {
      const acc_t inv_k = acc_t(1) / static_cast<acc_t>(std::max<int64_t>(kg, 1));
      for (int64_t i = 0; i < Lg; ++i) w[i] = top[i] ? inv_k : zero;
    }
  }
  for (int64_t i = 0; i < Lg; ++i) {
    a.weights[out_idx(cols[i])] = w[i];
    a.sigma[out_idx(cols[i])] = sig[i];
  }

  // Rewards: R_k = sum_i w_i u_{k,i}, u = (l - b) + P; times L_g for reduction "sum"; NaN if invalid.
  std::vector<char> valid_k(a.K, 0);
  for (int64_t k : rolls) valid_k[k] = 1;
  const acc_t len_f = static_cast<acc_t>(Lg);
  const acc_t neg_gamma = static_cast<acc_t>(-a.gamma);
  for (int64_t k = 0; k < a.K; ++k) {
    if (!valid_k[k]) {
      a.reward[g * a.K + k] = nan;
      continue;
    }
    if (a.has_gamma) {  // expm1(l_a) = -(1 - p_a), exact for p near 1; only the reflective columns are read
      em1.assign(Lg, zero);
      for (int64_t i = 0; i < Lg; ++i)
        if (top[i]) em1[i] = std::expm1(elem(k, cols[i]));
    }
    acc_t r = 0;
    for (int64_t i = 0; i < Lg; ++i) {
      acc_t u = elem(k, cols[i]);
      if (a.base != nullptr) u -= a.base[out_idx(cols[i])];
      if (a.has_gamma) {
        // P = sum over reflective a < i of log(1 - (1 - p_a) e^{-gamma (i - a)}) = log1p(expm1(l_a) decay).
        acc_t p = 0;
        for (int64_t j = 0; j < i; ++j)
          if (top[j]) p += std::log1p(em1[j] * std::exp(neg_gamma * static_cast<acc_t>(i - j)));
        u += p;
      }
      r += w[i] * u;
    }
    if (a.reduction == kSum) r *= len_f;
    a.reward[g * a.K + k] = r;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> r3_reward_fwd_cpu(
    const at::Tensor& ref_logprobs, const std::optional<at::Tensor>& ref_mask,
    const std::optional<at::Tensor>& ref_cu_seqlens, const at::Tensor& rollout_mask,
    const std::optional<at::Tensor>& baseline, const at::Tensor& k_g, int64_t weighting, double softmax_tau,
    int64_t reduction, std::optional<double> propagation_gamma, int64_t min_valid_rollouts) {
  const char* op = "r3_reward_fwd";
  TORCH_CHECK(ref_logprobs.is_floating_point(), op, ": ref_logprobs must be floating, got ",
              ref_logprobs.scalar_type());
  const bool packed = ref_cu_seqlens.has_value();
  int64_t G, K, L = 0, width;  // width: the size of weights / sigma (G * L padded, M packed)
  if (packed) {
    TORCH_CHECK(ref_logprobs.dim() == 2, op, ": ref_logprobs must be [K, M] (packed), got ", ref_logprobs.sizes());
    TORCH_CHECK(!ref_mask.has_value(), op, ": ref_mask must be None in the packed layout");
    const at::Tensor& cu = *ref_cu_seqlens;
    TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 1 && cu.scalar_type() == at::kLong && cu.is_contiguous(), op,
                ": ref_cu_seqlens must be a contiguous int64 [G + 1] tensor, got ", cu.sizes(), " ",
                cu.scalar_type());
    G = cu.size(0) - 1;
    K = ref_logprobs.size(0);
    width = ref_logprobs.size(1);
    const int64_t* c = cu.data_ptr<int64_t>();
    TORCH_CHECK(c[0] == 0 && c[G] == width, op, ": ref_cu_seqlens must start at 0 and end at M = ", width);
    for (int64_t g = 0; g < G; ++g)
      TORCH_CHECK(c[g + 1] >= c[g], op, ": ref_cu_seqlens must be non-decreasing");
  } else {
    TORCH_CHECK(ref_logprobs.dim() == 3, op, ": ref_logprobs must be [G, K, L] (padded), got ",
                ref_logprobs.sizes());
    G = ref_logprobs.size(0);
    K = ref_logprobs.size(1);
    L = ref_logprobs.size(2);
    width = G * L;
    TORCH_CHECK(ref_mask.has_value(), op, ": ref_mask [G, L] is required in the padded layout");
    const at::Tensor& m = *ref_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.is_contiguous() && m.dim() == 2 && m.size(0) == G &&
                    m.size(1) == L,
                op, ": ref_mask must be a contiguous bool [G, L] = [", G, ", ", L, "] tensor, got ", m.sizes(),
                " ", m.scalar_type());
  }
  TORCH_CHECK(rollout_mask.scalar_type() == at::kBool && rollout_mask.is_contiguous() && rollout_mask.dim() == 2 &&
                  rollout_mask.size(0) == G && rollout_mask.size(1) == K,
              op, ": rollout_mask must be a contiguous bool [G, K] = [", G, ", ", K, "] tensor, got ",
              rollout_mask.sizes(), " ", rollout_mask.scalar_type());
  TORCH_CHECK(k_g.scalar_type() == at::kLong && k_g.is_contiguous() && k_g.dim() == 1 && k_g.size(0) == G, op,
              ": k_g must be a contiguous int64 [G] = [", G, "] tensor, got ", k_g.sizes());
  TORCH_CHECK(weighting >= kLinear && weighting <= kUniform, op, ": weighting code must be in [0, 3], got ",
              weighting);
  TORCH_CHECK(reduction == kWeightedMean || reduction == kSum, op, ": reduction code must be 0 or 1, got ",
              reduction);
  const auto acc_type = ref_logprobs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (baseline.has_value()) {
    const at::Tensor& b = *baseline;
    TORCH_CHECK(b.scalar_type() == acc_type && b.is_contiguous() && b.numel() == width, op,
                ": baseline must be a contiguous ", acc_type, " tensor with ", width, " elements, got ", b.sizes(),
                " ", b.scalar_type());
  }
  const auto opts = ref_logprobs.options().dtype(acc_type);
  at::Tensor reward = at::empty({G, K}, opts);
  at::Tensor weights = packed ? at::zeros({width}, opts) : at::zeros({G, L}, opts);
  at::Tensor sigma = at::zeros_like(weights);
  at::Tensor n_valid = at::empty({G}, opts.dtype(at::kInt));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ref_logprobs.scalar_type(), "r3_reward_fwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    R3Args<scalar_t, acc_t> a;
    a.lp = ref_logprobs.data_ptr<scalar_t>();
    if (packed) {
      a.stride_g = 0;
      a.stride_k = ref_logprobs.stride(0);
      a.stride_c = ref_logprobs.stride(1);
    } else {
      a.stride_g = ref_logprobs.stride(0);
      a.stride_k = ref_logprobs.stride(1);
      a.stride_c = ref_logprobs.stride(2);
    }
    a.G = G;
    a.K = K;
    a.L = L;
    a.tok_mask = packed ? nullptr : ref_mask->data_ptr<bool>();
    a.cu = packed ? ref_cu_seqlens->data_ptr<int64_t>() : nullptr;
    a.roll = rollout_mask.data_ptr<bool>();
    a.base = baseline.has_value() ? baseline->data_ptr<acc_t>() : nullptr;
    a.k_g = k_g.data_ptr<int64_t>();
    a.weighting = weighting;
    a.reduction = reduction;
    a.min_valid = min_valid_rollouts;
    a.tau = softmax_tau;
    a.has_gamma = propagation_gamma.has_value();
    a.gamma = propagation_gamma.value_or(0.0);
    a.reward = reward.data_ptr<acc_t>();
    a.weights = weights.data_ptr<acc_t>();
    a.sigma = sigma.data_ptr<acc_t>();
    a.n_valid = n_valid.data_ptr<int32_t>();
    // Prompts per task: about 16k elements of [K, L_g] work per task to amortise the scheduling.
    const int64_t per_prompt = std::max<int64_t>(1, K * (packed ? width / std::max<int64_t>(G, 1) : L));
    const int64_t grain = std::max<int64_t>(1, 16384 / per_prompt);
    at::parallel_for(0, G, grain, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> cols, rolls, order;
      std::vector<acc_t> sig, w, em1;
      std::vector<char> top;
      for (int64_t g = begin; g < end; ++g) r3_prompt(a, g, cols, rolls, sig, w, order, top, em1);
    });
  });
  return {reward, weights, sigma, n_valid};
}

}  // namespace

TORCH_LIBRARY_IMPL(reasonrl, CPU, m) { m.impl("r3_reward_fwd", &r3_reward_fwd_cpu); }

}  // namespace reasonrl
