// Lets kernels/cuda/*.cu compile as host C++ for the emulated driver (driver.cpp): a block runs
// at a time, its threads one after another, or as fibers that switch at __syncthreads and at warp
// shuffles for the kernels that synchronize. For testing the CUDA backend's host code and our
// kernels' indexing on a machine without a GPU; it says nothing of speed.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>

struct emu_dim3 {
    unsigned x, y, z;
};
struct float2 {
    float x, y;
};

namespace emu {
extern thread_local emu_dim3 thread_idx, block_idx, block_dim;
void sync();                        // every live thread of the block arrives before any leaves
float shfl_xor(float v, int lane);  // the value of thread (this ^ lane) of the warp
unsigned short f32_to_f16(float v); // round to nearest even, as cvt.rn.f16.f32
}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define __global__
#define __device__ static inline
#define __shared__ static
#define __syncthreads() emu::sync()
#define __shfl_xor_sync(mask, v, lane) emu::shfl_xor(v, lane)

template <class T> static inline T min(T a, T b) { return a < b ? a : b; }
static inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
