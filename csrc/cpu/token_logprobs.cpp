// token_logprobs on CPU (docs/ops.md section 2): argument checks and threading over the row kernels (row_kernels.h).
//
//   reasonrl::token_logprobs_fwd(logits [N, V], labels [N], temperature [N] | None, temperature_scalar,
//                                ignore_index, want_entropy, want_rank, inplace_backward)
//                                -> (logprobs, entropy, rank, lse, stats [N, 2] = (row max, log-sum))
//   reasonrl::token_logprobs_bwd(grad_logprobs?, grad_entropy?, logits, labels, temperature?, ...,
//                                stats, entropy) -> grad_logits [N, V] (logits dtype, contiguous)
//   reasonrl::token_logprobs_bwd_inplace(...): same, written into the storage of `logits`.
//
// Vocab-parallel mode (docs/ops.md 3.3; the defaults vocab_start = 0, vocab_global = 0 are the unsharded op):
// `logits` are the global columns [vocab_start, vocab_start + V) of a vocabulary of vocab_global ids and
// labels are global ids. The forward then returns this shard's statistics (rows whose label another rank
// owns get logprobs = -inf) and, given `label_logit` [N] (the raw label logit), counts the rank against
// it; the backward takes the GLOBAL (M, log S) and entropy and writes the one-hot term on the owner only.
// The collectives that combine the shards live in reasonrl/ops/token_logprobs.py.
//
// The Python layer (reasonrl/ops/token_logprobs.py) flattens leading dimensions to N, validates values
// (label range, temperature, NaN) and joins forward and backward with torch.library.register_autograd.
// This file only checks what would otherwise be memory-unsafe. Outputs are fp32 (fp64 for fp64 logits);
// `entropy` / `rank` are empty tensors when not requested. Extra memory is O(N) plus an 8 KiB stack buffer
// per thread: the forward never allocates anything proportional to N x V.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "cpu_utils.h"
#include "row_kernels.h"

