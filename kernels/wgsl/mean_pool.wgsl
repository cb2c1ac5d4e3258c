// out[b, d] = the mean of hidden[t, d] over the rows t of sequence b, which are
// starts[b]..starts[b + 1] of a packed batch.
struct P { batch: u32, width: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> hidden: array<f32>;
@group(0) @binding(2) var<storage, read> starts: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 32768u * 256u;
    if (i >= p.batch * p.width) { return; }
    let b = i / p.width;
    let d = i % p.width;
    var s = 0.0;
    for (var t = starts[b]; t < starts[b + 1u]; t++) {
        s += hidden[t * p.width + d];
    }
    out[i] = s / f32(starts[b + 1u] - starts[b]);
}
