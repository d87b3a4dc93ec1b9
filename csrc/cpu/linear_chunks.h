// Row compaction and GEMM chunking of the CPU ops that start from hidden states and the lm_head:
// linear_token_logprobs (linear_logprobs.cpp) and the fused-linear policy loss (policy_loss.cpp).
//
//  * Compaction (docs/ops.md 3.1): rows whose label is ignore_index are dropped before any GEMM (valid_rows), so
//    the cost is proportional to the number of valid rows; results are scattered back with zeros in the
//    ignored rows (expand_rows).
//  * Chunking: one chunk of C valid rows at a time, the rows of hidden gathered (and, for 16-bit inputs,
//    converted) into a [C, H] buffer and the logits x = h W^T (+ b) computed by ATen's GEMM into a
//    preallocated [C, V] buffer in the compute dtype (Chunker): the workspace, kDefaultWorkspaceBytes unless
//    the caller asks for C rows.
//  * Gradients of a chunk's dlogits dx (GradSink): grad_hidden rows = dx W, grad_weight += dx^T h,
//    grad_bias += the column sums of dx, all GEMMs in the compute dtype.
//
// bf16 / fp16 inputs: the GEMMs run in fp32 on upcast operands: the weight is converted once per call
// (V H 4 bytes) and each chunk of hidden when it is gathered. ATen's CPU bf16 GEMM would round the logits
// (and dlogits) to bf16, which the contract of docs/ops.md 3 forbids.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace reasonrl {

// Default workspace of the [C, V] logits chunk. Measured on the 2-core AVX2 machine of the CPU targets
// (MKL sgemm, H = 512, V = 32000): the h W^T GEMM reaches ~70 GFLOP/s at C = 128, ~105 at 256, ~130 at 512
// and ~145 at C >= 1024, because each chunk streams the whole weight once; the two backward GEMMs need
// C >= 512 for the same reason (dx^T h is a rank-C update of the V x H accumulator). 64 MiB is C = 512 at
// V = 32000 and C = 110 at V = 151936, well inside the 256 MiB of docs/ops.md 3.1.
constexpr int64_t kDefaultWorkspaceBytes = int64_t(64) << 20;

// Rows per chunk: `requested`, or as many as the default workspace holds ([C, V] logits + [C, H] rows).
inline int64_t chunk_rows_for(int64_t requested, int64_t rows, int64_t vocab, int64_t hidden, int64_t elem_bytes) {
  const int64_t c = requested > 0 ? requested : kDefaultWorkspaceBytes / ((vocab + hidden) * elem_bytes);
  return std::clamp<int64_t>(c, 1, std::max<int64_t>(rows, 1));
}

