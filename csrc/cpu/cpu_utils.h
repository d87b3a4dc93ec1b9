// Host-side helpers shared by the CPU ops of csrc/cpu (token_logprobs, linear_token_logprobs, the fused
// policy loss): argument checks that keep the row kernels memory-safe, the row-argument plumbing, the rows
// per parallel task (grain_rows) and the gradient allocation.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Version.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "row_kernels.h"

namespace reasonrl {

// The per-ISA row engine (row_kernels.h): the variant of the row kernels compiled for this CPU
// (csrc/cpu/isa/row_kernels_<isa>.cpp), chosen once by at::get_cpu_capability(), so
// ATEN_CPU_CAPABILITY=default|avx2|avx512 selects it too. Every CPU op that reduces rows of logits runs it:
// token_logprobs.cpp, linear_logprobs.cpp (on each GEMM chunk) and policy_loss.cpp (the fused loss). Only the
// extension's own sources include this header (they are compiled with the REASONRL_HAVE_<ISA> macros).
inline const RowKernels& row_kernels() {
  static const RowKernels kernels = [] {
    const std::string cap = at::get_cpu_capability();
#if defined(REASONRL_HAVE_AVX512)
    if (cap == "AVX512") return row_kernels_avx512();
#endif
#if defined(REASONRL_HAVE_AVX2)
    if (cap == "AVX512" || cap == "AVX2") return row_kernels_avx2();
#endif
    return row_kernels_default();
  }();
  return kernels;
}

inline const char* row_kernels_isa() {
  static const std::string isa = [] {
    const std::string cap = at::get_cpu_capability();
#if defined(REASONRL_HAVE_AVX512)
    if (cap == "AVX512") return std::string("avx512");
#endif
#if defined(REASONRL_HAVE_AVX2)
    if (cap == "AVX512" || cap == "AVX2") return std::string("avx2");
#endif
    return std::string("default");
  }();
  return isa.c_str();
}

// Rows per parallel_for task: enough columns per task to amortise the scheduling (~64k elements).
inline int64_t grain_rows(int64_t vocab) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(vocab, 1)); }

// labels: [N] int32 / int64 on the CPU.
inline void check_labels(const char* op, const at::Tensor& labels, int64_t n) {
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n, op, ": labels must be [N] = [", n, "], got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, op,
              ": labels must be int32 or int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.device().is_cpu(), op, " (cpp): labels must be on the CPU");
}

// A per-row temperature tensor is a CPU floating scalar or [N]; a scalar one is > 0 (values of a tensor are
// checked by the Python layer, with validate).
inline void check_temperature(const char* op, const std::optional<at::Tensor>& temperature,
                              double temperature_scalar, int64_t n) {
  if (temperature.has_value()) {
    const auto& t = *temperature;
    TORCH_CHECK(t.device().is_cpu(), op, " (cpp): temperature must be on the CPU");
    TORCH_CHECK(t.is_floating_point(), op, ": temperature must be a floating tensor");
    TORCH_CHECK(t.numel() == 1 || (t.dim() == 1 && t.size(0) == n), op, ": temperature must be a scalar or [N] = [",
                n, "], got ", t.sizes());
  } else {
    TORCH_CHECK(temperature_scalar > 0, op, ": temperature must be > 0, got ", temperature_scalar);
  }
}

inline void check_common(const at::Tensor& logits, const at::Tensor& labels,
                  const std::optional<at::Tensor>& temperature, double temperature_scalar) {
  TORCH_CHECK(logits.dim() == 2, "token_logprobs: logits must be 2-D [N, V] at this level, got ",
              logits.sizes());
  TORCH_CHECK(logits.device().is_cpu(), "token_logprobs (cpp): logits must be a CPU tensor, got ",
              logits.device());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
              "token_logprobs (cpp): logits must be float32, bfloat16, float16 or float64, got ", dt);
  TORCH_CHECK(logits.size(1) > 0, "token_logprobs: the vocabulary size V (logits.size(-1)) must be > 0");
  check_labels("token_logprobs", labels, logits.size(0));
  check_temperature("token_logprobs", temperature, temperature_scalar, logits.size(0));
}

// Unit stride on the vocabulary is required by the kernels; any row stride is fine.
inline at::Tensor vocab_contiguous(const at::Tensor& logits) {
  return logits.stride(1) == 1 ? logits : logits.contiguous();
}

inline at::Tensor temperature_rows(const std::optional<at::Tensor>& temperature, int64_t n, at::ScalarType acc) {
  if (!temperature.has_value()) return at::Tensor();
  return temperature->to(acc).reshape({-1}).expand({n}).contiguous();
}

template <typename scalar_t>
void fill_row_args(RowArgs<scalar_t>& a, const at::Tensor& x, const at::Tensor& labels64,
                   const at::Tensor& temp, double temperature_scalar, int64_t ignore_index) {
  using acc_t = typename RowArgs<scalar_t>::acc_t;
  a.logits = x.const_data_ptr<scalar_t>();
  a.row_stride = x.stride(0);
  a.vocab = x.size(1);
  a.labels = labels64.const_data_ptr<int64_t>();
  a.ignore_index = ignore_index;
  a.temperature = temp.defined() ? temp.const_data_ptr<acc_t>() : nullptr;
  a.temperature_scalar = static_cast<acc_t>(temperature_scalar);
}

// The gradient is as large as the logits and freshly mmap'ed by the allocator, so its first touch costs one
// page fault per 4 KiB page: measured here, 190 ms of a 200 ms fill for a 512 MiB fp32 [4096, 32000]
// buffer. Asking for transparent huge pages on that range before the kernels touch it (2 MiB pages) cuts the
// faults to about 25 ms. This only advises the kernel about this buffer's pages; no process-wide setting is
// changed, and where THP is disabled the call is a no-op.
inline at::Tensor empty_gradient(const at::Tensor& logits) {
  at::Tensor grad = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(grad.data_ptr());
  const uintptr_t end = begin + grad.nbytes();
  const uintptr_t aligned = (begin + kHuge - 1) & ~(kHuge - 1);
  if (grad.nbytes() >= 4 * kHuge && end > aligned + kHuge) {
    madvise(reinterpret_cast<void*>(aligned), (end - aligned) & ~(kHuge - 1), MADV_HUGEPAGE);
  }
#endif
  return grad;
}

}  // namespace reasonrl
