// Row-wise normalizations: one block per row, 256 threads striding over its columns, block sums
// by warp shuffles then shared memory. Compiled at run time by NVRTC (no headers: builtins only).

#define THREADS 256

// The sum of v over the block (every thread gets it).
__device__ float block_sum(float v) {
    __shared__ float warp_sums[THREADS / 32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    __syncthreads();
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < THREADS / 32; ++w) total += warp_sums[w];
    return total;
}

// The maximum of v over the block.
__device__ float block_max(float v) {
    __shared__ float warp_maxes[THREADS / 32];
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    __syncthreads();
    if (lane == 0) warp_maxes[warp] = v;
    __syncthreads();
    float m = warp_maxes[0];
    for (int w = 1; w < THREADS / 32; ++w) m = fmaxf(m, warp_maxes[w]);
    return m;
}

// out[r, :] = (x[r, :] - mean) / sqrt(var + eps) * gamma + beta (BERT).
extern "C" __global__ void layer_norm(const float *x, const float *gamma, const float *beta, float *out,
                                      unsigned cols, float eps) {
    const float *row = x + (size_t)blockIdx.x * cols;
    float *dst = out + (size_t)blockIdx.x * cols;
    float s = 0.0f;
    for (unsigned c = threadIdx.x; c < cols; c += THREADS) s += row[c];
    const float mean = block_sum(s) / cols;
    float s2 = 0.0f;
    for (unsigned c = threadIdx.x; c < cols; c += THREADS) {
        const float d = row[c] - mean;
        s2 += d * d;
    }
    const float inv = rsqrtf(block_sum(s2) / cols + eps);
    for (unsigned c = threadIdx.x; c < cols; c += THREADS) dst[c] = (row[c] - mean) * inv * gamma[c] + beta[c];
}

// out[r, :] = x[r, :] / sqrt(mean(x^2) + eps) * weight (Llama).
extern "C" __global__ void rms_norm(const float *x, const float *weight, float *out, unsigned cols, float eps) {
    const float *row = x + (size_t)blockIdx.x * cols;
    float *dst = out + (size_t)blockIdx.x * cols;
    float s2 = 0.0f;
    for (unsigned c = threadIdx.x; c < cols; c += THREADS) s2 += row[c] * row[c];
    const float inv = rsqrtf(block_sum(s2) / cols + eps);
    for (unsigned c = threadIdx.x; c < cols; c += THREADS) dst[c] = row[c] * inv * weight[c];
}

// out[r, :] = x[r, :] / max(|x[r, :]|, 1e-12) (sentence embeddings, as sentence-transformers).
extern "C" __global__ void l2_normalize(const float *x, float *out, unsigned cols) {
    const float *row = x + (size_t)blockIdx.x * cols;
    float *dst = out + (size_t)blockIdx.x * cols;
    float s2 = 0.0f;
    for (unsigned c = threadIdx.x; c < cols; c += THREADS) s2 += row[c] * row[c];
    const float inv = 1.0f / fmaxf(sqrtf(block_sum(s2)), 1e-12f);
    for (unsigned c = threadIdx.x; c < cols; c += THREADS) dst[c] = row[c] * inv;
}

// out[r, :] = softmax(x[r, :]), the maximum subtracted first.
extern "C" __global__ void softmax(const float *x, float *out, unsigned cols) {
    const float *row = x + (size_t)blockIdx.x * cols;
    float *dst = out + (size_t)blockIdx.x * cols;
    float m = -3.0e38f;
    for (unsigned c = threadIdx.x; c < cols; c += THREADS) m = fmaxf(m, row[c]);
    m = block_max(m);
    float s = 0.0f;
    for (unsigned c = threadIdx.x; c < cols; c += THREADS) s += expf(row[c] - m);
    const float inv = 1.0f / block_sum(s);
    for (unsigned c = threadIdx.x; c < cols; c += THREADS) dst[c] = expf(row[c] - m) * inv;
}
