// linear_token_logprobs on CPU (docs/ops.md section 3): token_logprobs(hidden @ weight.T + bias, labels, ...)
// without ever materialising the N x V logits.
//
//   reasonrl::linear_token_logprobs_fwd(hidden [N, H], weight [V, H], bias [V]?, labels [N], temperature [N]?,
//       temperature_scalar, ignore_index, want_entropy, want_rank, chunk_rows,
//       vocab_start = 0, vocab_global = 0, label_logit [N]? = None, saved_rows = 0)
//       -> (logprobs, entropy, rank, lse, stats [N, 2] = (row max, log-sum),
//           saved_logits [min(saved_rows, N), V])
//   reasonrl::linear_token_logprobs_bwd(grad_logprobs?, grad_entropy?, hidden, weight, bias?, labels,
//       temperature?, temperature_scalar, ignore_index, stats, entropy, chunk_rows, output_mask[3],
//       vocab_start = 0, vocab_global = 0, saved_logits? = None)
//       -> (grad_hidden [N, H] | [0], grad_weight [V, H] | [0], grad_bias [V] | [0])
//
// Strategy (one chunk of rows at a time, with the compaction and chunking of csrc/cpu/linear_chunks.h; the
// Python layer in reasonrl/ops/linear_token_logprobs.py flattens leading dimensions, validates values and joins
// the two ops with torch.library.register_autograd):
//  * Compaction (docs/ops.md 3.1): rows whose label is ignore_index are dropped before any GEMM, so the cost is
//    proportional to the number of valid rows; their outputs, stats and gradient rows are 0.
//  * Forward, per chunk of C valid rows: the rows of hidden are gathered into a [C, H] buffer, the logits
//    chunk x = h W^T (+ b) is computed by ATen's GEMM (at::mm_out / at::addmm_out, its own threading) into
//    a preallocated [C, V] buffer in the compute dtype, and the token_logprobs row kernels
//    (row_kernels(), at::parallel_for over the rows) reduce it to log-prob, entropy, rank, LSE
//    and the per-row stats (m, log s) that the backward needs. The logits are the GEMM's fp32 accumulator,
//    never rounded to the input dtype.
//  * Backward, per chunk: recompute x (the same GEMM on the same rows, so bitwise the forward's x), turn it
//    into dlogits IN PLACE with the backward row kernel (docs/ops.md 2.3, including 1/tau), then
//    grad_hidden[rows] = dx W, grad_weight += dx^T h, grad_bias += sum_rows dx, all fp32 (fp64) GEMMs
//    accumulating in fp32 (fp64).
//  * Saved logits (saved_rows > 0, docs/ops.md 3.4): the first K valid rows, K = M when they all fit in
//    saved_rows, else saved_rows rounded down to whole chunks of C rows (kept_rows: the chunk boundaries, so
//    the results, are then those of the recompute path, bit for bit). For the chunks of those rows the
//    forward's GEMM writes the logits straight into the returned saved_logits [min(saved_rows, N), V]
//    instead of the workspace (its rows past K are unused and uninitialised, never touched: the shape
//    depends on N, not on the label values, so that the fake op can give it), and the backward reads them
//    back instead of recomputing: 6NVH instead of 8NVH for those rows. What is kept is the raw fp32 (fp64)
//    GEMM output, not the probabilities exp(z / tau - m - log s): the backward row kernel then runs on
//    exactly the values it would have recomputed (the same chunk GEMM), so the gradients are those of the
//    recompute path, and the kernel is unchanged (it needs z anyway for the entropy term, and the exp it
//    redoes is O(V) per row against the O(V H) of the GEMM it replaces). The backward writes dx into the
//    workspace, never into saved_logits: a second backward (retain_graph=True) reads them again.
//  * Extra memory: the [C, V] chunk buffer and a [C, H] gather buffer (the workspace, default
//    kDefaultWorkspaceBytes: see chunk_rows_for), O(N) statistics, and when gradients are needed the fp32
//    grad_weight accumulator (V H 4 bytes; for fp32 weights it IS the returned gradient) and grad_hidden;
//    with saved_rows, saved_logits (at most saved_rows x V in the compute dtype) from the forward to the end
//    of the backward. A forward whose chunks are all kept never allocates the [C, V] workspace.
//  * bf16 / fp16 inputs: the GEMMs run in fp32 on upcast operands: the weight is converted once per call
//    (V H 4 bytes, the size of the fp32 grad_weight accumulator the backward needs anyway) and each chunk
//    of hidden when it is gathered. ATen's CPU bf16 GEMM would round the logits (and dlogits) to bf16,
//    which the contract of docs/ops.md 3 forbids, and an fp32-output mixed GEMM is not available on CPU.
//    Gradients are rounded to the input dtype once, at the end.
//  * fp64 inputs: everything in fp64 (the scalar fp64 row kernels), for gradcheck.
//
// Limits: chunking is over rows only (each chunk holds full vocabulary rows, which is what lets the
// token_logprobs row kernels run unchanged as the epilogue); the weight is streamed once per chunk, so
// chunks must be tall enough for the GEMM to be compute-bound (see chunk_rows_for).
//
// Vocab-parallel mode (docs/ops.md 3.3; vocab_start / vocab_global, defaults = unsharded): weight and bias are the
// rows [vocab_start, vocab_start + V) of the global lm_head and labels are global ids. The ops only fill the
// RowArgs sharded-label fields: the row kernels then write this shard's statistics (logprobs = -inf on rows
// whose label another rank owns) and the backward omits the one-hot term there. The collectives and the
// combine are in Python (reasonrl/ops/vocab_parallel.py); the backward is handed the global statistics.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>

