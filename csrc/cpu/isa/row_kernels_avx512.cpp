// The row kernels for CPU_CAPABILITY=AVX512. setup.py compiles this file with the ISA's flags
// (see ISA_FLAGS there); row_kernels_impl.h holds the code shared by every variant.
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "../row_kernels_impl.h"

namespace reasonrl {
RowKernels row_kernels_avx512() { return CPU_CAPABILITY::make_row_kernels(); }
}  // namespace reasonrl
