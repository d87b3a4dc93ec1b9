// The single-pass fused policy loss on CPU (losses.md section 13.1): per-token log-prob, entropy and the
// gradient of the loss with respect to the logits, in ONE sweep over the logits.
//
//   reasonrl::policy_loss_fused(logits [N, V], labels [N], temperature [N] | None, temperature_scalar,
//                               ignore_index, token_inputs [N, 6], loss_kind, kl_kind, params)
//       -> (logprobs [N], entropy [N], lse [N], grad_logprobs [N], grad_entropy [N], grad_logits [N, V])
//   reasonrl::policy_loss_token_grad(logprobs [N], token_inputs [N, 6], loss_kind, kl_kind, params)
//       -> grad_logprobs [N]                               (the per-token functor alone, for tests)
//
// Every term of a token-level config is token-local once its aggregation coefficients are known (they
// depend only on the mask and the normalisers; reasonrl/losses/fused.py computes them in an O(N) pre-pass
// and packs them with the other per-token inputs into `token_inputs`). So for each row:
//   1. the token_logprobs forward row kernel reads the row once: lp, H, and the (m, log-sum) statistics;
//   2. the functor below turns (lp, token_inputs[r]) into g_lp = dLoss/dlp (g_H = dLoss/dH is an input);
//   3. the token_logprobs backward row kernel writes dLoss/dlogits for the row while it is still in L2
//      (128 KiB for a 32k fp32 row; it is re-read from cache, not from DRAM).
// One read and one write of the logits in total, against 3 passes for a separate forward and backward.
// Both row kernels are the ISA-dispatched ones of token_logprobs (csrc/cpu/token_logprobs_kernel.h), so the
// numerics of lp, H and of the gradient are exactly those of token_logprobs.
//
// token_inputs columns (accumulation dtype: fp32, fp64 for fp64 logits), 0 at tokens outside the loss:
//   0 A    advantage of the token (a per-sequence advantage broadcast to its tokens)
//   1 old  behaviour-policy log-prob (read when params[kHasOld] != 0; otherwise old = sg(lp), ratio 1)
//   2 ref  reference-policy log-prob (read when kl_kind != kNoKl)
//   3 c_pg policy-term coefficient: aggregation coefficient x rollout IS weight (losses.md 10, 8.3)
//   4 c_kl beta x KL aggregation coefficient
//   5 g_H  upstream gradient of the entropy: -eta x the entropy coefficient of losses.md 11.1
//
// The functor runs in double for every input dtype: it is O(N) scalar work, and double keeps the branch
// decisions at the clip bounds those of the float64 oracle.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_utils.h"
#include "token_logprobs_rows.h"