#include "cpu_utils.h"
#include "linear_chunks.h"
#include "row_kernels.h"

namespace reasonrl {

namespace {

void check_linear(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& labels, const std::optional<at::Tensor>& temperature,
                  double temperature_scalar) {
  TORCH_CHECK(hidden.dim() == 2, "linear_token_logprobs: hidden must be 2-D [N, H] at this level, got ",
              hidden.sizes());
  TORCH_CHECK(weight.dim() == 2, "linear_token_logprobs: weight must be 2-D [V, H], got ", weight.sizes());
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu(),
              "linear_token_logprobs (cpp): hidden and weight must be CPU tensors");
  const auto dt = hidden.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
              "linear_token_logprobs (cpp): hidden must be float32, bfloat16, float16 or float64, got ", dt);
  TORCH_CHECK(weight.scalar_type() == dt, "linear_token_logprobs: weight dtype ", weight.scalar_type(),
              " differs from hidden dtype ", dt);
  TORCH_CHECK(weight.size(0) > 0, "linear_token_logprobs: the vocabulary size V = weight.size(0) must be > 0");
  TORCH_CHECK(hidden.size(1) > 0 && weight.size(1) == hidden.size(1),
              "linear_token_logprobs: weight must be [V, H] with H = hidden.size(-1) = ", hidden.size(1),
              " > 0, got ", weight.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "linear_token_logprobs: bias must be [V] = [",
                weight.size(0), "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == dt, "linear_token_logprobs: bias dtype ", bias->scalar_type(),
                " differs from hidden dtype ", dt);
    TORCH_CHECK(bias->device().is_cpu(), "linear_token_logprobs (cpp): bias must be a CPU tensor");
  }
  check_labels("linear_token_logprobs", labels, hidden.size(0));
  check_temperature("linear_token_logprobs", temperature, temperature_scalar, hidden.size(0));
}

void check_shard(int64_t vocab, int64_t vocab_start, int64_t vocab_global) {
  TORCH_CHECK(vocab_start >= 0 && vocab_global >= 0, "linear_token_logprobs: vocab_start and vocab_global must be "
              ">= 0, got ", vocab_start, " and ", vocab_global);
  TORCH_CHECK(vocab_global == 0 || vocab_start + vocab <= vocab_global,
              "linear_token_logprobs: the shard [vocab_start, vocab_start + V) = [", vocab_start, ", ",
              vocab_start + vocab, ") does not fit in the global vocabulary of vocab_global = ", vocab_global, " ids");
  TORCH_CHECK(vocab_global > 0 || vocab_start == 0, "linear_token_logprobs: vocab_start = ", vocab_start,
              " needs vocab_global (the global vocabulary size)");
}

template <typename acc_t>
using FwdKern = void (*)(const RowArgs<acc_t>&, int64_t, int64_t);

// Valid rows whose logits are kept: all M when they fit in saved_rows, else whole chunks only, so that the
// chunk boundaries (hence the GEMMs, hence every bit of the results) are those of the recompute path. The
// Python layer already rounds saved_rows to whole chunks; this keeps the op's results independent of it.
int64_t kept_rows(int64_t saved_rows, const Chunker& ck) {
  const int64_t m = ck.rows->m;
  return saved_rows >= m ? m : saved_rows / ck.chunk * ck.chunk;
}

