// Tests for io/tensor.hpp: float matrices through every float dtype: written with matrix_tensor, read
// back with read_matrix, mapped in place (map_matrix, row-major), copied (copy_matrix,
// copy_matrix_into) and refused for the wrong storage type.
#include "io_support.hpp"
#include "support.hpp"

#include <pissa/io/dtype.hpp>
#include <pissa/io/safetensors.hpp>
#include <pissa/io/tensor.hpp>

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

using namespace pissa::io;
using pissa_test::ScratchDir;

TEST_CASE_TEMPLATE("float matrices convert through every float dtype", Storage, float, double, Eigen::half,
                   Eigen::bfloat16) {
    ScratchDir dir("st-float");
    const pissa::Matrix<double> W = pissa_test::gaussian<double>(5, 7, 42);
    const Dtype dtype = dtype_of<Storage>();
    const auto path = dir / "m.safetensors";
    write_safetensors(path, {matrix_tensor("w", W, dtype)});
    SafetensorsFile file(path);
    const TensorInfo& t = file.at("w");
    CHECK(t.shape == std::vector<std::uint64_t>{5, 7});
    const pissa::RowMatrix<double> back = read_matrix<double>(file, t);
    const double tol = dtype == Dtype::BF16 ? 1e-2 : dtype == Dtype::F16 ? 1e-3 : dtype == Dtype::F32 ? 1e-7 : 0;
    CHECK(pissa_test::relative_error(back, W) <= tol);
    // Row-major: element (i, j) is at byte (i * cols + j) * size.
    bool ok = false;
    const auto map = map_matrix<Storage>(file, t, ok);
    if (ok) {
        CHECK(static_cast<double>(map(2, 3)) == static_cast<double>(static_cast<Storage>(W(2, 3))));
        CHECK(static_cast<double>(map(4, 0)) == static_cast<double>(static_cast<Storage>(W(4, 0))));
    }
    // copy_matrix_into: the same values in a caller's buffer, which keeps its capacity when reused
    // for a smaller tensor, and a clear error for the wrong storage type.
    std::vector<unsigned char> buffer;
    auto copy = copy_matrix_into<Storage>(file, t, buffer);
    CHECK(buffer.size() == 5 * 7 * sizeof(Storage));
    CHECK(copy.rows() == 5);
    CHECK(copy.cols() == 7);
    CHECK((copy.template cast<double>() - copy_matrix<Storage>(file, t).template cast<double>()).norm() == 0);
    copy(1, 2) = Storage(0.5f);
    CHECK(static_cast<double>(copy_matrix<Storage>(file, t)(1, 2)) ==
          static_cast<double>(static_cast<Storage>(W(1, 2))));
    const std::size_t capacity = buffer.capacity();
    const auto path_small = dir / "small.safetensors";
    write_safetensors(path_small, {matrix_tensor("v", W.topLeftCorner(2, 3), dtype)});
    SafetensorsFile small(path_small);
    const auto copy_small = copy_matrix_into<Storage>(small, small.at("v"), buffer);
    CHECK(buffer.capacity() == capacity);
    CHECK(static_cast<double>(copy_small(1, 2)) == static_cast<double>(static_cast<Storage>(W(1, 2))));
    using Other = std::conditional_t<std::is_same_v<Storage, float>, double, float>;
    const std::string message = "tensor 'w': stored as " + std::string(dtype_name(dtype));
    CHECK_THROWS_WITH_AS(copy_matrix_into<Other>(file, t, buffer), doctest::Contains(message.c_str()),
                         pissa::invalid_argument);
}