namespace reasonrl {

namespace {

// The vocab-parallel arguments of the ops, checked once and copied into the row arguments.
struct Shard {
  int64_t vocab_start = 0;
  int64_t vocab_global = 0;
  at::Tensor label_logit;  // [N] contiguous in the accumulation dtype (fp64 for fp64 logits), or undefined
  template <typename Args>
  void fill(Args& a) const {
    using acc_t = std::remove_cv_t<std::remove_pointer_t<decltype(a.logprobs)>>;
    a.vocab_start = vocab_start;
    a.vocab_global = vocab_global;
    a.label_logit = label_logit.defined() ? label_logit.const_data_ptr<acc_t>() : nullptr;
  }
};

Shard make_shard(const at::Tensor& logits, int64_t vocab_start, int64_t vocab_global,
                 const std::optional<at::Tensor>& label_logit) {
  TORCH_CHECK(vocab_start >= 0 && vocab_global >= 0,
              "token_logprobs: vocab_start and vocab_global must be >= 0, got ", vocab_start, " and ", vocab_global);
  TORCH_CHECK(vocab_global == 0 || vocab_start + logits.size(1) <= vocab_global,
              "token_logprobs: the shard [vocab_start, vocab_start + V) = [", vocab_start, ", ",
              vocab_start + logits.size(1), ") does not fit in the global vocabulary of vocab_global = ",
              vocab_global, " ids");
  TORCH_CHECK(vocab_global > 0 || vocab_start == 0,
              "token_logprobs: vocab_start = ", vocab_start, " needs vocab_global (the global vocabulary size)");
  Shard s;
  s.vocab_start = vocab_start;
  s.vocab_global = vocab_global;
  if (label_logit.has_value() && label_logit->defined()) {
    TORCH_CHECK(label_logit->numel() == logits.size(0) && label_logit->device().is_cpu(),
                "token_logprobs (cpp): label_logit must be a CPU tensor of N = ", logits.size(0),
                " elements, got ", label_logit->sizes(), " on ", label_logit->device());
    const at::ScalarType acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    s.label_logit = label_logit->to(acc).reshape({-1}).contiguous();
  }
  return s;
}

template <typename scalar_t, typename Kern>
void run_fwd(const Kern (&table)[4], const at::Tensor& x, const at::Tensor& labels64, const at::Tensor& temp,
             double temperature_scalar, int64_t ignore_index, at::Tensor& lp, at::Tensor& ent, at::Tensor& rank,
             at::Tensor& lse, at::Tensor& stats, bool want_entropy, bool want_rank, const Shard& shard) {
  using acc_t = typename RowArgs<scalar_t>::acc_t;
  RowArgs<scalar_t> a{};
  fill_row_args(a, x, labels64, temp, temperature_scalar, ignore_index);
  shard.fill(a);
  a.logprobs = lp.mutable_data_ptr<acc_t>();
  a.entropy = want_entropy ? ent.mutable_data_ptr<acc_t>() : nullptr;
  a.rank = want_rank ? rank.mutable_data_ptr<int32_t>() : nullptr;
  a.lse = lse.mutable_data_ptr<acc_t>();
  a.stats = stats.mutable_data_ptr<acc_t>();
  const Kern kern = table[int(want_entropy) + 2 * int(want_rank)];
  at::parallel_for(0, x.size(0), grain_rows(a.vocab), [&](int64_t b, int64_t e) { kern(a, b, e); });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& labels, const std::optional<at::Tensor>& temperature,
    double temperature_scalar, int64_t ignore_index, bool want_entropy, bool want_rank,
    bool /*inplace_backward: read by the autograd backward only*/, int64_t vocab_start, int64_t vocab_global,
    const std::optional<at::Tensor>& label_logit) {
  check_common(logits, labels, temperature, temperature_scalar);
  const Shard shard = make_shard(logits, vocab_start, vocab_global, label_logit);
  const int64_t n = logits.size(0);
  const at::ScalarType acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = logits.options().dtype(acc);
  at::Tensor lp = at::empty({n}, opts);
  at::Tensor lse = at::empty({n}, opts);
  at::Tensor stats = at::empty({n, 2}, opts);
  at::Tensor ent = at::empty({want_entropy ? n : 0}, opts);
  at::Tensor rank = at::empty({want_rank ? n : 0}, opts.dtype(at::kInt));
  if (n == 0) return {lp, ent, rank, lse, stats};
  const at::Tensor x = vocab_contiguous(logits);
  const at::Tensor labels64 = labels.to(at::kLong).contiguous();
  const at::Tensor temp = temperature_rows(temperature, n, acc);
  const RowKernels& k = row_kernels();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "token_logprobs_fwd_cpu", [&] {
    run_fwd<scalar_t>(k.fwd<scalar_t>(), x, labels64, temp, temperature_scalar, ignore_index, lp, ent, rank, lse,
                      stats, want_entropy, want_rank, shard);
  });
  return {lp, ent, rank, lse, stats};
}

namespace {

template <typename scalar_t, typename Kern>
void run_bwd(Kern kern, const std::optional<at::Tensor>& g_lp, const std::optional<at::Tensor>& g_h,
             const at::Tensor& x, const at::Tensor& labels64, const at::Tensor& temp, double temperature_scalar,
             int64_t ignore_index, const at::Tensor& stats, const at::Tensor& entropy, const Shard& shard,
             at::Tensor& grad) {
  using acc_t = typename RowArgs<scalar_t>::acc_t;
  BwdArgs<scalar_t> a{};
  fill_row_args(a, x, labels64, temp, temperature_scalar, ignore_index);
  shard.fill(a);
  a.stats = const_cast<acc_t*>(stats.const_data_ptr<acc_t>());
  a.entropy = g_h.has_value() ? const_cast<acc_t*>(entropy.const_data_ptr<acc_t>()) : nullptr;
  a.grad_logprobs = g_lp.has_value() ? g_lp->const_data_ptr<acc_t>() : nullptr;
  a.grad_entropy = g_h.has_value() ? g_h->const_data_ptr<acc_t>() : nullptr;
  a.grad = grad.mutable_data_ptr<scalar_t>();
  a.grad_row_stride = grad.stride(0);
  at::parallel_for(0, x.size(0), grain_rows(a.vocab), [&](int64_t b, int64_t e) { kern(a, b, e); });
}

std::optional<at::Tensor> upstream(const std::optional<at::Tensor>& g, int64_t n, at::ScalarType acc,
                                   const char* name) {
  if (!g.has_value() || !g->defined()) return std::nullopt;
  TORCH_CHECK(g->numel() == n, "token_logprobs backward: ", name, " must have N = ", n, " elements, got ",
              g->sizes());
  return g->to(acc).reshape({n}).contiguous();
}

void bwd_into(const std::optional<at::Tensor>& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
              const at::Tensor& logits, const at::Tensor& labels, const std::optional<at::Tensor>& temperature,
              double temperature_scalar, int64_t ignore_index, const at::Tensor& stats, const at::Tensor& entropy,
              int64_t vocab_start, int64_t vocab_global, at::Tensor& grad) {
  check_common(logits, labels, temperature, temperature_scalar);
  const Shard shard = make_shard(logits, vocab_start, vocab_global, std::nullopt);
  const int64_t n = logits.size(0);
  if (n == 0) return;
  const at::ScalarType acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto g_lp = upstream(grad_logprobs, n, acc, "grad_logprobs");
  const auto g_h = upstream(grad_entropy, n, acc, "grad_entropy");
  TORCH_CHECK(stats.numel() == 2 * n, "token_logprobs backward: stats must be the forward's [N, 2] = [", n,
              ", 2], got ", stats.sizes());
  TORCH_CHECK(!g_h.has_value() || entropy.numel() == n,
              "token_logprobs backward: a gradient for entropy needs the forward's entropy (want_entropy=True)");
  const at::Tensor stats_c = stats.to(acc).contiguous();
  const at::Tensor ent_c = g_h.has_value() ? entropy.to(acc).contiguous() : entropy;
  const at::Tensor x = vocab_contiguous(logits);
  const at::Tensor labels64 = labels.to(at::kLong).contiguous();
  const at::Tensor temp = temperature_rows(temperature, n, acc);
  const RowKernels& k = row_kernels();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "token_logprobs_bwd_cpu", [&] {
    run_bwd<scalar_t>(k.bwd<scalar_t>(), g_lp, g_h, x, labels64, temp, temperature_scalar, ignore_index, stats_c,
                      ent_c, shard, grad);
  });
}

}  // namespace

