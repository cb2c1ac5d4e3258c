// Each row divided by max(its L2 norm, 1e-12); one workgroup a row.
struct P { rows: u32, width: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * 32768u;
    if (row >= p.rows) { return; }
    let base = row * p.width;
    var q = 0.0;
    for (var i = lid; i < p.width; i += 256u) { q += x[base + i] * x[base + i]; }
    let norm = max(sqrt(workgroup_sum(lid, q)), 1e-12);
    for (var i = lid; i < p.width; i += 256u) { out[base + i] = x[base + i] / norm; }
}
