// y[m, n] = act(x[m, k] . w[n, k]^T + bias[n]): a 64x64 output tile per workgroup of 16x16
// threads, each thread 4x4 outputs; 16-wide slices of k staged in workgroup memory. Rows of x and
// w are read as vec4 when k is a multiple of 4 (the same buffers are bound both ways).
struct P { m: u32, n: u32, k: u32, has_bias: u32, act: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> w: array<f32>;
@group(0) @binding(4) var<storage, read> w4: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> bias: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;

// [kk][row / 4] holds rows row..row+4 of the tile at depth kk.
var<workgroup> xs: array<vec4<f32>, 256>;
var<workgroup> ws: array<vec4<f32>, 256>;

// Four consecutive values of a row from column c (zeros past the row's end or past the rows).
fn load4(is_x: bool, row: u32, rows: u32, c: u32) -> vec4<f32> {
    if (row >= rows || c >= p.k) { return vec4<f32>(0.0); }
    let at = row * p.k + c;
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

fn erf(v: f32) -> f32 {
    // Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7).
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

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row0 = wid.y * 64u;
    let col0 = wid.x * 64u;
    let t = lid.y * 16u + lid.x;
    // Each thread stages one vec4 of x and one of w per slice: row t / 4, columns (t % 4) * 4...
    let lr = t / 4u;
    let lc = (t % 4u) * 4u;
    var acc: array<vec4<f32>, 4>;
    for (var k0 = 0u; k0 < p.k; k0 += 16u) {
        let xv = load4(true, row0 + lr, p.m, k0 + lc);
        let wv = load4(false, col0 + lr, p.n, k0 + lc);
        for (var i = 0u; i < 4u; i++) {
            xs[(lc + i) * 16u + lr / 4u][lr % 4u] = xv[i];
            ws[(lc + i) * 16u + lr / 4u][lr % 4u] = wv[i];
        }
        workgroupBarrier();
        for (var kk = 0u; kk < 16u; kk++) {
            let a = xs[kk * 16u + lid.y];
            let b = ws[kk * 16u + lid.x];
            acc[0] += a[0] * b;
            acc[1] += a[1] * b;
            acc[2] += a[2] * b;
            acc[3] += a[3] * b;
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let row = row0 + lid.y * 4u + i;
        if (row >= p.m) { break; }
        for (var j = 0u; j < 4u; j++) {
            let col = col0 + lid.x * 4u + j;
            if (col < p.n) {
                var v = acc[i][j];
                if (p.has_bias != 0u) { v += bias[col]; }
                y[row * p.n + col] = activate(v);
            }
        }
    }
}