namespace reasonrl {
namespace {

constexpr int64_t kInputs = 6;
enum Column : int64_t { kA = 0, kOld = 1, kRef = 2, kCoefPg = 3, kCoefKl = 4, kGradH = 5 };

// loss_kind: the surrogate of losses.md section 7 (vespo is never token-local and is not here).
enum LossKind : int64_t { kClip = 0, kCispoUpper = 1, kCispoTwoSided = 2, kSapo = 3, kReinforce = 4 };
// kl_kind: losses.md section 9; kStraightThrough is added to a base estimator for the "+" variants.
enum KlKind : int64_t { kNoKl = 0, kK1 = 1, kAbs = 2, kK2 = 3, kK3 = 4, kLowVarKl = 5, kStraightThrough = 8 };
// params, in this order (reasonrl/losses/fused.py builds the list).
enum Param : int64_t {
  kEpsLow = 0,         // clip lower bound 1 - eps_low
  kEpsHigh,            // clip upper bound 1 + eps_high
  kDeltaCap,           // TRL's delta on the unclipped branch; +inf when off
  kDualClipC,          // verl's dual clip C; 0 when off
  kLogRatioClamp,      // |lp - old| clamp before exponentiating; +inf when off
  kCispoMax,           // CISPO upper cap R_max
  kSapoTauPos,         // SAPO gate temperatures
  kSapoTauNeg,
  kHasOld,             // 1: old log-probs given in column 1
  kKlBiasCorrection,   // 1: kappa x w (with its gradient)
  kNumParams
};

struct LossParams {
  int64_t loss_kind, kl_base;
  bool kl_straight_through;
  double eps_low, eps_high, delta_cap, dual_clip_c, log_ratio_clamp, cispo_max, tau_pos, tau_neg;
  bool has_old, kl_bias_correction;
};

LossParams parse_params(int64_t loss_kind, int64_t kl_kind, at::ArrayRef<double> p) {
  TORCH_CHECK(p.size() == kNumParams, "policy_loss_fused: params must have ", int64_t(kNumParams),
              " entries, got ", p.size());
  TORCH_CHECK(loss_kind >= kClip && loss_kind <= kReinforce, "policy_loss_fused: unknown loss_kind ", loss_kind);
  const int64_t base = kl_kind & ~int64_t(kStraightThrough);
  TORCH_CHECK(base >= kNoKl && base <= kLowVarKl && kl_kind >= 0, "policy_loss_fused: unknown kl_kind ", kl_kind);
  return LossParams{loss_kind, base, (kl_kind & kStraightThrough) != 0,
                    p[kEpsLow], p[kEpsHigh], p[kDeltaCap], p[kDualClipC], p[kLogRatioClamp], p[kCispoMax],
                    p[kSapoTauPos], p[kSapoTauNeg], p[kHasOld] != 0.0, p[kKlBiasCorrection] != 0.0};
}

// dLoss/dlp of one token: the derivative of c_pg * l_pg + c_kl * kappa (losses.md 6, 7, 9) with respect to
// the token's log-prob. Clamps follow torch.clamp's convention (gradient passes on the bound, is blocked
// strictly beyond it) and the clip's tie takes the unclipped branch, exactly as the reference.
template <typename acc_t>
double token_grad(const LossParams& p, double lp, const acc_t* in) {
  if (std::isnan(lp)) return 0.0;  // invalid row (bad label / temperature): no gradient, reported upstream
  const double a = in[kA], c_pg = in[kCoefPg], c_kl = in[kCoefKl];
  double delta = p.has_old ? lp - static_cast<double>(in[kOld]) : 0.0;
  double d_delta = 1.0;  // d delta / d lp
  if (delta > p.log_ratio_clamp || delta < -p.log_ratio_clamp) {
    delta = delta > 0 ? p.log_ratio_clamp : -p.log_ratio_clamp;
    d_delta = 0.0;
  }
  const double w = std::exp(delta), dw = w * d_delta;
  double g = 0.0;
  if (c_pg != 0.0) {
    const double lo = 1.0 - p.eps_low, hi = 1.0 + p.eps_high;
    double dl = 0.0;  // d l_pg / d lp
    switch (p.loss_kind) {
      case kClip: {
        // l = -min(c1 A, c2 A), c1 = min(w, delta_cap), c2 = clip(w, lo, hi); then verl's dual clip.
        const double c1 = std::min(w, p.delta_cap), dc1 = w <= p.delta_cap ? dw : 0.0;
        const double c2 = std::min(std::max(w, lo), hi), dc2 = (w >= lo && w <= hi) ? dw : 0.0;
        const double a1 = c1 * a, a2 = c2 * a;
        const double l = a1 <= a2 ? -a1 : -a2;
        dl = a1 <= a2 ? -a * dc1 : -a * dc2;
        if (p.dual_clip_c > 0.0 && a < 0.0 && l > -p.dual_clip_c * a) dl = 0.0;
        break;
      }
      case kCispoUpper:  // -sg(min(w, R_max)) A lp
        dl = -std::min(w, p.cispo_max) * a;
        break;
      case kCispoTwoSided:  // -sg(clip(w, lo, hi)) A lp
        dl = -std::min(std::max(w, lo), hi) * a;
        break;
      case kSapo: {  // -(4 / tau) sigma(tau (w - 1)) A
        const double tau = a > 0.0 ? p.tau_pos : p.tau_neg;
        const double s = 1.0 / (1.0 + std::exp(-tau * (w - 1.0)));
        dl = -4.0 * s * (1.0 - s) * a * dw;
        break;
      }
      default:  // kReinforce: -A lp
        dl = -a;
    }
    g += c_pg * dl;
  }
  if (c_kl != 0.0 && p.kl_base != kNoKl) {
    const double d = lp - static_cast<double>(in[kRef]);  // lp - ref
    double kappa = 0.0, dk = 0.0;
    switch (p.kl_base) {
      case kK1: kappa = d; dk = 1.0; break;
      case kAbs: kappa = std::abs(d); dk = d > 0.0 ? 1.0 : (d < 0.0 ? -1.0 : 0.0); break;
      case kK2: kappa = 0.5 * d * d; dk = d; break;
      case kK3: {  // x = ref - lp: e^x - x - 1, d/dlp = 1 - e^x (TRL, unclamped)
        const double ex = std::exp(-d);
        kappa = ex + d - 1.0;
        dk = 1.0 - ex;
        break;
      }
      default: {  // low_var_kl: verl's k3, x clamped to +-20, kappa clamped to +-10
        const double x = -d, xc = std::min(std::max(x, -20.0), 20.0);
        const double ex = std::exp(xc), raw = ex - xc - 1.0;
        kappa = std::min(std::max(raw, -10.0), 10.0);
        dk = (x >= -20.0 && x <= 20.0 && raw >= -10.0 && raw <= 10.0) ? 1.0 - ex : 0.0;
      }
    }
    if (p.kl_straight_through) dk = d;  // value of the estimator, gradient of k2
    if (p.kl_bias_correction) dk = w * dk + kappa * dw;  // d(kappa w)
    g += c_kl * dk;
  }
  return g;
}

void check_inputs(const at::Tensor& token_inputs, int64_t n, at::ScalarType acc) {
  TORCH_CHECK(token_inputs.dim() == 2 && token_inputs.size(0) == n && token_inputs.size(1) == kInputs,
              "policy_loss_fused: token_inputs must be [N, ", kInputs, "] = [", n, ", ", kInputs, "], got ",
              token_inputs.sizes());
  TORCH_CHECK(token_inputs.scalar_type() == acc, "policy_loss_fused: token_inputs must be ", acc, ", got ",
              token_inputs.scalar_type());
  TORCH_CHECK(token_inputs.device().is_cpu(), "policy_loss_fused (cpp): token_inputs must be on the CPU");
}

template <typename scalar_t, typename Fwd, typename Bwd>
void run_fused(Fwd fwd, Bwd bwd, const LossParams& p, const at::Tensor& x, const at::Tensor& labels64,
               const at::Tensor& temp, double temperature_scalar, int64_t ignore_index, const at::Tensor& inputs,
               at::Tensor& lp, at::Tensor& ent, at::Tensor& lse, at::Tensor& stats, at::Tensor& g_lp,
               at::Tensor& g_h, at::Tensor& grad) {
  using acc_t = typename RowArgs<scalar_t>::acc_t;
  BwdArgs<scalar_t> a{};
  fill_row_args(a, x, labels64, temp, temperature_scalar, ignore_index);
  a.logprobs = lp.mutable_data_ptr<acc_t>();
  a.entropy = ent.mutable_data_ptr<acc_t>();
  a.rank = nullptr;
  a.lse = lse.mutable_data_ptr<acc_t>();
  a.stats = stats.mutable_data_ptr<acc_t>();
  a.grad_logprobs = g_lp.mutable_data_ptr<acc_t>();
  a.grad_entropy = g_h.mutable_data_ptr<acc_t>();
  a.grad = grad.mutable_data_ptr<scalar_t>();
  a.grad_row_stride = grad.stride(0);
  acc_t* g_lp_out = g_lp.mutable_data_ptr<acc_t>();
  acc_t* g_h_out = g_h.mutable_data_ptr<acc_t>();
  const acc_t* in = inputs.const_data_ptr<acc_t>();
  at::parallel_for(0, x.size(0), grain_rows(a.vocab), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      fwd(a, r, r + 1);  // sweep 1: statistics (the row is now in L2)
      const acc_t* row_in = in + r * kInputs;
      g_lp_out[r] = static_cast<acc_t>(token_grad(p, static_cast<double>(a.logprobs[r]), row_in));
      // An invalid row (NaN statistics) gets no gradient at all; the Python layer reports it.
      g_h_out[r] = std::isnan(a.logprobs[r]) ? acc_t(0) : row_in[kGradH];
      bwd(a, r, r + 1);  // sweep 2: the gradient, from cache
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_loss_fused_cpu(
    const at::Tensor& logits, const at::Tensor& labels, const std::optional<at::Tensor>& temperature,
    double temperature_scalar, int64_t ignore_index, const at::Tensor& token_inputs, int64_t loss_kind,
    int64_t kl_kind, at::ArrayRef<double> params) {
  check_common(logits, labels, temperature, temperature_scalar);
  const LossParams p = parse_params(loss_kind, kl_kind, params);
  const int64_t n = logits.size(0);
  const at::ScalarType acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_inputs(token_inputs, n, acc);
  const auto opts = logits.options().dtype(acc);
  at::Tensor lp = at::empty({n}, opts), ent = at::empty({n}, opts), lse = at::empty({n}, opts);
  at::Tensor g_lp = at::empty({n}, opts), g_h = at::empty({n}, opts);
  at::Tensor grad = empty_gradient(logits);
  if (n == 0) return {lp, ent, lse, g_lp, g_h, grad};
  at::Tensor stats = at::empty({n, 2}, opts);
  const at::Tensor x = vocab_contiguous(logits);
  const at::Tensor labels64 = labels.to(at::kLong).contiguous();
  const at::Tensor temp = temperature_rows(temperature, n, acc);
  const at::Tensor inputs = token_inputs.contiguous();
  const RowKernels& k = token_logprobs_kernels();
  constexpr int kWithEntropy = 1;  // fwd table index: entropy on, rank off
  switch (x.scalar_type()) {
    case at::kFloat:
      run_fused<float>(k.fwd_f32[kWithEntropy], k.bwd_f32, p, x, labels64, temp, temperature_scalar, ignore_index,
                       inputs, lp, ent, lse, stats, g_lp, g_h, grad);
      break;
    case at::kBFloat16:
      run_fused<c10::BFloat16>(k.fwd_bf16[kWithEntropy], k.bwd_bf16, p, x, labels64, temp, temperature_scalar,
                               ignore_index, inputs, lp, ent, lse, stats, g_lp, g_h, grad);
      break;
    case at::kHalf:
      run_fused<c10::Half>(k.fwd_f16[kWithEntropy], k.bwd_f16, p, x, labels64, temp, temperature_scalar,
                           ignore_index, inputs, lp, ent, lse, stats, g_lp, g_h, grad);
      break;
    default:
      run_fused<double>(k.fwd_f64[kWithEntropy], k.bwd_f64, p, x, labels64, temp, temperature_scalar, ignore_index,
                        inputs, lp, ent, lse, stats, g_lp, g_h, grad);
  }
  return {lp, ent, lse, g_lp, g_h, grad};
}

at::Tensor policy_loss_token_grad_cpu(const at::Tensor& logprobs, const at::Tensor& token_inputs, int64_t loss_kind,
                                      int64_t kl_kind, at::ArrayRef<double> params) {
  TORCH_CHECK(logprobs.dim() == 1 && logprobs.device().is_cpu(),
              "policy_loss_token_grad: logprobs must be a 1-D CPU tensor, got ", logprobs.sizes());
  TORCH_CHECK(logprobs.scalar_type() == at::kFloat || logprobs.scalar_type() == at::kDouble,
              "policy_loss_token_grad: logprobs must be float32 or float64, got ", logprobs.scalar_type());
  const LossParams p = parse_params(loss_kind, kl_kind, params);
  const int64_t n = logprobs.size(0);
  check_inputs(token_inputs, n, logprobs.scalar_type());
  at::Tensor out = at::empty({n}, logprobs.options());
  AT_DISPATCH_FLOATING_TYPES(logprobs.scalar_type(), "policy_loss_token_grad", [&] {
    const at::Tensor lp = logprobs.contiguous(), in = token_inputs.contiguous();
    const scalar_t* lp_ptr = lp.const_data_ptr<scalar_t>();
    const scalar_t* in_ptr = in.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for (int64_t r = 0; r < n; ++r) {
      o[r] = static_cast<scalar_t>(token_grad(p, static_cast<double>(lp_ptr[r]), in_ptr + r * kInputs));
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(reasonrl, CPU, m) {
  m.impl("policy_loss_fused", &policy_loss_fused_cpu);
  m.impl("policy_loss_token_grad", &policy_loss_token_grad_cpu);
}

}  // namespace reasonrl
