// y[m, n] = act(x[m, k] . w[n, k]^T + bias[n]): a 64x64 output tile per workgroup of 16x16
// threads, each thread 4x4 outputs; 16-wide slices of k staged in workgroup memory. Rows of x and
// w are read as vec4 when k is a multiple of 4 (the same buffers are bound both ways); with
// `w_f16`, w holds f16 pairs in u32 words (half the bytes), unpacked here and added in f32.
struct P { m: u32, n: u32, k: u32, has_bias: u32, act: u32, w_f16: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> w: array<f32>;
@group(0) @binding(4) var<storage, read> w4: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> wh: array<vec2<u32>>;
@group(0) @binding(6) var<storage, read> bias: array<f32>;
@group(0) @binding(7) var<storage, read_write> y: array<f32>;

// Row-major tiles, k innermost: [row][k / 4] vec4s of the 16-deep slice, so that staging
// writes and compute reads are whole vec4s.
var<workgroup> xs: array<vec4<f32>, 256>;
var<workgroup> ws: array<vec4<f32>, 256>;

// Four consecutive values of a row from column c (zeros past the row's end or past the rows).
fn load4(is_x: bool, row: u32, rows: u32, c: u32) -> vec4<f32> {
    if (row >= rows || c >= p.k) { return vec4<f32>(0.0); }
    let at = row * p.k + c;
    if (!is_x && p.w_f16 != 0u) {
        let h = wh[at / 4u];
        return vec4<f32>(unpack2x16float(h.x), unpack2x16float(h.y));
    }
    if (p.k % 4u == 0u) {
        if (is_x) { return x4[at / 4u]; } else { return w4[at / 4u]; }
    }
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        if (c + i < p.k) {
            if (is_x) { v[i] = x[at + i]; } else { v[i] = w[at + i]; }
        }
    }
    return v;
}

fn store(row: u32, col0: u32, v: vec4<f32>) {
    if (row >= p.m) { return; }
    for (var j = 0u; j < 4u; j++) {
        let col = col0 + j;
        if (col < p.n) {
            var o = v[j];
            if (p.has_bias != 0u) { o += bias[col]; }
            y[row * p.n + col] = activate(o, p.act);
        }
    }
}

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row0 = wid.y * 64u;
    let col0 = wid.x * 64u;
    let t = lid.y * 16u + lid.x;
    // Each thread stages one vec4 of x and one of w per slice: row t / 4, columns (t % 4) * 4...
    let lr = t / 4u;
    let lc = (t % 4u) * 4u;
    // Thread (x, y) computes rows y * 4.. and columns x * 4.. of the tile; named accumulators (no
    // private array, which SIMD CPU drivers would spill to memory).
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    let xr = lid.y * 16u;
    let wr = lid.x * 16u;
    for (var k0 = 0u; k0 < p.k; k0 += 16u) {
        xs[t] = load4(true, row0 + lr, p.m, k0 + lc);
        ws[t] = load4(false, col0 + lr, p.n, k0 + lc);
        workgroupBarrier();
        for (var kk = 0u; kk < 4u; kk++) {
            let a0 = xs[xr + kk];
            let a1 = xs[xr + 4u + kk];
            let a2 = xs[xr + 8u + kk];
            let a3 = xs[xr + 12u + kk];
            let b0 = ws[wr + kk];
            let b1 = ws[wr + 4u + kk];
            let b2 = ws[wr + 8u + kk];
            let b3 = ws[wr + 12u + kk];
            acc0 += vec4<f32>(dot(a0, b0), dot(a0, b1), dot(a0, b2), dot(a0, b3));
            acc1 += vec4<f32>(dot(a1, b0), dot(a1, b1), dot(a1, b2), dot(a1, b3));
            acc2 += vec4<f32>(dot(a2, b0), dot(a2, b1), dot(a2, b2), dot(a2, b3));
            acc3 += vec4<f32>(dot(a3, b0), dot(a3, b1), dot(a3, b2), dot(a3, b3));
        }
        workgroupBarrier();
    }
    let r = row0 + lid.y * 4u;
    let c = col0 + lid.x * 4u;
    store(r, c, acc0);
    store(r + 1u, c, acc1);
    store(r + 2u, c, acc2);
    store(r + 3u, c, acc3);
}
