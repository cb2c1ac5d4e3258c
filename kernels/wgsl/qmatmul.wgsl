// y[m, n] = act(x[m, k] . w[n, k]^T + bias[n]) for a block-quantized w (32 values a block):
// Q4_1 (w = d * q + m, 4 words of nibbles a block) or Q8_0 (w = d * q, 8 words of bytes a block),
// dequantized here. A workgroup takes one row of w and up to 8 rows of x: each block is unpacked
// once and used for all of them; the 64 threads stride over the blocks and reduce at the end.
struct P { m: u32, n: u32, blocks: u32, kind: u32, has_bias: u32, act: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> scales: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read> quants: array<u32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

const TOKENS: u32 = 8u;
var<workgroup> partial: array<array<f32, 64>, 8>;

fn erf(v: f32) -> f32 {
    let s = sign(v);
    let a = abs(v);
    let t = 1.0 / (1.0 + 0.3275911 * a);
    let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    return s * (1.0 - poly * exp(-a * a));
}

fn activate(v: f32) -> f32 {
    if (p.act == 1u) { return 0.5 * v * (1.0 + erf(v * 0.70710678118654752)); }
    if (p.act == 2u) { return v / (1.0 + exp(-v)); }
    return v;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.z * 32768u;
    // The grid is a whole number of 32768-row slabs; rows past the matrix have nothing to do.
    if (row >= p.n) { return; }
    let tok0 = wid.y * TOKENS;
    let k = p.blocks * 32u;
    let tokens = min(TOKENS, p.m - tok0);
    var acc: array<f32, 8>;
    for (var b = lid; b < p.blocks; b += 64u) {
        let blk = row * p.blocks + b;
        let dm = scales[blk];
        var w: array<f32, 32>;
        if (p.kind == 0u) {
            for (var i = 0u; i < 4u; i++) {
                let word = quants[blk * 4u + i];
                for (var j = 0u; j < 4u; j++) {
                    let byte = (word >> (8u * j)) & 0xffu;
                    w[i * 4u + j] = dm.x * f32(byte & 0xfu) + dm.y;
                    w[16u + i * 4u + j] = dm.x * f32(byte >> 4u) + dm.y;
                }
            }
        } else {
            for (var i = 0u; i < 8u; i++) {
                let word = quants[blk * 8u + i];
                for (var j = 0u; j < 4u; j++) {
                    // Sign-extend the byte.
                    let q = (i32(word << (24u - 8u * j))) >> 24u;
                    w[i * 4u + j] = dm.x * f32(q);
                }
            }
        }
        for (var t = 0u; t < tokens; t++) {
            let base = (tok0 + t) * k + b * 32u;
            var s = 0.0;
            for (var i = 0u; i < 32u; i++) {
                s += w[i] * x[base + i];
            }
            acc[t] += s;
        }
    }
    for (var t = 0u; t < TOKENS; t++) {
        partial[t][lid] = acc[t];
    }
    workgroupBarrier();
    for (var stride = 32u; stride > 0u; stride >>= 1u) {
        if (lid < stride) {
            for (var t = 0u; t < TOKENS; t++) {
                partial[t][lid] += partial[t][lid + stride];
            }
        }
        workgroupBarrier();
    }
    if (lid < tokens) {
        var v = partial[lid][0];
        if (p.has_bias != 0u) { v += bias[row]; }
        y[(tok0 + lid) * p.n + row] = activate(v);
    }
}
