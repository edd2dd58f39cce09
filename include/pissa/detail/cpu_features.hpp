/// \file detail/cpu_features.hpp
/// \brief Which kernel family the skinny products run on, chosen at run time.
///
/// The library is compiled for the baseline ISA of the caller's flags (no -march is ever put on
/// the pissa target); the AVX-512 kernels are separate functions compiled with
/// `__attribute__((target(...)))` and are called only when the CPU and the OS support them
/// (`__builtin_cpu_supports`, which also checks that the OS saves the zmm state).
///
/// Overrides, for tests and benchmarks: the environment variable `PISSA_KERNELS=portable` selects
/// the portable kernels at the first use; `set_kernel_isa_override()` does it programmatically.
#pragma once

#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(PISSA_NO_AVX512)
#define PISSA_HAVE_AVX512_KERNELS 1
/// The instruction sets of every AVX-512 function (kernels_avx512.hpp, random_avx512.hpp).
#define PISSA_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
/// The same plus AVX512_BF16 (`vdpbf16ps`, `vcvtne2ps2bf16`): kernels_avx512_bf16.hpp.
#define PISSA_AVX512_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16")))
#else
#define PISSA_HAVE_AVX512_KERNELS 0
#endif

// The AMX kernels need Linux's per-process permission for the tile state (arch_prctl).
#if PISSA_HAVE_AVX512_KERNELS && defined(__linux__)
#define PISSA_HAVE_AMX_KERNELS 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define PISSA_HAVE_AMX_KERNELS 0
#endif

namespace pissa::detail {

/// The kernel families of detail/skinny_gemm.hpp.
enum class KernelIsa { portable, avx512 };

/// True when this build contains the AVX-512 kernels and the CPU/OS can run them.
inline bool cpu_supports_avx512_kernels() {
#if PISSA_HAVE_AVX512_KERNELS
    static const bool supported = [] {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("fma") && __builtin_cpu_supports("avx2");
    }();
    return supported;
#else
    return false;
#endif
}

/// True when the AVX-512 kernels run here and the CPU also has AVX512_BF16, the bfloat16 dot
/// products of kernels_avx512_bf16.hpp.
inline bool cpu_supports_bf16_products() {
#if PISSA_HAVE_AVX512_KERNELS
    static const bool supported = cpu_supports_avx512_kernels() && __builtin_cpu_supports("avx512bf16");
    return supported;
#else
    return false;
#endif
}

/// True when the CPU has AMX with bfloat16 tiles, the OS saves the tile state and this process
/// got the permission to use it (requested once, on the first call; Linux only).
inline bool cpu_supports_amx_bf16() {
#if PISSA_HAVE_AMX_KERNELS
    static const bool supported = [] {
        if (!cpu_supports_bf16_products()) return false;
        unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
        if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) == 0) return false;
        const bool amx_bf16 = (edx >> 22) & 1u, amx_tile = (edx >> 24) & 1u;
        if (!amx_bf16 || !amx_tile) return false;
        unsigned xcr0_low = 0, xcr0_high = 0;  // XCR0 bits 17-18: the OS manages the tile state
        __asm__ volatile("xgetbv" : "=a"(xcr0_low), "=d"(xcr0_high) : "c"(0));
        if (((xcr0_low >> 17) & 3u) != 3u) return false;
        constexpr long request_permission = 0x1023;  // ARCH_REQ_XCOMP_PERM
        constexpr long tile_data = 18;               // XFEATURE_XTILEDATA
        return ::syscall(SYS_arch_prctl, request_permission, tile_data) == 0;
    }();
    return supported;
#else
    return false;
#endif
}

/// -1: no override; otherwise the forced KernelIsa as int.
inline std::atomic<int>& kernel_isa_override_slot() {
    static std::atomic<int> slot{[] {
        const char* env = std::getenv("PISSA_KERNELS");
        return (env != nullptr && std::strcmp(env, "portable") == 0) ? int(KernelIsa::portable) : -1;
    }()};
    return slot;
}

/// Forces a kernel family (an unsupported avx512 request falls back to portable); `reset` clears it.
inline void set_kernel_isa_override(KernelIsa isa, bool reset = false) {
    kernel_isa_override_slot().store(reset ? -1 : int(isa));
}

/// The kernel family the products use now.
inline KernelIsa active_kernel_isa() {
    const int forced = kernel_isa_override_slot().load(std::memory_order_relaxed);
    if (forced == int(KernelIsa::portable)) return KernelIsa::portable;
    return cpu_supports_avx512_kernels() ? KernelIsa::avx512 : KernelIsa::portable;
}

/// "avx512" or "portable", for benchmark labels and logs.
inline const char* kernel_isa_name(KernelIsa isa) { return isa == KernelIsa::avx512 ? "avx512" : "portable"; }

}  // namespace pissa::detail
