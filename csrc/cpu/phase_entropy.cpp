// phase_entropy and find_boundary (docs/ops.md section 6), fused on the CPU: PEAR's per-sequence mean
// entropy before and after a boundary marker, its backward, and the search for the marker.
//
// One at::parallel_for task per group of sequences; a sequence is one streaming pass over its tokens with a
// running valid-token index, so nothing of size [N] is materialised (the reference builds a segment id, a
// valid-token index and masked copies of the entropies, several [N] tensors). Semantics follow
// reasonrl/reference/phase_entropy.py, the oracle, step by step:
//   valid tokens of sequence b are indexed 0 .. n_b - 1 in order (masked tokens skipped);
//   before = index < boundary[b], after = index >= boundary[b] + boundary_len (the marker in neither);
//   mean = sum / count, 0 when count = 0; the gradient of a token is g / count of its phase, 0 outside both.
// The sums run in token order in the accumulation dtype (fp64 for fp64 input, else fp32), as the
// reference's index_add does, and the division is the reference's (sum / count, g / count).
//
// Layouts (the Python layer, reasonrl/ops/phase_entropy.py, checks shapes and values; here only what keeps
// the kernel memory-safe is checked):
//   padded: entropy / token_ids [B, T] (any strides), mask [B, T] bool contiguous or absent;
//   packed: entropy / token_ids [N] (any stride), cu_seqlens [B + 1] int64 contiguous, mask [N] or absent.
// boundary [B] int64 contiguous; grad_before / grad_after [B] and the counts [B] contiguous.
// Boundary values are not range-checked here: any int64 gives the reference's result (a negative boundary
// puts every token after the marker window, one >= n_b puts every token before it).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace reasonrl {
namespace {

// Where sequence b's tokens are: padded rows of a [B, T] tensor, or packed segments of an [N] one.
struct SeqLayout {
  bool packed;
  int64_t B, T;             // T: padded width (unused when packed)
  int64_t stride_b, stride_t;  // element (b, t) at b * stride_b + t * stride_t; packed: stride_b = 0, t absolute
  const int64_t* cu;        // [B + 1] or nullptr
  const bool* mask;         // [B, T] / [N] contiguous, or nullptr (every token valid)

  int64_t begin(int64_t b) const { return packed ? cu[b] : 0; }
  int64_t end(int64_t b) const { return packed ? cu[b + 1] : T; }
  // Offset of token t of sequence b in the data tensor, and in the (contiguous) mask / gradient.
  int64_t data(int64_t b, int64_t t) const { return b * stride_b + t * stride_t; }
  int64_t flat(int64_t b, int64_t t) const { return packed ? t : b * T + t; }
  bool valid(int64_t b, int64_t t) const { return mask == nullptr || mask[flat(b, t)]; }
};

// The checks shared by the three ops: the data tensor's layout, the mask and the offsets.
SeqLayout check_layout(const char* op, const char* name, const at::Tensor& x, const std::optional<at::Tensor>& mask,
                       const std::optional<at::Tensor>& cu_seqlens) {
  SeqLayout l{};
  l.packed = cu_seqlens.has_value();
  if (l.packed) {
    TORCH_CHECK(x.dim() == 1, op, ": ", name, " must be [N] in the packed layout (cu_seqlens given), got ", x.sizes());
    const at::Tensor& cu = *cu_seqlens;
    TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 1 && cu.scalar_type() == at::kLong && cu.is_contiguous(), op,
                ": cu_seqlens must be a contiguous int64 [B + 1] tensor, got ", cu.sizes(), " ", cu.scalar_type());
    l.B = cu.size(0) - 1;
    l.T = 0;
    l.stride_b = 0;
    l.stride_t = x.stride(0);
    l.cu = cu.data_ptr<int64_t>();
    const int64_t n = x.size(0);
    TORCH_CHECK(l.cu[0] == 0 && l.cu[l.B] == n, op, ": cu_seqlens must start at 0 and end at N = ", n);
    for (int64_t b = 0; b < l.B; ++b) TORCH_CHECK(l.cu[b + 1] >= l.cu[b], op, ": cu_seqlens must be non-decreasing");
  } else {
    TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be [B, T] in the padded layout, got ", x.sizes());
    l.B = x.size(0);
    l.T = x.size(1);
    l.stride_b = x.stride(0);
    l.stride_t = x.stride(1);
    l.cu = nullptr;
  }
  l.mask = nullptr;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.is_contiguous() && m.sizes() == x.sizes(), op,
                ": mask must be a contiguous bool tensor of the shape of ", name, " ", x.sizes(), ", got ", m.sizes(),
                " ", m.scalar_type());
    l.mask = m.data_ptr<bool>();
  }
  return l;
}

