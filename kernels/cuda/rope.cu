// The first step of a decoder's attention for t new tokens at positions pos0..: rotates the
// interleaved pairs of Q and K by the rotary tables, writes Q to q_out and appends K and V to the
// layer's KV cache rows pos0.. (token-major, kv_heads * head_dim values a row), which stays on
// the device. One thread a pair. Compiled at run time by NVRTC.

extern "C" __global__ void rope_append(const float *qkv, const float *cos_t, const float *sin_t, float *q_out,
                                       float *k_cache, float *v_cache, unsigned t, unsigned pos0,
                                       unsigned heads, unsigned kv_heads, unsigned head_dim) {
    const unsigned q_width = heads * head_dim;
    const unsigned kv_width = kv_heads * head_dim;
    const unsigned width = q_width + 2u * kv_width;
    const unsigned pairs = width / 2u;
    const unsigned g = blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= t * pairs) return;
    const unsigned token = g / pairs;
    const unsigned c = (g % pairs) * 2u;
    const unsigned pos = pos0 + token;
    const float x0 = qkv[(size_t)token * width + c];
    const float x1 = qkv[(size_t)token * width + c + 1u];
    if (c >= q_width + kv_width) {
        const size_t at = (size_t)pos * kv_width + c - q_width - kv_width;
        v_cache[at] = x0;
        v_cache[at + 1u] = x1;
        return;
    }
    const unsigned f = pos * (head_dim / 2u) + (c % head_dim) / 2u;
    const float r0 = x0 * cos_t[f] - x1 * sin_t[f];
    const float r1 = x0 * sin_t[f] + x1 * cos_t[f];
    if (c < q_width) {
        q_out[(size_t)token * q_width + c] = r0;
        q_out[(size_t)token * q_width + c + 1u] = r1;
    } else {
        const size_t at = (size_t)pos * kv_width + c - q_width;
        k_cache[at] = r0;
        k_cache[at + 1u] = r1;
    }
}
