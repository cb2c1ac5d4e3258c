// One thread an output element, over a 2-D grid of 256-thread workgroups (32768 wide):
//   op 0, add:        out[i] = a[i] + b[i % b_len] (b broadcast over a's leading dimensions)
//   op 1, swiglu:     out[r, c] = silu(a[r, c]) * a[r, width + c] for rows of 2 * width
//   op 2, embedding:  out[r, c] = a[ids[r] * width + c], zero for ids past `b_len` rows
struct P { op: u32, n: u32, width: u32, b_len: u32 }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> ids: array<u32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 32768u * 256u;
    if (i >= p.n) { return; }
    switch p.op {
        case 0u: { out[i] = a[i] + b[i % p.b_len]; }
        case 1u: {
            let r = i / p.width;
            let c = i % p.width;
            let g = a[r * 2u * p.width + c];
            out[i] = g / (1.0 + exp(-g)) * a[r * 2u * p.width + p.width + c];
        }
        default: {
            let id = ids[i / p.width];
            if (id < p.b_len) { out[i] = a[id * p.width + i % p.width]; } else { out[i] = 0.0; }
        }
    }
}
