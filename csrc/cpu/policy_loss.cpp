// The single-pass fused policy loss on CPU (docs/losses.md section 13.1): per-token log-prob, entropy and the
// gradient of the loss with respect to the logits, in ONE sweep over the logits.
//
//   reasonrl::policy_loss_fused(logits [N, V], labels [N], temperature [N] | None, temperature_scalar,
//                               ignore_index, token_inputs [N, 6], loss_kind, kl_kind, params)
//       -> (logprobs [N], entropy [N], lse [N], grad_logprobs [N], grad_entropy [N], grad_logits [N, V])
//   reasonrl::policy_loss_fused_inplace(logits, ...same...) -> the first five: grad_logits overwrites logits
//   reasonrl::policy_loss_token_grad(logprobs [N], token_inputs [N, 6], loss_kind, kl_kind, params)
//       -> grad_logprobs [N]                               (the per-token functor alone, for tests)
//
// Every term of a token-level config is token-local once its aggregation coefficients are known (they
// depend only on the mask and the normalisers; reasonrl/losses/fused.py reads them from the reference's
// O(N) pre-pass and packs them with the other per-token inputs into `token_inputs`). So for each row:
//   1. the forward sweep reads the row once: lp, H, and the (m, log-sum) statistics, keeping exp(z_j - m_c)
//      of every column in a row-sized scratch buffer;
//   2. the functor below turns (lp, token_inputs[r]) into g_lp = dLoss/dlp (g_H = dLoss/dH is an input);
//   3. the gradient sweep writes dLoss/dlogits for the row while it is still in L2 (128 KiB for a 32k fp32
//      row; it is re-read from cache, not from DRAM), scaling the stored exponentials instead of computing
//      them again: one exp per logit in total, where a separate forward and backward take two.
// One read and one write of the logits in total, against 3 passes for a separate forward and backward.
// The row code is fused_rows_vec of csrc/cpu/row_kernels_impl.h (ISA-dispatched), built from the same
// chunk routines as token_logprobs, so lp, H and the gradient follow its numerics.
//
// token_inputs columns (accumulation dtype: fp32, fp64 for fp64 logits), 0 at tokens outside the loss:
//   0 A    advantage of the token (a per-sequence advantage broadcast to its tokens)
//   1 old  behaviour-policy log-prob (read when params[kHasOld] != 0; otherwise old = sg(lp), ratio 1)
//   2 ref  reference-policy log-prob (read when kl_kind != kNoKl)
//   3 c_pg policy-term coefficient: aggregation coefficient x rollout IS weight (docs/losses.md 10, 8.3)
//   4 c_kl beta x KL aggregation coefficient
//   5 g_H  upstream gradient of the entropy: -eta x the entropy coefficient of docs/losses.md 11.1
//
// The functor runs in double for every input dtype: it is O(N) scalar work, and double keeps the branch
// decisions at the clip bounds those of the float64 oracle.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_utils.h"
#include "linear_chunks.h"
#include "row_kernels.h"

namespace reasonrl {
namespace {

constexpr int64_t kInputs = 6;
enum Column : int64_t { kA = 0, kOld = 1, kRef = 2, kCoefPg = 3, kCoefKl = 4, kGradH = 5 };

// loss_kind: the surrogate of docs/losses.md section 7 (vespo is never token-local and is not here).
enum LossKind : int64_t { kClip = 0, kCispoUpper = 1, kCispoTwoSided = 2, kSapo = 3, kReinforce = 4 };
// kl_kind: docs/losses.md section 9; kStraightThrough is added to a base estimator for the "+" variants.
enum KlKind : int64_t { kNoKl = 0, kK1 = 1, kAbs = 2, kK2 = 3, kK3 = 4, kLowVarKl = 5, kStraightThrough = 8 };
// params, in this order. The codes, the params order and the token_inputs columns restate the table of
// reasonrl/ops/policy_loss.py (LOSS_KINDS, KL_KINDS, PARAMS, INPUT_COLUMNS), which
// tests/losses/test_policy_loss_table.py checks this file against.
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

// dLoss/dlp of one token: the derivative of c_pg * l_pg + c_kl * kappa (docs/losses.md 6, 7, 9) with respect to
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

// The row callback of the fused kernels: dLoss/dlp from the functor, dLoss/dH from the inputs.
template <typename acc_t>
struct GradContext {
  const LossParams* params;
  const acc_t* inputs;  // [N, kInputs]
  acc_t* g_lp;          // [N] outputs (the fp64 kernel reads them back)
  acc_t* g_h;

