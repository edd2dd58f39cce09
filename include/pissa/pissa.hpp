/// \file pissa.hpp
/// \brief The whole core API of pissa: `#include <pissa/pissa.hpp>`.
///
/// Core math only (Eigen, no I/O): exact and randomized truncated SVD, PiSSA initialisation with
/// its quality report, the LoRA layer (forward, backward, init, merge), PiSSA -> LoRA conversion and
/// quantised bases (NF4, QPiSSA, LoftQ). File formats live in <pissa/io/...>.
#pragma once

#include <pissa/cancel.hpp>
#include <pissa/convert.hpp>
#include <pissa/errors.hpp>
#include <pissa/init.hpp>
#include <pissa/lora.hpp>
#include <pissa/lora_backward.hpp>
#include <pissa/quality.hpp>
#include <pissa/quant.hpp>
#include <pissa/rsvd.hpp>
#include <pissa/seed.hpp>
#include <pissa/svd.hpp>
#include <pissa/svd_result.hpp>
#include <pissa/types.hpp>
#include <pissa/version.hpp>
