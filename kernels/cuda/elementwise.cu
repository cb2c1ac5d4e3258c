// One thread an output element (a 1-D grid of 256-thread blocks): activations, the bias and
// activation after a cuBLAS product, the residual add, SwiGLU, the embedding gather, mean pooling
// and the f16 rounding of a product's input. Compiled at run time by NVRTC.

__device__ float gelu(float v) { return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); }
__device__ float silu(float v) { return v / (1.0f + expf(-v)); }

// act: 0 none, 1 GELU (erf, BERT), 2 SiLU (Llama).
__device__ float activate(float v, unsigned act) {
    return act == 1u ? gelu(v) : act == 2u ? silu(v) : v;
}

extern "C" __global__ void activation(const float *x, float *out, unsigned n, unsigned act) {
    const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = activate(x[i], act);
}

// y[i] = act(y[i] + bias[i % width]) in place: the epilogue of a cuBLAS product (bias optional).
extern "C" __global__ void bias_activation(float *y, const float *bias, unsigned n, unsigned width,
                                           unsigned has_bias, unsigned act) {
    const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = activate(y[i] + (has_bias ? bias[i % width] : 0.0f), act);
}

// out[i] = x[i] rounded to f16 (to nearest even), as raw bits: the input of an f16 cuBLAS product.
// Inline PTX, so that NVRTC needs no cuda_fp16.h.
extern "C" __global__ void to_f16(const float *x, unsigned short *out, unsigned n) {
    const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x[i]));
    out[i] = h;
}

// out[i] = a[i] + b[i % b_len]: a residual (b_len = n) or a bias broadcast over rows.
extern "C" __global__ void add(const float *a, const float *b, float *out, unsigned n, unsigned b_len) {
    const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a[i] + b[i % b_len];
}

// out[r, c] = silu(a[r, c]) * a[r, width + c] for rows of 2 * width (gate and up side by side).
extern "C" __global__ void swiglu(const float *a, float *out, unsigned n, unsigned width) {
    const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const unsigned r = i / width, c = i % width;
    const float *row = a + (size_t)r * 2u * width;
    out[i] = silu(row[c]) * row[width + c];
}

// out[r, c] = table[ids[r], c]; zero for an id past the table's `vocab` rows.
extern "C" __global__ void embedding(const float *table, const unsigned *ids, float *out, unsigned n,
                                     unsigned width, unsigned vocab) {
    const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const unsigned id = ids[i / width];
    out[i] = id < vocab ? table[(size_t)id * width + i % width] : 0.0f;
}

// out[b, d] = the mean of hidden[t, d] over the rows t = starts[b]..starts[b + 1] of a packed
// batch (sequence b's tokens).
extern "C" __global__ void mean_pool(const float *hidden, const unsigned *starts, float *out, unsigned batch,
                                     unsigned width) {
    const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= batch * width) return;
    const unsigned b = i / width, d = i % width;
    float s = 0.0f;
    for (unsigned t = starts[b]; t < starts[b + 1]; ++t) s += hidden[(size_t)t * width + d];
    out[i] = s / (float)(starts[b + 1] - starts[b]);
}