inline at::ScalarType compute_type(const at::Tensor& hidden) {
  return hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The valid rows (label != ignore_index) and their per-row inputs, compacted. `idx` is undefined when every
// row is valid (no gathers then: chunks are plain row ranges).
struct Rows {
  at::Tensor idx;          // [M] int64 or undefined
  at::Tensor labels;       // [M] int64, contiguous
  at::Tensor temperature;  // [M] compute dtype, or undefined (scalar temperature)
  int64_t m = 0;

  at::Tensor select(const at::Tensor& full) const { return idx.defined() ? full.index_select(0, idx) : full; }
};

inline Rows valid_rows(const at::Tensor& labels, const std::optional<at::Tensor>& temperature, int64_t ignore_index,
                at::ScalarType acc) {
  const int64_t n = labels.size(0);
  Rows r;
  const at::Tensor labels64 = labels.to(at::kLong).contiguous();
  const at::Tensor idx = labels64.ne(ignore_index).nonzero().squeeze(1);
  r.m = idx.size(0);
  if (r.m < n) r.idx = idx.contiguous();
  r.labels = r.select(labels64).contiguous();
  if (temperature.has_value()) {
    r.temperature = r.select(temperature->to(acc).reshape({-1}).expand({n})).contiguous();
  }
  return r;
}

// Per-call state shared by the forward and the backward: operands in the compute dtype and the workspace.
struct Chunker {
  at::Tensor weight;   // [V, H] compute dtype (the input itself for fp32 / fp64)
  at::Tensor bias;     // [V] compute dtype or undefined
  at::Tensor hidden;   // [N, H] input
  const Rows* rows;
  int64_t chunk;       // rows per chunk
  at::Tensor logits;   // [chunk, V] compute dtype: the workspace, allocated on first use (a call whose chunks
                       // all go to saved logits, linear_logprobs.cpp, never needs it in its forward)
  at::Tensor hbuf;     // [chunk, H] compute dtype: gathered / converted rows of hidden
  at::Tensor hbuf_in;  // [chunk, H] input dtype: gather target before the conversion (16-bit inputs only)

  Chunker(const at::Tensor& hidden_, const at::Tensor& weight_, const std::optional<at::Tensor>& bias_,
          const Rows& rows_, int64_t chunk_rows) {
    const at::ScalarType acc = compute_type(hidden_);
    hidden = hidden_;
    rows = &rows_;
    weight = weight_.to(acc);
    // MKL needs a unit stride in one dimension; otherwise ATen would copy the weight for every chunk GEMM.
    if (weight.stride(0) != 1 && weight.stride(1) != 1) weight = weight.contiguous();
    if (bias_.has_value()) bias = bias_->to(acc);
    const int64_t vocab = weight.size(0), h = weight.size(1);
    chunk = chunk_rows_for(chunk_rows, rows_.m, vocab, h, at::elementSize(acc));
    const auto opts = hidden_.options().dtype(acc);
    hbuf = at::empty({chunk, h}, opts);
    if (hidden_.scalar_type() != acc && rows_.idx.defined()) hbuf_in = at::empty({chunk, h}, hidden_.options());
  }

  // Rows [s, s + len) of the compacted row list, as a contiguous [len, H] matrix in the compute dtype.
  at::Tensor gather(int64_t s, int64_t len) {
    at::Tensor out = hbuf.narrow(0, 0, len);
    if (!rows->idx.defined()) {
      at::Tensor src = hidden.narrow(0, s, len);
      if (src.scalar_type() == out.scalar_type() && src.is_contiguous()) return src;
      out.copy_(src);
      return out;
    }
    const at::Tensor idx = rows->idx.narrow(0, s, len);
    if (hidden.scalar_type() == out.scalar_type()) {
      at::index_select_out(out, hidden, 0, idx);
    } else {
      at::Tensor tmp = hbuf_in.narrow(0, 0, len);
      at::index_select_out(tmp, hidden, 0, idx);
      out.copy_(tmp);
    }
    return out;
  }

  // The row-kernel arguments of the chunk of compacted rows starting at s, whose logits are x (the outputs
  // and the sharded-label fields are the caller's).
  template <typename Args>
  void fill_row_args(Args& a, const at::Tensor& x, int64_t s, int64_t ignore_index, double temperature_scalar) const {
    using acc_t = typename Args::acc_t;
    a.logits = x.const_data_ptr<acc_t>();
    a.row_stride = x.stride(0);
    a.vocab = x.size(1);
    a.labels = rows->labels.const_data_ptr<int64_t>() + s;
    a.ignore_index = ignore_index;
    a.temperature = rows->temperature.defined() ? rows->temperature.const_data_ptr<acc_t>() + s : nullptr;
    a.temperature_scalar = static_cast<acc_t>(temperature_scalar);
  }

  // The first `len` rows of the [chunk, V] workspace.
  at::Tensor workspace(int64_t len) {
    if (!logits.defined()) logits = at::empty({chunk, weight.size(0)}, hbuf.options());
    return logits.narrow(0, 0, len);
  }

  // x = h W^T (+ b) for the rows of the chunk, into `x` ([len, V], unit stride on V).
  at::Tensor logits_into(const at::Tensor& h, at::Tensor x) const {
    if (bias.defined()) {
      at::addmm_out(x, bias, h, weight.t());
    } else {
      at::mm_out(x, h, weight.t());
    }
    return x;
  }

  // x = h W^T (+ b) for the rows of the chunk, into the workspace.
  at::Tensor logits_of(const at::Tensor& h) { return logits_into(h, workspace(h.size(0))); }
};

// The three gradient GEMMs of each chunk's dlogits, accumulated over the chunks of one call. Any of the
// three results may be undefined (not requested).
struct GradSink {
  at::Tensor grad_hidden;  // [N, H] result in the input dtype, zero in the ignored rows
  at::Tensor gw_acc;       // [V, H] compute dtype accumulator (for fp32 / fp64 weights: the result itself)
  at::Tensor gb_acc;       // [V] compute dtype accumulator
  bool direct = false;     // grad_hidden rows written straight into the result (plain row range, same dtype)
  at::Tensor ghbuf;        // [C, H] otherwise: the chunk's rows, then one index_copy_ / copy_ per chunk
  at::Tensor colsum;       // [V] column sums of the chunk

  GradSink(const Chunker& ck, at::Tensor grad_hidden_, at::Tensor gw_acc_, at::Tensor gb_acc_)
      : grad_hidden(std::move(grad_hidden_)), gw_acc(std::move(gw_acc_)), gb_acc(std::move(gb_acc_)) {
    direct = grad_hidden.defined() && !ck.rows->idx.defined() && grad_hidden.scalar_type() == ck.hbuf.scalar_type();
    if (grad_hidden.defined() && !direct) ghbuf = at::empty_like(ck.hbuf);
    if (gb_acc.defined()) colsum = at::empty_like(gb_acc);
  }

  // Chunk [s, s + len) of the compacted rows: dx [len, V] its dlogits, h [len, H] its rows of hidden.
  void add(const Chunker& ck, int64_t s, int64_t len, const at::Tensor& dx, const at::Tensor& h) {
    const Rows& rows = *ck.rows;
    if (grad_hidden.defined()) {
      if (direct) {
        at::Tensor dst = grad_hidden.narrow(0, s, len);
        at::mm_out(dst, dx, ck.weight);
      } else {
        at::Tensor gh = ghbuf.narrow(0, 0, len);
        at::mm_out(gh, dx, ck.weight);
        if (rows.idx.defined()) {
          grad_hidden.index_copy_(0, rows.idx.narrow(0, s, len), gh.to(grad_hidden.scalar_type()));
        } else {
          grad_hidden.narrow(0, s, len).copy_(gh);
        }
      }
    }
    if (gw_acc.defined()) gw_acc.addmm_(dx.t(), h);
    if (gb_acc.defined()) gb_acc.add_(at::sum_out(colsum, dx, {0}));
  }
};

// Scatter [M, ...] compacted results into zero-filled [N, ...] tensors (ignored rows are 0).
inline at::Tensor expand_rows(const at::Tensor& compact, const Rows& rows, int64_t n) {
  if (!rows.idx.defined()) return compact;
  std::vector<int64_t> shape(compact.sizes().begin(), compact.sizes().end());
  shape[0] = n;
  return at::zeros(shape, compact.options()).index_copy_(0, rows.idx, compact);
}

}  // namespace reasonrl
