// The activations fused into the matmuls' epilogues (prepended to matmul.wgsl and
// qmatmul.wgsl by the Rust side: WGSL has no includes). act: 0 none, 1 GELU (erf), 2 SiLU.

fn erf(v: f32) -> f32 {
    // Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7).
    let s = sign(v);
    let a = abs(v);
    let t = 1.0 / (1.0 + 0.3275911 * a);
    let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    return s * (1.0 - poly * exp(-a * a));
}

fn activate(v: f32, act: u32) -> f32 {
    if (act == 1u) { return 0.5 * v * (1.0 + erf(v * 0.70710678118654752)); }
    if (act == 2u) { return v / (1.0 + exp(-v)); }
    return v;
}

