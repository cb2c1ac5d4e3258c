// out[b, d] = sum_t mask[b, t] * hidden[b, t, d] / max(sum_t mask[b, t], 1e-9).
struct P { batch: u32, len: u32, width: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> hidden: array<f32>;
@group(0) @binding(2) var<storage, read> mask: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 32768u * 256u;
    if (i >= p.batch * p.width) { return; }
    let b = i / p.width;
    let d = i % p.width;
    var s = 0.0;
    var count = 0.0;
    for (var t = 0u; t < p.len; t++) {
        let m = mask[b * p.len + t];
        s += m * hidden[(b * p.len + t) * p.width + d];
        count += m;
    }
    out[i] = s / max(count, 1e-9);
}