// The chunk schedule of one call: rows [0, k) (whose logits live in `saved`, rows [0, k) of it) then rows
// [k, m) (recomputed in the workspace), each range in chunks of ck.chunk rows (k = kept_rows(): M or whole
// chunks, so these are the chunks of the recompute path). fn(s, len, x) gets the chunk
// [s, s + len) and its rows of `saved` (or an undefined tensor for a workspace chunk).
template <typename Fn>
void for_each_chunk(const Chunker& ck, int64_t k, const at::Tensor& saved, Fn&& fn) {
  const int64_t m = ck.rows->m;
  for (int64_t s = 0; s < k; s += ck.chunk) {
    const int64_t len = std::min(ck.chunk, k - s);
    fn(s, len, saved.narrow(0, s, len));
  }
  for (int64_t s = k; s < m; s += ck.chunk) fn(s, std::min(ck.chunk, m - s), at::Tensor());
}

template <typename acc_t>
void fwd_chunks(Chunker& ck, FwdKern<acc_t> kern, double temperature_scalar, int64_t ignore_index,
                int64_t vocab_start, int64_t vocab_global, const at::Tensor& label_logit, at::Tensor& lp,
                at::Tensor& ent, at::Tensor& rank, at::Tensor& lse, at::Tensor& stats, int64_t k,
                const at::Tensor& saved) {
  const int64_t vocab = ck.weight.size(0);
  for_each_chunk(ck, k, saved, [&](int64_t s, int64_t len, const at::Tensor& keep) {
    const at::Tensor h = ck.gather(s, len);
    const at::Tensor x = keep.defined() ? ck.logits_into(h, keep) : ck.logits_of(h);
    RowArgs<acc_t> a{};
    ck.fill_row_args(a, x, s, ignore_index, temperature_scalar);
    a.logprobs = lp.mutable_data_ptr<acc_t>() + s;
    a.entropy = ent.numel() ? ent.mutable_data_ptr<acc_t>() + s : nullptr;
    a.rank = rank.numel() ? rank.mutable_data_ptr<int32_t>() + s : nullptr;
    a.lse = lse.mutable_data_ptr<acc_t>() + s;
    a.stats = stats.mutable_data_ptr<acc_t>() + 2 * s;
    a.vocab_start = vocab_start;
    a.vocab_global = vocab_global;
    a.label_logit = label_logit.defined() ? label_logit.const_data_ptr<acc_t>() + s : nullptr;
    at::parallel_for(0, len, grain_rows(vocab), [&](int64_t b, int64_t e) { kern(a, b, e); });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, const std::optional<at::Tensor>& temperature, double temperature_scalar,
    int64_t ignore_index, bool want_entropy, bool want_rank, int64_t chunk_rows, int64_t vocab_start,
    int64_t vocab_global, const std::optional<at::Tensor>& label_logit, int64_t saved_rows) {
  check_linear(hidden, weight, bias, labels, temperature, temperature_scalar);
  check_shard(weight.size(0), vocab_start, vocab_global);
  TORCH_CHECK(saved_rows >= 0, "linear_token_logprobs: saved_rows must be >= 0, got ", saved_rows);
  const int64_t n = hidden.size(0);
  const at::ScalarType acc = compute_type(hidden);
  const Rows rows = valid_rows(labels, temperature, ignore_index, acc);
  const int64_t m = rows.m;
  const auto opts = hidden.options().dtype(acc);
  at::Tensor lp = at::empty({m}, opts), lse = at::empty({m}, opts), stats = at::empty({m, 2}, opts);
  at::Tensor ent = at::empty({want_entropy ? m : 0}, opts);
  at::Tensor rank = at::empty({want_rank ? m : 0}, opts.dtype(at::kInt));
  at::Tensor saved = at::empty({std::min(saved_rows, n), weight.size(0)}, opts);
  if (m > 0) {
    Chunker ck(hidden, weight, bias, rows, chunk_rows);
    const int64_t kept = kept_rows(saved_rows, ck);  // rows of `saved` holding logits
    at::Tensor pivot;  // [M] in the compute dtype, compacted like the rows
    if (label_logit.has_value() && label_logit->defined()) {
      TORCH_CHECK(label_logit->numel() == n && label_logit->device().is_cpu(),
                  "linear_token_logprobs (cpp): label_logit must be a CPU tensor of N = ", n, " elements, got ",
                  label_logit->sizes(), " on ", label_logit->device());
      pivot = rows.select(label_logit->to(acc).reshape({n})).contiguous();
    }
    const RowKernels& k = row_kernels();
    const int which = int(want_entropy) + 2 * int(want_rank);
    AT_DISPATCH_FLOATING_TYPES(acc, "linear_token_logprobs_fwd_cpu", [&] {
      fwd_chunks<scalar_t>(ck, k.fwd<scalar_t>()[which], temperature_scalar, ignore_index, vocab_start,
                           vocab_global, pivot, lp, ent, rank, lse, stats, kept, saved);
    });
  }
  // Rows of saved_logits past the kept ones (kept < min(saved_rows, N) only when ignored rows make M < N) are
  // never written nor read. They are left uninitialised on purpose: their pages are never touched, so they
  // cost no resident memory, and in an RL batch whose prompt rows are ignored they can be most of the buffer.
  if (!rows.idx.defined()) return {lp, ent, rank, lse, stats, saved};
  return {expand_rows(lp, rows, n), want_entropy ? expand_rows(ent, rows, n) : ent,
          want_rank ? expand_rows(rank, rows, n) : rank, expand_rows(lse, rows, n), expand_rows(stats, rows, n),
          saved};
}

namespace {

template <typename acc_t>
void bwd_chunks(Chunker& ck, void (*kern)(const BwdArgs<acc_t>&, int64_t, int64_t), const at::Tensor& g_lp,
                const at::Tensor& g_h, const at::Tensor& stats, const at::Tensor& entropy, double temperature_scalar,
                int64_t ignore_index, int64_t vocab_start, int64_t vocab_global, at::Tensor& grad_hidden,
                at::Tensor& gw_acc, at::Tensor& gb_acc, int64_t k, const at::Tensor& saved) {
  const int64_t vocab = ck.weight.size(0);
  GradSink sink(ck, grad_hidden, gw_acc, gb_acc);
  for_each_chunk(ck, k, saved, [&](int64_t s, int64_t len, const at::Tensor& keep) {
    const at::Tensor h = ck.gather(s, len);
    // A saved chunk is read (its logits are the forward's GEMM output) and dx goes to the workspace; a
    // recomputed one becomes dx in place.
    const at::Tensor x = keep.defined() ? keep : ck.logits_of(h);
    const at::Tensor dx = keep.defined() ? ck.workspace(len) : x;
    BwdArgs<acc_t> a{};
    ck.fill_row_args(a, x, s, ignore_index, temperature_scalar);
    a.stats = const_cast<acc_t*>(stats.const_data_ptr<acc_t>()) + 2 * s;
    a.entropy = g_h.defined() ? const_cast<acc_t*>(entropy.const_data_ptr<acc_t>()) + s : nullptr;
    a.grad_logprobs = g_lp.defined() ? g_lp.const_data_ptr<acc_t>() + s : nullptr;
    a.grad_entropy = g_h.defined() ? g_h.const_data_ptr<acc_t>() + s : nullptr;
    a.vocab_start = vocab_start;
    a.vocab_global = vocab_global;
    // In place for a recomputed chunk (safe: the row kernels read each piece of a row before writing it, and
    // the label logit before the row loop): x becomes dx.
    a.grad = dx.mutable_data_ptr<acc_t>();
    a.grad_row_stride = dx.stride(0);
    at::parallel_for(0, len, grain_rows(vocab), [&](int64_t b, int64_t e) { kern(a, b, e); });
    sink.add(ck, s, len, dx, h);
  });
}

at::Tensor upstream(const std::optional<at::Tensor>& g, int64_t n, const Rows& rows, at::ScalarType acc,
                    const char* name) {
  if (!g.has_value() || !g->defined()) return at::Tensor();
  TORCH_CHECK(g->numel() == n, "linear_token_logprobs backward: ", name, " must have N = ", n, " elements, got ",
              g->sizes());
  return rows.select(g->to(acc).reshape({n})).contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_bwd_cpu(
    const std::optional<at::Tensor>& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, const std::optional<at::Tensor>& temperature, double temperature_scalar,
    int64_t ignore_index, const at::Tensor& stats, const at::Tensor& entropy, int64_t chunk_rows,
    std::array<bool, 3> output_mask, int64_t vocab_start, int64_t vocab_global,
    const std::optional<at::Tensor>& saved_logits) {
  check_linear(hidden, weight, bias, labels, temperature, temperature_scalar);
  check_shard(weight.size(0), vocab_start, vocab_global);
  const int64_t n = hidden.size(0);
  const at::ScalarType acc = compute_type(hidden);
  at::Tensor saved;  // the forward's saved_logits; undefined or empty: recompute every chunk
  if (saved_logits.has_value() && saved_logits->defined() && saved_logits->numel() > 0) {
    saved = *saved_logits;
    TORCH_CHECK(saved.dim() == 2 && saved.size(0) <= n && saved.size(1) == weight.size(0) &&
                    saved.scalar_type() == acc && saved.is_contiguous() && saved.device().is_cpu(),
                "linear_token_logprobs backward: saved_logits must be the forward's contiguous CPU [K <= N, V] = "
                "[K <= ", n, ", ", weight.size(0), "] ", acc, " tensor, got ", saved.sizes(), " ",
                saved.scalar_type());
  }
  TORCH_CHECK(stats.numel() == 2 * n, "linear_token_logprobs backward: stats must be the forward's [N, 2] = [", n,
              ", 2], got ", stats.sizes());
  TORCH_CHECK(output_mask[2] == false || bias.has_value(),
              "linear_token_logprobs backward: a bias gradient was requested without a bias");
  const Rows rows = valid_rows(labels, temperature, ignore_index, acc);
  const at::Tensor g_lp = upstream(grad_logprobs, n, rows, acc, "grad_logprobs");
  const at::Tensor g_h = upstream(grad_entropy, n, rows, acc, "grad_entropy");
  TORCH_CHECK(!g_h.defined() || entropy.numel() == n,
              "linear_token_logprobs backward: a gradient for entropy needs the forward's entropy (want_entropy=True)");

  // Results: gradients in the dtype of their tensor; ignored rows of grad_hidden are 0. Not requested: [0].
  at::Tensor grad_hidden = output_mask[0] ? at::zeros(hidden.sizes(), hidden.options()) : at::Tensor();
  // fp32 / fp64 weights accumulate straight into the returned gradient; 16-bit ones into an fp32 buffer.
  at::Tensor gw_acc = output_mask[1] ? at::zeros(weight.sizes(), weight.options().dtype(acc)) : at::Tensor();
  at::Tensor gb_acc = output_mask[2] ? at::zeros({weight.size(0)}, weight.options().dtype(acc)) : at::Tensor();
  const bool any = output_mask[0] || output_mask[1] || output_mask[2];
  if (rows.m > 0 && any && (g_lp.defined() || g_h.defined())) {
    const at::Tensor stats_c = rows.select(stats.to(acc).reshape({n, 2})).contiguous();
    const at::Tensor ent_c = g_h.defined() ? rows.select(entropy.to(acc).reshape({n})).contiguous() : at::Tensor();
    Chunker ck(hidden, weight, bias, rows, chunk_rows);
    const int64_t kept = saved.defined() ? kept_rows(saved.size(0), ck) : 0;
    const RowKernels& k = row_kernels();
    AT_DISPATCH_FLOATING_TYPES(acc, "linear_token_logprobs_bwd_cpu", [&] {
      bwd_chunks<scalar_t>(ck, k.bwd<scalar_t>(), g_lp, g_h, stats_c, ent_c, temperature_scalar, ignore_index,
                           vocab_start, vocab_global, grad_hidden, gw_acc, gb_acc, kept, saved);
    });
  }
  const auto empty = [&](const at::Tensor& like) { return at::empty({0}, like.options()); };
  return {output_mask[0] ? grad_hidden : empty(hidden),
          output_mask[1] ? gw_acc.to(weight.scalar_type()) : empty(weight),
          output_mask[2] ? gb_acc.to(weight.scalar_type()) : empty(weight)};
}

TORCH_LIBRARY_IMPL(reasonrl, CPU, m) {
  m.impl("linear_token_logprobs_fwd", &linear_token_logprobs_fwd_cpu);
  m.impl("linear_token_logprobs_bwd", &linear_token_logprobs_bwd_cpu);
}

}  // namespace reasonrl
