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

// out[r, :] = layer_norm(x[r, :] + residual[r, :]) * gamma + beta (BERT: the residual add and the
// norm in one pass; has_residual = 0 normalizes x alone).
extern "C" __global__ void add_layer_norm(const float *x, const float *residual, const float *gamma,
                                          const float *beta, float *out, unsigned cols, unsigned has_residual,
                                          float eps) {
    const size_t base = (size_t)blockIdx.x * cols;
    const float *row = x + base;
    const float *res = residual + base;
    float *dst = out + base;
    float s = 0.0f;
    for (unsigned c = threadIdx.x; c < cols; c += THREADS) s += row[c] + (has_residual ? res[c] : 0.0f);
    const float mean = block_sum(s) / cols;
    float s2 = 0.0f;
    for (unsigned c = threadIdx.x; c < cols; c += THREADS) {
        const float d = row[c] + (has_residual ? res[c] : 0.0f) - mean;
        s2 += d * d;
    }
    const float inv = rsqrtf(block_sum(s2) / cols + eps);
    for (unsigned c = threadIdx.x; c < cols; c += THREADS) {
        const float v = row[c] + (has_residual ? res[c] : 0.0f);
        dst[c] = (v - mean) * inv * gamma[c] + beta[c];
    }
}

// sum[r, :] = x[r, :] + residual[r, :] (written only with has_residual), then
// out[r, :] = sum[r, :] / sqrt(mean(sum^2) + eps) * weight (Llama: the residual add and the next
// block's norm in one pass).
extern "C" __global__ void add_rms_norm(const float *x, const float *residual, const float *weight, float *sum,
                                        float *out, unsigned cols, unsigned has_residual, float eps) {
    const size_t base = (size_t)blockIdx.x * cols;
    const float *row = x + base;
    const float *res = residual + base;
    float *dst = out + base;
    float s2 = 0.0f;
    for (unsigned c = threadIdx.x; c < cols; c += THREADS) {
        const float v = row[c] + (has_residual ? res[c] : 0.0f);
        if (has_residual) sum[base + c] = v;
        s2 += v * v;
    }
    const float inv = rsqrtf(block_sum(s2) / cols + eps);
    for (unsigned c = threadIdx.x; c < cols; c += THREADS)
        dst[c] = (row[c] + (has_residual ? res[c] : 0.0f)) * inv * weight[c];
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