at::Tensor token_logprobs_bwd_cpu(const std::optional<at::Tensor>& grad_logprobs,
                                  const std::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
                                  const at::Tensor& labels, const std::optional<at::Tensor>& temperature,
                                  double temperature_scalar, int64_t ignore_index, const at::Tensor& stats,
                                  const at::Tensor& entropy, int64_t vocab_start, int64_t vocab_global) {
  at::Tensor grad = empty_gradient(logits);
  bwd_into(grad_logprobs, grad_entropy, logits, labels, temperature, temperature_scalar, ignore_index, stats,
           entropy, vocab_start, vocab_global, grad);
  return grad;
}

void token_logprobs_bwd_inplace_cpu(const std::optional<at::Tensor>& grad_logprobs,
                                    const std::optional<at::Tensor>& grad_entropy, at::Tensor& logits,
                                    const at::Tensor& labels, const std::optional<at::Tensor>& temperature,
                                    double temperature_scalar, int64_t ignore_index, const at::Tensor& stats,
                                    const at::Tensor& entropy, int64_t vocab_start, int64_t vocab_global) {
  // Safe in place: the kernels read each chunk of a row before writing the same addresses, and read the
  // label logit before the row loop starts.
  TORCH_CHECK(logits.is_contiguous(), "token_logprobs: inplace_backward=True needs contiguous logits");
  bwd_into(grad_logprobs, grad_entropy, logits, labels, temperature, temperature_scalar, ignore_index, stats,
           entropy, vocab_start, vocab_global, logits);
}

TORCH_LIBRARY_IMPL(reasonrl, CPU, m) {
  m.impl("token_logprobs_fwd", &token_logprobs_fwd_cpu);
  m.impl("token_logprobs_bwd", &token_logprobs_bwd_cpu);
  m.impl("token_logprobs_bwd_inplace", &token_logprobs_bwd_inplace_cpu);
}

}  // namespace reasonrl
