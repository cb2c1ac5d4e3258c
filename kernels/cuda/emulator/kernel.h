// The emulated driver's table of kernels, which scripts/cuda-emulator.sh generates from
// kernels/cuda/*.cu: each kernel's name, whether it synchronizes its threads (then they run as
// fibers), and a call that unpacks cuLaunchKernel's argument pointers into its parameters.
#pragma once
#include <cstddef>
#include <type_traits>
#include <utility>
#include <vector>

using Call = void (*)(void **);
struct Kernel {
    const char *name;
    bool syncs;
    Call call;
};
const std::vector<Kernel> &kernels();

template <class... A, std::size_t... I>
void invoke_at(void (*k)(A...), void **args, std::index_sequence<I...>) {
    k(*static_cast<std::remove_reference_t<A> *>(args[I])...);
}
template <class... A> void invoke(void (*k)(A...), void **args) {
    invoke_at(k, args, std::index_sequence_for<A...>{});
}