void check_per_sequence(const char* op, const char* name, const at::Tensor& t, int64_t B, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B && t.is_contiguous() && t.scalar_type() == dtype, op, ": ", name,
              " must be a contiguous ", dtype, " [B] = [", B, "] tensor, got ", t.sizes(), " ", t.scalar_type());
}

// Sequences per parallel task: about 32k tokens per task to amortise the scheduling.
int64_t grain_sequences(int64_t tokens, int64_t B) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, tokens / std::max<int64_t>(B, 1)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> phase_entropy_fwd_cpu(
    const at::Tensor& entropy, const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_seqlens,
    const at::Tensor& boundary, int64_t boundary_len) {
  const char* op = "phase_entropy_fwd";
  TORCH_CHECK(entropy.is_floating_point(), op, ": entropy must be floating, got ", entropy.scalar_type());
  TORCH_CHECK(boundary_len >= 1, op, ": boundary_len must be >= 1, got ", boundary_len);
  const SeqLayout l = check_layout(op, "entropy", entropy, mask, cu_seqlens);
  check_per_sequence(op, "boundary", boundary, l.B, at::kLong);
  const auto acc_type = entropy.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = entropy.options().dtype(acc_type);
  at::Tensor mean_before = at::empty({l.B}, opts), mean_after = at::empty({l.B}, opts);
  at::Tensor count_before = at::empty({l.B}, opts.dtype(at::kInt)), count_after = at::empty({l.B}, opts.dtype(at::kInt));
  const int64_t* bnd = boundary.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, entropy.scalar_type(), "phase_entropy_fwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* x = entropy.data_ptr<scalar_t>();
    acc_t* mb = mean_before.data_ptr<acc_t>();
    acc_t* ma = mean_after.data_ptr<acc_t>();
    int32_t* cb = count_before.data_ptr<int32_t>();
    int32_t* ca = count_after.data_ptr<int32_t>();
    at::parallel_for(0, l.B, grain_sequences(entropy.numel(), l.B), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t first_after = bnd[b] + boundary_len;
        acc_t s_before = 0, s_after = 0;
        int64_t n_before = 0, n_after = 0, idx = 0;
        for (int64_t t = l.begin(b); t < l.end(b); ++t) {
          if (!l.valid(b, t)) continue;
          if (idx < bnd[b]) {
            s_before += static_cast<acc_t>(x[l.data(b, t)]);
            ++n_before;
          } else if (idx >= first_after) {
            s_after += static_cast<acc_t>(x[l.data(b, t)]);
            ++n_after;
          }
          ++idx;
        }
        mb[b] = n_before > 0 ? s_before / static_cast<acc_t>(n_before) : acc_t(0);
        ma[b] = n_after > 0 ? s_after / static_cast<acc_t>(n_after) : acc_t(0);
        cb[b] = static_cast<int32_t>(n_before);
        ca[b] = static_cast<int32_t>(n_after);
      }
    });
  });
  return {mean_before, mean_after, count_before, count_after};
}

