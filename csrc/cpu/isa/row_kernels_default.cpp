// The row kernels for CPU_CAPABILITY=DEFAULT. setup.py compiles this file with the ISA's flags
// (see ISA_FLAGS there); row_kernels_impl.h holds the code shared by every variant.
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "../row_kernels_impl.h"

namespace reasonrl {
RowKernels row_kernels_default() { return CPU_CAPABILITY::make_row_kernels(); }
}  // namespace reasonrl
