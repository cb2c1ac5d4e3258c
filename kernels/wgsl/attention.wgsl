// Softmax attention of one query row and one head per workgroup (64 threads), keys in chunks
// of 64 with a running maximum and sum (so any number of keys fits in workgroup memory).
// Q, K and V are read where they lie: row strides and column offsets say where.
//   encoder (causal = 0): sequence b is rows starts[b]..starts[b + 1] of a packed batch (no
//     padding); query i of it sees the keys of its own sequence; queries past its end do nothing.
//   decoder (causal = 1): query i sees keys 0..=pos0 + i (the cache up to itself).
// Query head h reads key/value head h / group (grouped-query attention).
struct P {
    heads: u32, group: u32, head_dim: u32, causal: u32,
    q_stride: u32, k_stride: u32, v_stride: u32, o_stride: u32,
    q_off: u32, k_off: u32, v_off: u32, pos0: u32,
    scale: f32,
}
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read> starts: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

const CHUNK: u32 = 64u;
// The query row; head_dim is at most 256 (four values a thread).
var<workgroup> qs: array<f32, 256>;
var<workgroup> s: array<f32, 64>;
var<workgroup> red: array<f32, 64>;
var<workgroup> n_keys: u32;
var<workgroup> first_row: u32;

// `start` plus the chunk's n weights times one value column of V starting at `at`.
fn weigh(start: f32, n: u32, at: u32) -> f32 {
    var a = start;
    for (var jj = 0u; jj < n; jj++) { a += s[jj] * v[at + jj * p.v_stride]; }
    return a;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = wid.x;
    let h = wid.y;
    let b = wid.z;
    let d = p.head_dim;
    // Loaded through workgroup memory so that the loop bounds below are uniform.
    if (lid == 0u) {
        if (p.causal == 0u) {
            first_row = starts[b];
            n_keys = starts[b + 1u] - starts[b];
        } else {
            first_row = 0u;
            n_keys = p.pos0 + i + 1u;
        }
    }
    let keys = workgroupUniformLoad(&n_keys);
    let row0 = workgroupUniformLoad(&first_row);
    if (p.causal == 0u && i >= keys) { return; }
    let o_base = (row0 + i) * p.o_stride + h * d;
    let q_base = (row0 + i) * p.q_stride + p.q_off + h * d;
    for (var c = lid; c < d; c += 64u) { qs[c] = q[q_base + c]; }
    workgroupBarrier();
    let kh = h / p.group;
    let k_base = row0 * p.k_stride + p.k_off + kh * d;
    let v_base = row0 * p.v_stride + p.v_off + kh * d;
    var run_max = -3.0e38;
    var run_sum = 0.0;
    // Output values lid, lid + 64, lid + 128, lid + 192 of the head (named, not a private array).
    var acc = vec4<f32>(0.0);
    for (var c0 = 0u; c0 < keys; c0 += CHUNK) {
        let j = c0 + lid;
        var score = -3.0e38;
        if (j < keys) {
            var dot = 0.0;
            let at = k_base + j * p.k_stride;
            for (var c = 0u; c < d; c++) { dot += qs[c] * k[at + c]; }
            score = dot * p.scale;
        }
        // The chunk's maximum and then its sum of exponentials, by tree reductions.
        red[lid] = score;
        workgroupBarrier();
        for (var stride = 32u; stride > 0u; stride >>= 1u) {
            if (lid < stride) { red[lid] = max(red[lid], red[lid + stride]); }
            workgroupBarrier();
        }
        let new_max = max(run_max, red[0]);
        workgroupBarrier();
        let e = select(0.0, exp(score - new_max), j < keys);
        s[lid] = e;
        red[lid] = e;
        workgroupBarrier();
        for (var stride = 32u; stride > 0u; stride >>= 1u) {
            if (lid < stride) { red[lid] += red[lid + stride]; }
            workgroupBarrier();
        }
        let alpha = exp(run_max - new_max);
        run_sum = run_sum * alpha + red[0];
        let n = min(CHUNK, keys - c0);
        let at = v_base + c0 * p.v_stride + lid;
        if (lid < d) { acc.x = weigh(acc.x * alpha, n, at); }
        if (lid + 64u < d) { acc.y = weigh(acc.y * alpha, n, at + 64u); }
        if (lid + 128u < d) { acc.z = weigh(acc.z * alpha, n, at + 128u); }
        if (lid + 192u < d) { acc.w = weigh(acc.w * alpha, n, at + 192u); }
        run_max = new_max;
        workgroupBarrier();
    }
    let o = acc / run_sum;
    if (lid < d) { out[o_base + lid] = o.x; }
    if (lid + 64u < d) { out[o_base + lid + 64u] = o.y; }
    if (lid + 128u < d) { out[o_base + lid + 128u] = o.z; }
    if (lid + 192u < d) { out[o_base + lid + 192u] = o.w; }
}