  static void call(const void* self, int64_t r, double lp, double /*h*/, double* g_lp, double* g_h) {
    const auto* c = static_cast<const GradContext*>(self);
    const acc_t* in = c->inputs + r * kInputs;
    *g_lp = token_grad(*c->params, lp, in);
    *g_h = static_cast<double>(in[kGradH]);
    c->g_lp[r] = static_cast<acc_t>(*g_lp);
    c->g_h[r] = static_cast<acc_t>(*g_h);
  }
};

template <typename scalar_t, typename Fused>
void run_fused(Fused fused, const LossParams& p, const at::Tensor& x, const at::Tensor& labels64,
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
  a.grad_logprobs = g_lp.const_data_ptr<acc_t>();
  a.grad_entropy = g_h.const_data_ptr<acc_t>();
  a.grad = grad.mutable_data_ptr<scalar_t>();
  a.grad_row_stride = grad.stride(0);
  const GradContext<acc_t> ctx{&p, inputs.const_data_ptr<acc_t>(), g_lp.mutable_data_ptr<acc_t>(),
                               g_h.mutable_data_ptr<acc_t>()};
  const RowGrad rg{&GradContext<acc_t>::call, &ctx};
  at::parallel_for(0, x.size(0), grain_rows(a.vocab), [&](int64_t begin, int64_t end) { fused(a, begin, end, rg); });
}

// Both entry points: the sweep writing dLoss/dlogits into `grad` ([N, V] contiguous; the storage of `logits`
// itself for the in-place op). Returns (lp, H, LSE, g_lp, g_H).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_into(
    const at::Tensor& logits, const at::Tensor& labels, const std::optional<at::Tensor>& temperature,
    double temperature_scalar, int64_t ignore_index, const at::Tensor& token_inputs, int64_t loss_kind,
    int64_t kl_kind, at::ArrayRef<double> params, at::Tensor& grad) {
  const LossParams p = parse_params(loss_kind, kl_kind, params);
  const int64_t n = logits.size(0);
  const at::ScalarType acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_inputs(token_inputs, n, acc);
  const auto opts = logits.options().dtype(acc);
  at::Tensor lp = at::empty({n}, opts), ent = at::empty({n}, opts), lse = at::empty({n}, opts);
  at::Tensor g_lp = at::zeros({n}, opts), g_h = at::zeros({n}, opts);  // 0 for rows the callback skips
  if (n == 0) return {lp, ent, lse, g_lp, g_h};
  at::Tensor stats = at::empty({n, 2}, opts);
  const at::Tensor x = vocab_contiguous(logits);
  const at::Tensor labels64 = labels.to(at::kLong).contiguous();
  const at::Tensor temp = temperature_rows(temperature, n, acc);
  const at::Tensor inputs = token_inputs.contiguous();
  const RowKernels& k = row_kernels();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "policy_loss_fused_cpu", [&] {
    run_fused<scalar_t>(k.fused<scalar_t>(), p, x, labels64, temp, temperature_scalar, ignore_index, inputs, lp,
                        ent, lse, stats, g_lp, g_h, grad);
  });
  return {lp, ent, lse, g_lp, g_h};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_loss_fused_cpu(
    const at::Tensor& logits, const at::Tensor& labels, const std::optional<at::Tensor>& temperature,
    double temperature_scalar, int64_t ignore_index, const at::Tensor& token_inputs, int64_t loss_kind,
    int64_t kl_kind, at::ArrayRef<double> params) {
  check_common(logits, labels, temperature, temperature_scalar);
  at::Tensor grad = empty_gradient(logits);
  auto [lp, ent, lse, g_lp, g_h] = fused_into(logits, labels, temperature, temperature_scalar, ignore_index,
                                              token_inputs, loss_kind, kl_kind, params, grad);
  return {lp, ent, lse, g_lp, g_h, grad};
}

// inplace_backward=True (docs/losses.md 13.1): dLoss/dlogits overwrites the logits. Safe: the row sweep reads
// every chunk of a row (and the label logit, first) before the gradient sweep writes the same addresses, and
// it re-reads each element just before overwriting it. No [N, V] buffer is allocated, so no fresh pages are
// faulted in, and the gradient's lines are written back to where they were just read from.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_loss_fused_inplace_cpu(
    at::Tensor& logits, const at::Tensor& labels, const std::optional<at::Tensor>& temperature,
    double temperature_scalar, int64_t ignore_index, const at::Tensor& token_inputs, int64_t loss_kind,
    int64_t kl_kind, at::ArrayRef<double> params) {
  check_common(logits, labels, temperature, temperature_scalar);
  TORCH_CHECK(logits.is_contiguous(), "policy_loss_fused: inplace_backward=True needs contiguous logits, got "
              "strides ", logits.strides());
  return fused_into(logits, labels, temperature, temperature_scalar, ignore_index, token_inputs, loss_kind, kl_kind,
                    params, logits);
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

// ---------------------------------------------------------------------------------------------------------
// The fused-linear loss (docs/losses.md 13.1, last paragraph; docs/ops.md 3.1): the same single pass, fed by the lm_head
// matmul one chunk of rows at a time, so the [N, V] logits never exist. Because the upstream gradient of
// every row is known during the forward, each chunk's logits buffer is turned into dLoss/dlogits in place
// and consumed at once by the two backward GEMMs: 3 GEMMs in total (2NVH forward + 4NVH backward, 6NVH),
// no recompute, and the backward of autograd only scales the gradients computed here.
//
//   policy_loss_from_hidden_fused(hidden [N, H], weight [V, H], bias [V]?, labels [N], temperature [N]?,
//       temperature_scalar, ignore_index, token_inputs [N, 6], loss_kind, kl_kind, params, chunk_rows)
//   -> (logprobs, entropy, lse, grad_logprobs, grad_entropy [N], grad_hidden [N, H], grad_weight [V, H],
//       grad_bias [V] (empty without bias))
//
// Memory: the row compaction and chunking of linear_token_logprobs (csrc/cpu/linear_chunks.h): rows whose
// label is ignore_index never reach a GEMM; one [chunk_rows, V] logits buffer in the compute dtype and a
// [chunk_rows, H] gather buffer (chunk_rows = 0: the 64 MiB workspace of linear_chunks.h); the fp32
// accumulator of grad_weight ([V, H], the output itself for fp32 weights); fp32 copies of weight and bias
// for 16-bit inputs (the GEMMs run in fp32 on CPU). Nothing of size N x V.
// ---------------------------------------------------------------------------------------------------------

namespace {

// The fused rows of one chunk of logits (fp32 or fp64: the GEMM's output dtype), in place: each row of x
// becomes dLoss/dlogits.
template <typename acc_t>
void fused_chunk(const RowKernels& k, const LossParams& p, const Chunker& ck, const at::Tensor& x, int64_t s,
                 int64_t len, double temperature_scalar, int64_t ignore_index, const at::Tensor& inputs,
                 at::Tensor& lp, at::Tensor& ent, at::Tensor& lse, at::Tensor& stats, at::Tensor& g_lp,
                 at::Tensor& g_h) {
  BwdArgs<acc_t> a{};
  ck.fill_row_args(a, x, s, ignore_index, temperature_scalar);
  a.logprobs = lp.mutable_data_ptr<acc_t>() + s;
  a.entropy = ent.mutable_data_ptr<acc_t>() + s;
  a.lse = lse.mutable_data_ptr<acc_t>() + s;
  a.stats = stats.mutable_data_ptr<acc_t>() + 2 * s;
  a.grad_logprobs = g_lp.const_data_ptr<acc_t>() + s;
  a.grad_entropy = g_h.const_data_ptr<acc_t>() + s;
  a.grad = x.mutable_data_ptr<acc_t>();  // in place: the chunk's logits become dLoss/dlogits
  a.grad_row_stride = x.stride(0);
  const GradContext<acc_t> ctx{&p, inputs.const_data_ptr<acc_t>() + s * kInputs, g_lp.mutable_data_ptr<acc_t>() + s,
                               g_h.mutable_data_ptr<acc_t>() + s};
  const RowGrad rg{&GradContext<acc_t>::call, &ctx};
  const auto fused = k.fused<acc_t>();
  at::parallel_for(0, len, grain_rows(a.vocab), [&](int64_t b, int64_t e) { fused(a, b, e, rg); });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
policy_loss_from_hidden_fused_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& labels,
                                  const std::optional<at::Tensor>& temperature, double temperature_scalar,
                                  int64_t ignore_index, const at::Tensor& token_inputs, int64_t loss_kind,
                                  int64_t kl_kind, at::ArrayRef<double> params, int64_t chunk_rows) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "policy_loss_from_hidden: hidden must be [N, H] and weight [V, H] with the same H, got ",
              hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu(),
              "policy_loss_from_hidden (cpp): hidden and weight must be CPU tensors");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "policy_loss_from_hidden: hidden (",
              hidden.scalar_type(), ") and weight (", weight.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(weight.size(0) > 0, "policy_loss_from_hidden: the vocabulary size V (weight.size(0)) must be > 0");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == weight.scalar_type(),
                "policy_loss_from_hidden: bias must be [V] = [", weight.size(0), "] of the weight's dtype, got ",
                bias->sizes(), " ", bias->scalar_type());
  }
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == hidden.size(0), "policy_loss_from_hidden: labels must be [N] = [",
              hidden.size(0), "], got ", labels.sizes());
  const LossParams p = parse_params(loss_kind, kl_kind, params);
  const int64_t n = hidden.size(0), hdim = hidden.size(1), vocab = weight.size(0);
  const at::ScalarType acc = compute_type(hidden);
  check_inputs(token_inputs, n, acc);
  // Only the valid rows reach the GEMMs (csrc/cpu/linear_chunks.h); results are [M] until expand_rows.
  const Rows rows = valid_rows(labels, temperature, ignore_index, acc);
  const int64_t m = rows.m;
  const auto opts = hidden.options().dtype(acc);
  at::Tensor lp = at::zeros({m}, opts), ent = at::zeros({m}, opts), lse = at::zeros({m}, opts);
  at::Tensor g_lp = at::zeros({m}, opts), g_h = at::zeros({m}, opts);  // 0 for rows the callback skips
  at::Tensor grad_hidden = at::zeros({n, hdim}, hidden.options());
  at::Tensor grad_w = at::zeros({vocab, hdim}, opts);
  at::Tensor grad_b = has_bias ? at::zeros({vocab}, opts) : at::Tensor();
  if (m > 0) {
    Chunker ck(hidden, weight, bias, rows, chunk_rows);
    GradSink sink(ck, grad_hidden, grad_w, grad_b);
    const at::Tensor inputs = rows.select(token_inputs).contiguous();
    at::Tensor stats = at::empty({m, 2}, opts);
    const RowKernels& k = row_kernels();
    for (int64_t s = 0; s < m; s += ck.chunk) {
      const int64_t len = std::min(ck.chunk, m - s);
      const at::Tensor h = ck.gather(s, len);
      const at::Tensor x = ck.logits_of(h);
      AT_DISPATCH_FLOATING_TYPES(acc, "policy_loss_from_hidden_fused_cpu", [&] {
        fused_chunk<scalar_t>(k, p, ck, x, s, len, temperature_scalar, ignore_index, inputs, lp, ent, lse, stats,
                              g_lp, g_h);
      });
      sink.add(ck, s, len, x, h);  // x now holds dLoss/dlogits
    }
  }
  at::Tensor grad_weight = grad_w.to(weight.scalar_type());
  at::Tensor grad_bias = has_bias ? grad_b.to(weight.scalar_type()) : at::empty({0}, weight.options());
  return {expand_rows(lp, rows, n), expand_rows(ent, rows, n), expand_rows(lse, rows, n), expand_rows(g_lp, rows, n),
          expand_rows(g_h, rows, n), grad_hidden, grad_weight, grad_bias};
}

TORCH_LIBRARY_IMPL(reasonrl, CPU, m) {
  m.impl("policy_loss_fused", &policy_loss_fused_cpu);
  m.impl("policy_loss_fused_inplace", &policy_loss_fused_inplace_cpu);
  m.impl("policy_loss_token_grad", &policy_loss_token_grad_cpu);
  m.impl("policy_loss_from_hidden_fused", &policy_loss_from_hidden_fused_cpu);
}

}  // namespace reasonrl
