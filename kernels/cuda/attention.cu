// Masked softmax attention: one query row and one head per block of 64 threads, keys in chunks
// of 64 with a running maximum and sum (flash-attention style: any number of keys fits in shared
// memory). Q, K and V are read where they lie: row strides and column offsets say where.
//   encoder (causal = 0): sequence b (blockIdx.z) is rows starts[b]..starts[b + 1] of a packed
//     batch (no padding); query i sees the keys of its own sequence; queries past its end return.
//   decoder (causal = 1): query i sees keys 0..=pos0 + i (the KV cache up to itself).
// Query head h reads key/value head h / group (grouped-query attention). head_dim <= 256.
// Compiled at run time by NVRTC.

#define CHUNK 64

__device__ float warp_reduce_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ float warp_reduce_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

extern "C" __global__ void attention(const float *q, const float *k, const float *v, const unsigned *starts,
                                     float *out, unsigned group, unsigned head_dim, unsigned causal,
                                     unsigned q_stride, unsigned k_stride, unsigned v_stride, unsigned o_stride,
                                     unsigned q_off, unsigned k_off, unsigned v_off, unsigned pos0, float scale) {
    __shared__ float qs[256];
    __shared__ float weights[CHUNK];
    __shared__ float pair[2];
    const unsigned i = blockIdx.x, h = blockIdx.y, b = blockIdx.z, lid = threadIdx.x;
    const unsigned d = head_dim;
    const unsigned row0 = causal ? 0u : starts[b];
    const unsigned keys = causal ? pos0 + i + 1u : starts[b + 1] - starts[b];
    if (!causal && i >= keys) return;
    const size_t q_base = (size_t)(row0 + i) * q_stride + q_off + h * d;
    const size_t o_base = (size_t)(row0 + i) * o_stride + h * d;
    for (unsigned c = lid; c < d; c += CHUNK) qs[c] = q[q_base + c];
    __syncthreads();
    const unsigned kh = h / group;
    const size_t k_base = (size_t)row0 * k_stride + k_off + kh * d;
    const size_t v_base = (size_t)row0 * v_stride + v_off + kh * d;
    float run_max = -3.0e38f, run_sum = 0.0f;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // output values lid, lid + 64, lid + 128, lid + 192
    for (unsigned c0 = 0; c0 < keys; c0 += CHUNK) {
        const unsigned j = c0 + lid;
        float score = -3.0e38f;
        if (j < keys) {
            const float *key = k + k_base + (size_t)j * k_stride;
            float dot = 0.0f;
            for (unsigned c = 0; c < d; ++c) dot += qs[c] * key[c];
            score = dot * scale;
        }
        // The chunk's maximum, then its sum of exponentials: two warps, combined through `pair`.
        const float m = warp_reduce_max(score);
        if (lid % 32 == 0) pair[lid / 32] = m;
        __syncthreads();
        const float new_max = fmaxf(run_max, fmaxf(pair[0], pair[1]));
        __syncthreads();
        const float e = j < keys ? expf(score - new_max) : 0.0f;
        weights[lid] = e;
        const float s = warp_reduce_sum(e);
        if (lid % 32 == 0) pair[lid / 32] = s;
        __syncthreads();
        const float alpha = expf(run_max - new_max);
        run_sum = run_sum * alpha + pair[0] + pair[1];
        const unsigned n = min((unsigned)CHUNK, keys - c0);
        for (int slot = 0; slot < 4; ++slot) {
            const unsigned c = lid + slot * CHUNK;
            if (c >= d) break;
            float a = acc[slot] * alpha;
            const float *col = v + v_base + (size_t)c0 * v_stride + c;
            for (unsigned jj = 0; jj < n; ++jj) a += weights[jj] * col[(size_t)jj * v_stride];
            acc[slot] = a;
        }
        run_max = new_max;
        __syncthreads();
    }
    for (int slot = 0; slot < 4; ++slot) {
        const unsigned c = lid + slot * CHUNK;
        if (c < d) out[o_base + c] = acc[slot] / run_sum;
    }
}
