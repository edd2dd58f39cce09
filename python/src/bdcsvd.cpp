// Eigen's BDCSVD compiled once for the module instead of in each of its sources, which all define
// PISSA_EXTERN_BDCSVD (see pissa/detail/bdcsvd.hpp).
#include <pissa/bdcsvd_instances.hpp>
