/// \file quant.hpp
/// \brief Everything about quantised bases: `#include <pissa/quant.hpp>`.
///
/// - quant_nf4.hpp: NF4 blockwise 4-bit quantisation / dequantisation with bitsandbytes' semantics
///   (blocks of 64, float32 absmax, high nibble first), optional double quantisation of the absmax;
/// - quant_blockwise8.hpp: bitsandbytes' 8-bit dynamic-map blockwise quantiser (for the absmax);
/// - qpissa.hpp: QPiSSA, LoftQ and QLoRA initialisations on an NF4 base;
/// - quant_error.hpp: the error `||W - deq(Q) - s B A||` in Frobenius / nuclear norm and the
///   reduction against QLoRA.
#pragma once

#include <pissa/qpissa.hpp>
#include <pissa/quant_blockwise8.hpp>
#include <pissa/quant_error.hpp>
#include <pissa/quant_nf4.hpp>
