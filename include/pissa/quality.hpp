/// \file quality.hpp
/// \brief What a PiSSA split kept and left: a report a user can read and a script can parse.
#pragma once

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

namespace pissa {

/// Quality of one PiSSA decomposition of a weight `W`.
///
/// `adapter_energy_fraction = ||s B A||_F^2 / ||W||_F^2`: the share of the weight's energy that
/// the trainable adapter holds. For the exact method this is `sum_{i<=r} sigma_i^2 / ||W||_F^2`
/// (Eckart-Young), and `residual_norm^2 = sum_{i>r} sigma_i^2`.
struct QualityReport {
    std::vector<double> singular_values;  ///< the kept sigma_1 >= ... >= sigma_r (not divided by s)
    double weight_norm = 0;               ///< ||W||_F
    double residual_norm = 0;             ///< ||W_res||_F, W_res = W - s B A as stored (after any cast)
    double adapter_energy_fraction = 0;   ///< ||s B A||_F^2 / ||W||_F^2, in [0, 1]
};

/// One line, e.g. "rank 8: sigma 3.817 .. 1.61, adapter holds 41.20% of ||W||_F^2, ||W_res||_F = 4.2 of 6.1".
inline std::string to_string(const QualityReport& report) {
    char buffer[256];
    const double first = report.singular_values.empty() ? 0.0 : report.singular_values.front();
    const double last = report.singular_values.empty() ? 0.0 : report.singular_values.back();
    std::snprintf(buffer, sizeof buffer,
                  "rank %zu: sigma %.4g .. %.4g, adapter holds %.2f%% of ||W||_F^2, ||W_res||_F = %.4g of %.4g",
                  report.singular_values.size(), first, last, 100.0 * report.adapter_energy_fraction,
                  report.residual_norm, report.weight_norm);
    return buffer;
}

}  // namespace pissa
