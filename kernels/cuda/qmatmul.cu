// y[m, n] = act(x[m, k] . w[n, k]^T + bias[n]) for a block-quantized w, 32 weights a block, the
// decode-time product (a few rows of x; larger batches dequantize and go to cuBLAS):
//   kind 0, Q4_1: w = d * q + m, q 4-bit (4 words of nibbles a block: low nibbles are values
//     0..16, high nibbles 16..32);
//   kind 1, Q8_0: w = d * q, q signed 8-bit (8 words a block).
// scales holds (d, m) a block as f32 (m unused for Q8_0), split from the GGUF blocks at upload.
// A warp takes one row of w, its lanes striding over the row's blocks, for up to 4 rows of x
// (blockIdx.y): each block is unpacked once for all of them. `dequantize` writes the f32 values of
// such a matrix for a cuBLAS product (prefill). Compiled at run time by NVRTC.

#define TOKENS 4

__device__ float activate(float v, unsigned act) {
    if (act == 1u) return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    if (act == 2u) return v / (1.0f + expf(-v));
    return v;
}

// The 32 weights of block `blk` into w.
__device__ void unpack(const float2 *scales, const unsigned *quants, size_t blk, unsigned kind, float *w) {
    const float2 dm = scales[blk];
    if (kind == 0u) {
        for (int word = 0; word < 4; ++word) {
            const unsigned q = quants[blk * 4u + word];
            for (int byte = 0; byte < 4; ++byte) {
                const unsigned bits = q >> (8 * byte);
                w[word * 4 + byte] = (float)(bits & 15u) * dm.x + dm.y;
                w[16 + word * 4 + byte] = (float)((bits >> 4) & 15u) * dm.x + dm.y;
            }
        }
    } else {
        for (int word = 0; word < 8; ++word) {
            const unsigned q = quants[blk * 8u + word];
            for (int byte = 0; byte < 4; ++byte) w[word * 4 + byte] = (float)(signed char)(q >> (8 * byte)) * dm.x;
        }
    }
}

// out[blk * 32 + c] = weight c of block blk, one thread a block.
extern "C" __global__ void dequantize(const float2 *scales, const unsigned *quants, float *out, unsigned blocks,
                                      unsigned kind) {
    const unsigned blk = blockIdx.x * blockDim.x + threadIdx.x;
    if (blk >= blocks) return;
    float w[32];
    unpack(scales, quants, blk, kind, w);
    for (int c = 0; c < 32; ++c) out[(size_t)blk * 32u + c] = w[c];
}

extern "C" __global__ void qmatmul(const float *x, const float2 *scales, const unsigned *quants,
                                   const float *bias, float *y, unsigned m, unsigned n, unsigned blocks,
                                   unsigned kind, unsigned has_bias, unsigned act) {
    const unsigned row = blockIdx.x * (blockDim.x / 32u) + threadIdx.x / 32u;
    const unsigned lane = threadIdx.x % 32u;
    const unsigned tok0 = blockIdx.y * TOKENS;
    const unsigned tokens = min((unsigned)TOKENS, m - tok0);
    if (row >= n) return;
    const size_t k = (size_t)blocks * 32u;
    float acc[TOKENS] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (unsigned b = lane; b < blocks; b += 32u) {
        const size_t blk = (size_t)row * blocks + b;
        float w[32];
        unpack(scales, quants, blk, kind, w);
        for (unsigned t = 0; t < tokens; ++t) {
            const float *xs = x + (tok0 + t) * k + (size_t)b * 32u;
            float s = 0.0f;
            for (int c = 0; c < 32; ++c) s += w[c] * xs[c];
            acc[t] += s;
        }
    }
    for (unsigned t = 0; t < tokens; ++t) {
        float s = acc[t];
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) {
            if (has_bias) s += bias[row];
            y[(tok0 + t) * (size_t)n + row] = activate(s, act);
        }
    }
}
