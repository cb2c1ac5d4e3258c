// A sum over a 256-thread workgroup, prepended to the row shaders (layer_norm, rms_norm,
// l2_normalize) by the Rust side: WGSL has no includes.
var<workgroup> red: array<f32, 256>;

// The sum of every thread's `v`, returned to all threads (call it from uniform control flow).
fn workgroup_sum(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) { red[lid] += red[lid + s]; }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
}

