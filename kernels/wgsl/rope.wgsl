// The first step of a decoder's attention for t new tokens at positions pos0..: rotates the
// interleaved pairs of Q and K by the rotary tables, writes Q to `q_out` and appends K and V to
// the layer's cache rows pos0.. (token-major, kv_heads * head_dim values a row). One thread a pair.
struct P { t: u32, pos0: u32, heads: u32, kv_heads: u32, head_dim: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> cos_t: array<f32>;
@group(0) @binding(3) var<storage, read> sin_t: array<f32>;
@group(0) @binding(4) var<storage, read_write> q_out: array<f32>;
@group(0) @binding(5) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(6) var<storage, read_write> v_cache: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let q_width = p.heads * p.head_dim;
    let kv_width = p.kv_heads * p.head_dim;
    let width = q_width + 2u * kv_width;
    let pairs = width / 2u;
    let g = gid.x + gid.y * 32768u * 64u;
    if (g >= p.t * pairs) { return; }
    let token = g / pairs;
    let c = (g % pairs) * 2u;
    let pos = p.pos0 + token;
    let x0 = qkv[token * width + c];
    let x1 = qkv[token * width + c + 1u];
    if (c >= q_width + kv_width) {
        let at = pos * kv_width + c - q_width - kv_width;
        v_cache[at] = x0;
        v_cache[at + 1u] = x1;
        return;
    }
    let half = p.head_dim / 2u;
    let f = pos * half + (c % p.head_dim) / 2u;
    let r0 = x0 * cos_t[f] - x1 * sin_t[f];
    let r1 = x0 * sin_t[f] + x1 * cos_t[f];
    if (c < q_width) {
        q_out[token * q_width + c] = r0;
        q_out[token * q_width + c + 1u] = r1;
    } else {
        let at = pos * kv_width + c - q_width;
        k_cache[at] = r0;
        k_cache[at + 1u] = r1;
    }
}
