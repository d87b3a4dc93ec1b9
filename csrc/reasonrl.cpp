// The reasonrl._C extension: op schemas (declared once, here) and a small pybind11 module that reports how
// the extension was built. Ops never go through pybind11: the CPU kernels are registered with
// TORCH_LIBRARY_IMPL (csrc/cpu/*.cpp; on GPUs the ops are Triton triton_ops, reasonrl/ops) and Python reaches
// them through torch.ops.reasonrl, which is what makes them work with autograd, torch.compile and FSDP.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/cpu_utils.h"

TORCH_LIBRARY(reasonrl, m) {
  // token_logprobs (docs/ops.md section 2). logits [N, V]; outputs [N] (entropy / rank empty when not wanted).
  // inplace_backward is not used by the forward kernel: it is recorded so that the autograd backward knows
  // whether to write the gradient into the storage of logits. `stats` [N, 2] holds what the backward needs
  // per row: m = max_j x_j / tau and log sum_j exp(x_j / tau - m); only the paired backward reads it.
  // Vocab-parallel mode (docs/ops.md 3.3): logits hold global columns [vocab_start, vocab_start + V) of
  // vocab_global ids (0 = unsharded), labels are global ids; label_logit [N] (fp32, optional) is the raw label
  // logit shared by its owner rank, the pivot of the rank count. The defaults are the unsharded op.
  m.def(
      "token_logprobs_fwd(Tensor logits, Tensor labels, Tensor? temperature, float temperature_scalar, "
      "int ignore_index, bool want_entropy, bool want_rank, bool inplace_backward, int vocab_start=0, "
      "int vocab_global=0, Tensor? label_logit=None) -> (Tensor logprobs, Tensor entropy, Tensor rank, "
      "Tensor lse, Tensor stats)");
  m.def(
      "token_logprobs_bwd(Tensor? grad_logprobs, Tensor? grad_entropy, Tensor logits, Tensor labels, "
      "Tensor? temperature, float temperature_scalar, int ignore_index, Tensor stats, Tensor entropy, "
      "int vocab_start=0, int vocab_global=0) -> Tensor");
  m.def(
      "token_logprobs_bwd_inplace(Tensor? grad_logprobs, Tensor? grad_entropy, Tensor(a!) logits, "
      "Tensor labels, Tensor? temperature, float temperature_scalar, int ignore_index, Tensor stats, "
      "Tensor entropy, int vocab_start=0, int vocab_global=0) -> ()");
  // linear_token_logprobs (docs/ops.md section 3): token_logprobs(hidden @ weight.T + bias, labels) without the
  // [N, V] logits. hidden [N, H], weight [V, H], bias [V]?; outputs as token_logprobs_fwd (stats [N, 2]).
  // chunk_rows: rows per GEMM chunk (0 = the default workspace). The backward recomputes the logits chunk by
  // chunk; output_mask selects (grad_hidden, grad_weight, grad_bias); gradients not requested are [0].
  // saved_rows (docs/ops.md 3.4): the forward keeps the fp32 (fp64) logits of the first min(saved_rows, M)
  // valid rows in saved_logits [min(saved_rows, N), V]; handed to the backward, those rows are not recomputed.
  // Vocab-parallel mode (docs/ops.md 3.3) as for token_logprobs_fwd: weight / bias are the rows [vocab_start,
  // vocab_start + V) of a vocab_global-id lm_head, labels are global ids, label_logit [N] the shared raw label
  // logit (rank pivot); the outputs are this shard's statistics, combined in Python (ops/vocab_parallel.py).
  m.def(
      "linear_token_logprobs_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor? temperature, "
      "float temperature_scalar, int ignore_index, bool want_entropy, bool want_rank, int chunk_rows, "
      "int vocab_start=0, int vocab_global=0, Tensor? label_logit=None, int saved_rows=0) -> "
      "(Tensor logprobs, Tensor entropy, Tensor rank, Tensor lse, Tensor stats, Tensor saved_logits)");
  m.def(
      "linear_token_logprobs_bwd(Tensor? grad_logprobs, Tensor? grad_entropy, Tensor hidden, Tensor weight, "
      "Tensor? bias, Tensor labels, Tensor? temperature, float temperature_scalar, int ignore_index, "
      "Tensor stats, Tensor entropy, int chunk_rows, bool[3] output_mask, int vocab_start=0, "
      "int vocab_global=0, Tensor? saved_logits=None) -> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  // The single-pass fused policy loss (docs/losses.md section 13.1; csrc/cpu/policy_loss.cpp documents the
  // token_inputs columns, loss_kind / kl_kind codes and the params order). Returns lp, H, LSE, the per-token
  // upstream gradients it used, and dLoss/dlogits, all computed in one sweep over the logits.
  m.def(
      "policy_loss_fused(Tensor logits, Tensor labels, Tensor? temperature, float temperature_scalar, "
      "int ignore_index, Tensor token_inputs, int loss_kind, int kl_kind, float[] params) -> (Tensor logprobs, "
      "Tensor entropy, Tensor lse, Tensor grad_logprobs, Tensor grad_entropy, Tensor grad_logits)");
  // inplace_backward=True: the same sweep writing dLoss/dlogits into the storage of (contiguous) logits.
  m.def(
      "policy_loss_fused_inplace(Tensor(a!) logits, Tensor labels, Tensor? temperature, float temperature_scalar, "
      "int ignore_index, Tensor token_inputs, int loss_kind, int kl_kind, float[] params) -> (Tensor logprobs, "
      "Tensor entropy, Tensor lse, Tensor grad_logprobs, Tensor grad_entropy)");
  // The same from hidden states and the lm_head (csrc/cpu/policy_loss.cpp): logits exist one row chunk at
  // a time; grad_hidden / grad_weight / grad_bias are computed during the forward. chunk_rows 0 = automatic.
  m.def(
      "policy_loss_from_hidden_fused(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor? temperature, "
      "float temperature_scalar, int ignore_index, Tensor token_inputs, int loss_kind, int kl_kind, float[] params, "
      "int chunk_rows) -> (Tensor logprobs, Tensor entropy, Tensor lse, Tensor grad_logprobs, Tensor grad_entropy, "
      "Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  // The per-token functor of policy_loss_fused alone: dLoss/dlp from lp and token_inputs (tests, O(N)).
  // r3_reward (docs/ops.md section 5, forward only; csrc/cpu/r3_reward.cpp). Padded: ref_logprobs [G, K, L] with
  // ref_mask [G, L] bool; packed: [K, M] with ref_cu_seqlens [G + 1] int64. rollout_mask [G, K] bool, baseline
  // [G, L] / [M] in the accumulation dtype, k_g [G] int64 (top-k size per prompt); weighting 0 linear,
  // 1 softmax, 2 topk, 3 uniform; reduction 0 weighted_mean, 1 sum. Outputs in the accumulation dtype.
  m.def(
      "r3_reward_fwd(Tensor ref_logprobs, Tensor? ref_mask, Tensor? ref_cu_seqlens, Tensor rollout_mask, "
      "Tensor? baseline, Tensor k_g, int weighting, float softmax_tau, int reduction, float? propagation_gamma, "
      "int min_valid_rollouts) -> (Tensor reward, Tensor weights, Tensor sigma, Tensor num_valid_rollouts)");
  // phase_entropy / find_boundary (docs/ops.md section 6; csrc/cpu/phase_entropy.cpp). Padded: entropy /
  // token_ids [B, T] with mask [B, T] bool or None; packed: [N] with cu_seqlens [B + 1] int64 (+ mask [N]).
  // boundary [B] int64; means in the accumulation dtype, counts int32. The backward returns d/d entropy
  // (entropy's dtype and shape) from the gradients of the two means. find_boundary_fwd: marker [M] int64 ->
  // the valid-token index [B] int64 of its first occurrence, n_b when absent.
  m.def(
      "phase_entropy_fwd(Tensor entropy, Tensor? mask, Tensor? cu_seqlens, Tensor boundary, int boundary_len) "
      "-> (Tensor mean_before, Tensor mean_after, Tensor count_before, Tensor count_after)");
  m.def(
      "phase_entropy_bwd(Tensor grad_before, Tensor grad_after, Tensor entropy, Tensor? mask, Tensor? cu_seqlens, "
      "Tensor boundary, Tensor count_before, Tensor count_after, int boundary_len) -> Tensor");
  m.def("find_boundary_fwd(Tensor token_ids, Tensor? mask, Tensor? cu_seqlens, Tensor marker) -> Tensor");
  m.def(
      "policy_loss_token_grad(Tensor logprobs, Tensor token_inputs, int loss_kind, int kl_kind, float[] params) "
      "-> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "reasonrl compiled kernels (ops are registered under torch.ops.reasonrl)";
  module.def("build_info", [] {
    pybind11::dict info;
#if defined(_OPENMP)
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    pybind11::list isas;
    isas.append("default");
#if defined(REASONRL_HAVE_AVX2)
    isas.append("avx2");
#endif
#if defined(REASONRL_HAVE_AVX512)
    isas.append("avx512");
#endif
    info["cpu_isas_built"] = isas;
    info["cpu_isa_selected"] = std::string(reasonrl::row_kernels_isa());
    info["parallel"] = at::get_parallel_info();
    return info;
  });
}
