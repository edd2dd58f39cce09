// Tests for types.hpp: the matrix aliases' layouts and the storage -> compute scalar mapping.
#include "support.hpp"

#include <pissa/types.hpp>

#include <Eigen/Core>

#include <cstddef>
#include <type_traits>

static_assert(std::is_same_v<pissa::compute_scalar_t<Eigen::half>, float>);
static_assert(std::is_same_v<pissa::compute_scalar_t<Eigen::bfloat16>, float>);
static_assert(std::is_same_v<pissa::compute_scalar_t<float>, float>);
static_assert(std::is_same_v<pissa::compute_scalar_t<double>, double>);
static_assert(pissa::is_supported_storage_v<float> && pissa::is_supported_storage_v<double> &&
              pissa::is_supported_storage_v<Eigen::half> && pissa::is_supported_storage_v<Eigen::bfloat16>);
static_assert(!pissa::is_supported_storage_v<int> && !pissa::is_supported_storage_v<long double> &&
              !pissa::is_supported_storage_v<const float>);
static_assert(std::is_same_v<pissa::Index, Eigen::Index>);
static_assert(!pissa::Matrix<float>::IsRowMajor && pissa::RowMatrix<float>::IsRowMajor);
static_assert(pissa::Vector<double>::ColsAtCompileTime == 1 &&
              pissa::Vector<double>::RowsAtCompileTime == Eigen::Dynamic);

TEST_CASE("Matrix is column-major, RowMatrix row-major (the checkpoints' layout), Vector a column") {
    pissa::Matrix<float> column_major(2, 3);
    pissa::RowMatrix<float> row_major(2, 3);
    for (pissa::Index i = 0; i < 2; ++i)
        for (pissa::Index j = 0; j < 3; ++j) column_major(i, j) = row_major(i, j) = static_cast<float>(10 * i + j);
    // Element (0, 1) is the second stored value of a row-major matrix, the third of a column-major one.
    CHECK(row_major.data()[1] == 1.0f);
    CHECK(column_major.data()[1] == 10.0f);
    CHECK(column_major.data()[2] == 1.0f);
    const pissa::Vector<double> v = pissa::Vector<double>::LinSpaced(4, 0.0, 3.0);
    CHECK(v.rows() == 4);
    CHECK(v.cols() == 1);
    // A 16-bit matrix widens to its compute scalar exactly.
    const pissa::Matrix<Eigen::bfloat16> b = pissa::Matrix<float>::Constant(2, 2, 0.5f).cast<Eigen::bfloat16>();
    const pissa::Matrix<pissa::compute_scalar_t<Eigen::bfloat16>> wide = b.cast<float>();
    CHECK(wide(1, 1) == 0.5f);
}
