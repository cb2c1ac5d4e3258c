// out = layer_norm(x + residual) * gamma + beta over rows of `width`; one workgroup a row.
struct P { rows: u32, width: u32, has_residual: u32, eps: f32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> residual: array<f32>;
@group(0) @binding(3) var<storage, read> gamma: array<f32>;
@group(0) @binding(4) var<storage, read> beta: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

fn value(i: u32) -> f32 {
    if (p.has_residual != 0u) { return x[i] + residual[i]; }
    return x[i];
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * 32768u;
    if (row >= p.rows) { return; }
    let base = row * p.width;
    var s = 0.0;
    for (var i = lid; i < p.width; i += 256u) { s += value(base + i); }
    let mean = workgroup_sum(lid, s) / f32(p.width);
    var q = 0.0;
    for (var i = lid; i < p.width; i += 256u) {
        let d = value(base + i) - mean;
        q += d * d;
    }
    let inv = inverseSqrt(workgroup_sum(lid, q) / f32(p.width) + p.eps);
    for (var i = lid; i < p.width; i += 256u) {
        out[base + i] = (value(base + i) - mean) * inv * gamma[i] + beta[i];
    }
}
