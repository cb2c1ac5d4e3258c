// y[m, n] = act(x[m, k] . w[n, k]^T + bias[n]) for a block-quantized w (32 values a block):
// Q4_1 (w = d * q + m, 4 words of nibbles a block) or Q8_0 (w = d * q, 8 words of bytes a block),
// dequantized here into eight vec4 registers. A workgroup takes 16 rows of w (4 threads a row,
// striding over its blocks) and up to 4 rows of x: each block is unpacked once for all of them.
// No private arrays: a dynamically indexed one becomes scatter/gather on SIMD CPUs (lavapipe).
struct P { m: u32, n: u32, blocks: u32, kind: u32, has_bias: u32, act: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> scales: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read> quants: array<u32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

const TOKENS: u32 = 4u;
const ROWS: u32 = 16u;
const LANES: u32 = 4u;
var<workgroup> partial: array<vec4<f32>, 64>;

fn nibbles(word: u32, shift: u32) -> vec4<f32> {
    let w = word >> shift;
    return vec4<f32>(f32(w & 15u), f32((w >> 8u) & 15u), f32((w >> 16u) & 15u), f32((w >> 24u) & 15u));
}

fn bytes(word: u32) -> vec4<f32> {
    return vec4<f32>(vec4<i32>(i32(word << 24u) >> 24u, i32(word << 16u) >> 24u, i32(word << 8u) >> 24u, i32(word) >> 24u));
}

// The dot product of a block's 32 weights with x's 32 values from vec4 index `at`.
fn block_dot(w0: vec4<f32>, w1: vec4<f32>, w2: vec4<f32>, w3: vec4<f32>,
             w4: vec4<f32>, w5: vec4<f32>, w6: vec4<f32>, w7: vec4<f32>, at: u32) -> f32 {
    return dot(w0, x4[at]) + dot(w1, x4[at + 1u]) + dot(w2, x4[at + 2u]) + dot(w3, x4[at + 3u])
         + dot(w4, x4[at + 4u]) + dot(w5, x4[at + 5u]) + dot(w6, x4[at + 6u]) + dot(w7, x4[at + 7u]);
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = (wid.x + wid.z * 32768u) * ROWS + lid / LANES;
    let lane = lid % LANES;
    let tok0 = wid.y * TOKENS;
    let tokens = min(TOKENS, p.m - tok0);
    // x rows in vec4s: a block is 8 of them.
    let row4 = p.blocks * 8u;
    var acc = vec4<f32>(0.0);
    // Rows past the matrix (in the last group) compute nothing but still meet the barrier.
    let blocks = select(0u, p.blocks, row < p.n);
    for (var b = lane; b < blocks; b += LANES) {
        let blk = row * p.blocks + b;
        let dm = scales[blk];
        var w0: vec4<f32>; var w1: vec4<f32>; var w2: vec4<f32>; var w3: vec4<f32>;
        var w4: vec4<f32>; var w5: vec4<f32>; var w6: vec4<f32>; var w7: vec4<f32>;
        if (p.kind == 0u) {
            // Low nibbles are values 0..16, high nibbles 16..32.
            let q0 = quants[blk * 4u];
            let q1 = quants[blk * 4u + 1u];
            let q2 = quants[blk * 4u + 2u];
            let q3 = quants[blk * 4u + 3u];
            w0 = nibbles(q0, 0u) * dm.x + dm.y; w1 = nibbles(q1, 0u) * dm.x + dm.y;
            w2 = nibbles(q2, 0u) * dm.x + dm.y; w3 = nibbles(q3, 0u) * dm.x + dm.y;
            w4 = nibbles(q0, 4u) * dm.x + dm.y; w5 = nibbles(q1, 4u) * dm.x + dm.y;
            w6 = nibbles(q2, 4u) * dm.x + dm.y; w7 = nibbles(q3, 4u) * dm.x + dm.y;
        } else {
            let at = blk * 8u;
            w0 = bytes(quants[at]) * dm.x; w1 = bytes(quants[at + 1u]) * dm.x;
            w2 = bytes(quants[at + 2u]) * dm.x; w3 = bytes(quants[at + 3u]) * dm.x;
            w4 = bytes(quants[at + 4u]) * dm.x; w5 = bytes(quants[at + 5u]) * dm.x;
            w6 = bytes(quants[at + 6u]) * dm.x; w7 = bytes(quants[at + 7u]) * dm.x;
        }
        let at = tok0 * row4 + b * 8u;
        acc.x += block_dot(w0, w1, w2, w3, w4, w5, w6, w7, at);
        if (tokens > 1u) { acc.y += block_dot(w0, w1, w2, w3, w4, w5, w6, w7, at + row4); }
        if (tokens > 2u) { acc.z += block_dot(w0, w1, w2, w3, w4, w5, w6, w7, at + 2u * row4); }
        if (tokens > 3u) { acc.w += block_dot(w0, w1, w2, w3, w4, w5, w6, w7, at + 3u * row4); }
    }
    partial[lid] = acc;
    workgroupBarrier();
    if (lane == 0u && row < p.n) {
        let sum = partial[lid] + partial[lid + 1u] + partial[lid + 2u] + partial[lid + 3u];
        var b = 0.0;
        if (p.has_bias != 0u) { b = bias[row]; }
        y[tok0 * p.n + row] = activate(sum.x + b, p.act);
        if (tokens > 1u) { y[(tok0 + 1u) * p.n + row] = activate(sum.y + b, p.act); }
        if (tokens > 2u) { y[(tok0 + 2u) * p.n + row] = activate(sum.z + b, p.act); }
        if (tokens > 3u) { y[(tok0 + 3u) * p.n + row] = activate(sum.w + b, p.act); }
    }
}