at::Tensor phase_entropy_bwd_cpu(const at::Tensor& grad_before, const at::Tensor& grad_after, const at::Tensor& entropy,
                                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& cu_seqlens,
                                 const at::Tensor& boundary, const at::Tensor& count_before,
                                 const at::Tensor& count_after, int64_t boundary_len) {
  const char* op = "phase_entropy_bwd";
  TORCH_CHECK(entropy.is_floating_point(), op, ": entropy must be floating, got ", entropy.scalar_type());
  TORCH_CHECK(boundary_len >= 1, op, ": boundary_len must be >= 1, got ", boundary_len);
  const SeqLayout l = check_layout(op, "entropy", entropy, mask, cu_seqlens);
  const auto acc_type = entropy.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_per_sequence(op, "boundary", boundary, l.B, at::kLong);
  check_per_sequence(op, "grad_before", grad_before, l.B, acc_type);
  check_per_sequence(op, "grad_after", grad_after, l.B, acc_type);
  check_per_sequence(op, "count_before", count_before, l.B, at::kInt);
  check_per_sequence(op, "count_after", count_after, l.B, at::kInt);
  // The gradient has the entropy's dtype and shape, contiguous; every token is written (0 outside the phases).
  at::Tensor grad = at::empty(entropy.sizes(), entropy.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t* bnd = boundary.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, entropy.scalar_type(), "phase_entropy_bwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    scalar_t* g = grad.data_ptr<scalar_t>();
    const acc_t* gb = grad_before.data_ptr<acc_t>();
    const acc_t* ga = grad_after.data_ptr<acc_t>();
    const int32_t* cb = count_before.data_ptr<int32_t>();
    const int32_t* ca = count_after.data_ptr<int32_t>();
    at::parallel_for(0, l.B, grain_sequences(entropy.numel(), l.B), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        // d mean / d x_t = 1 / count for a token of the phase (the reference's g / count; a phase with
        // count 0 has no token, so its quotient is never used).
        const acc_t w_before = cb[b] > 0 ? gb[b] / static_cast<acc_t>(cb[b]) : acc_t(0);
        const acc_t w_after = ca[b] > 0 ? ga[b] / static_cast<acc_t>(ca[b]) : acc_t(0);
        const int64_t first_after = bnd[b] + boundary_len;
        int64_t idx = 0;
        for (int64_t t = l.begin(b); t < l.end(b); ++t) {
          acc_t v = 0;
          if (l.valid(b, t)) {
            v = idx < bnd[b] ? w_before : (idx >= first_after ? w_after : acc_t(0));
            ++idx;
          }
          g[l.flat(b, t)] = static_cast<scalar_t>(v);
        }
      }
    });
  });
  return grad;
}

template <typename id_t>
void find_boundary_impl(const SeqLayout& l, const id_t* ids, const int64_t* marker, int64_t m, int64_t* out) {
  at::parallel_for(0, l.B, grain_sequences(l.packed ? l.cu[l.B] : l.B * l.T, l.B), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> valid;  // the sequence's valid tokens, compacted: contiguity is in this index space
    for (int64_t b = begin; b < end; ++b) {
      valid.clear();
      for (int64_t t = l.begin(b); t < l.end(b); ++t)
        if (l.valid(b, t)) valid.push_back(static_cast<int64_t>(ids[l.data(b, t)]));
      const int64_t n = static_cast<int64_t>(valid.size());
      int64_t hit = n;  // n_b: no marker
      // Markers are a few tokens (</think> is one or two): the direct O(n m) comparison, stopping at the
      // first full match, beats a KMP table at that size.
      for (int64_t i = 0; i + m <= n; ++i) {
        int64_t j = 0;
        while (j < m && valid[i + j] == marker[j]) ++j;
        if (j == m) {
          hit = i;
          break;
        }
      }
      out[b] = hit;
    }
  });
}

at::Tensor find_boundary_fwd_cpu(const at::Tensor& token_ids, const std::optional<at::Tensor>& mask,
                                 const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& marker) {
  const char* op = "find_boundary_fwd";
  TORCH_CHECK(token_ids.scalar_type() == at::kLong || token_ids.scalar_type() == at::kInt, op,
              ": token_ids must be int32 or int64, got ", token_ids.scalar_type());
  TORCH_CHECK(marker.dim() == 1 && marker.size(0) >= 1 && marker.scalar_type() == at::kLong && marker.is_contiguous(),
              op, ": marker_ids must be a non-empty contiguous int64 [M] tensor, got ", marker.sizes(), " ",
              marker.scalar_type());
  const SeqLayout l = check_layout(op, "token_ids", token_ids, mask, cu_seqlens);
  at::Tensor out = at::empty({l.B}, token_ids.options().dtype(at::kLong));
  if (token_ids.scalar_type() == at::kLong)
    find_boundary_impl(l, token_ids.data_ptr<int64_t>(), marker.data_ptr<int64_t>(), marker.size(0),
                       out.data_ptr<int64_t>());
  else
    find_boundary_impl(l, token_ids.data_ptr<int32_t>(), marker.data_ptr<int64_t>(), marker.size(0),
                       out.data_ptr<int64_t>());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(reasonrl, CPU, m) {
  m.impl("phase_entropy_fwd", &phase_entropy_fwd_cpu);
  m.impl("phase_entropy_bwd", &phase_entropy_bwd_cpu);
  m.impl("find_boundary_fwd", &find_boundary_fwd_cpu);
}

}  // namespace reasonrl
