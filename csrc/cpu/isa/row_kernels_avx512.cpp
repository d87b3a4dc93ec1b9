// token_logprobs row kernels for CPU_CAPABILITY=AVX512. setup.py compiles this file with the ISA's flags
// (see REASONRL_ISA_FLAGS there); token_logprobs_kernel.h holds the code shared by every variant.
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "../token_logprobs_kernel.h"

namespace reasonrl {
RowKernels token_logprobs_kernels_avx512() { return CPU_CAPABILITY::make_row_kernels(); }
}  // namespace reasonrl
