//! Row kernels for the element-wise work around the matrix products: written as plain loops that
//! LLVM vectorizes, compiled twice (AVX2+FMA, chosen at run time, and the portable baseline), with
//! polynomial `exp` and `erf` so that no libm call blocks vectorization. The `reference` module
//! holds the plain libm versions the tests compare against.

/// `e^x` within 2 ulp over the f32 range; NaN stays NaN, large negatives flush toward 0.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.7);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = 1.0
        + r * (1.0
            + r * (0.5 + r * (0.166_666_67 + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_889)))));
    // 2^n from n's bits: adding 1.5 * 2^23 puts the integer n in the low mantissa bits. (A plain
    // `n as i32` saturates, and that check does not vectorize.)
    let k = (n + 12_582_912.0).to_bits().wrapping_sub(0x4B40_0000);
    p * f32::from_bits(k.wrapping_add(127) << 23)
}

/// `erf(x)` within 5e-7 absolute: a rational minimax fit on [-4, 4] (the form Eigen uses for
/// `erf` in float), one division and no `exp`; beyond 4, erf is +-1 in f32.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p - 2.101_024e-6;
    p = x2 * p - 5.692_506_4e-5;
    p = x2 * p - 7.349_906_3e-4;
    p = x2 * p - 2.954_600_1e-3;
    p = x2 * p - 1.609_603_3e-2;
    let mut q = x2 * -1.456_607_2e-5 - 2.133_740_6e-4;
    q = x2 * q - 1.682_827e-3;
    q = x2 * q - 7.373_329_3e-3;
    q = x2 * q - 1.426_474e-2;
    // Exactly +-1 at the ends, where f32's erf is +-1 too (and gelu(-inf) becomes NaN, not -inf).
    if x.abs() >= 3.92 {
        1.0f32.copysign(x)
    } else {
        x * p / q
    }
}

/// Float sums and maxima are not reassociated by the compiler, so a plain fold runs one lane at a
/// time: these keep 8 partial results side by side, which vectorizes.
#[inline(always)]
fn lanes_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&x| f(x)).sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += f(c[i]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn lanes_max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    for c in chunks {
        for i in 0..8 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    acc.iter().fold(tail, |m, &x| if x > m { x } else { m })
}

#[inline(always)]
pub(crate) fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `row = gelu(row + bias)` (`bias` empty or as long as `row`) in 16 lanes: [`erf`]'s polynomials
/// with fused multiply-adds, and its division as a reciprocal estimate refined by one Newton step
/// (within 2 ulp of the quotient; `vdivps` alone took ~5% of a MiniLM forward at batch 1).
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn bias_gelu_avx512(row: &mut [f32], bias: &[f32]) {
    use std::arch::x86_64::*;
    debug_assert!(bias.is_empty() || bias.len() == row.len());
    for start in (0..row.len()).step_by(16) {
        let mask = ((1u32 << (row.len() - start).min(16)) - 1) as __mmask16;
        let at = row.as_mut_ptr().add(start);
        let mut x = _mm512_maskz_loadu_ps(mask, at);
        if !bias.is_empty() {
            x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(mask, bias.as_ptr().add(start)));
        }
        let erf = erf_avx512(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2)));
        let y = _mm512_mul_ps(
            _mm512_mul_ps(_mm512_set1_ps(0.5), x),
            _mm512_add_ps(_mm512_set1_ps(1.0), erf),
        );
        _mm512_mask_storeu_ps(at, mask, y);
    }
}

/// [`erf`] in 16 lanes (NaN stays NaN: `max`/`min` return their second operand on NaN).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn erf_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let x = _mm512_min_ps(_mm512_set1_ps(4.0), _mm512_max_ps(_mm512_set1_ps(-4.0), x));
    let x2 = _mm512_mul_ps(x, x);
    let step = |acc, c: f32| _mm512_fmadd_ps(x2, acc, _mm512_set1_ps(c));
    let mut p = step(_mm512_set1_ps(-2.726_142_3e-10), 2.770_681_4e-8);
    for c in [
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906_3e-4,
        -2.954_600_1e-3,
        -1.609_603_3e-2,
    ] {
        p = step(p, c);
    }
    let mut q = step(_mm512_set1_ps(-1.456_607_2e-5), -2.133_740_6e-4);
    for c in [-1.682_827e-3, -7.373_329_3e-3, -1.426_474e-2] {
        q = step(q, c);
    }
    // 1/q: a 14-bit estimate, then r + r(1 - qr).
    let r = _mm512_rcp14_ps(q);
    let r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(q, r, _mm512_set1_ps(1.0)), r);
    let quotient = _mm512_mul_ps(_mm512_mul_ps(x, p), r);
    // +-1 from |x| >= 3.92, with x's sign.
    let bits = _mm512_castps_si512(x);
    let sign = _mm512_and_si512(bits, _mm512_set1_epi32(i32::MIN));
    let one = _mm512_castsi512_ps(_mm512_or_si512(sign, _mm512_set1_epi32(1.0f32.to_bits() as i32)));
    let saturated = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_abs_ps(x), _mm512_set1_ps(3.92));
    _mm512_mask_blend_ps(saturated, quotient, one)
}

#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `row[i] = act(row[i] + bias[i])` over each row of `x` (`bias` may be empty: no bias).
pub(crate) fn bias_activation(x: &mut [f32], bias: &[f32], act: crate::Activation) {
    #[cfg(target_arch = "x86_64")]
    if act == crate::Activation::GeluErf && std::arch::is_x86_feature_detected!("avx512f") {
        let width = if bias.is_empty() { x.len() } else { bias.len() }.max(1);
        for row in x.chunks_exact_mut(width) {
            // SAFETY: AVX-512F was detected; `bias` is empty or `width` long.
            unsafe { bias_gelu_avx512(row, bias) };
        }
        return;
    }
    bias_activation_rows(x, bias, act)
}

multiversion! {
    /// [`bias_activation`] in plain code (AVX-512, AVX2+FMA and baseline builds).
    fn bias_activation_rows(x: &mut [f32], bias: &[f32], act: crate::Activation) {
        let width = if bias.is_empty() { x.len() } else { bias.len() }.max(1);
        for row in x.chunks_exact_mut(width) {
            if !bias.is_empty() {
                for (v, b) in row.iter_mut().zip(bias) {
                    *v += b;
                }
            }
            match act {
                crate::Activation::None => {}
                crate::Activation::GeluErf => row.iter_mut().for_each(|v| *v = gelu(*v)),
                crate::Activation::Silu => row.iter_mut().for_each(|v| *v = silu(*v)),
            }
        }
    }
}

multiversion! {
    /// Each row of `x` is `[gate | up]`, both `half` wide; `out`'s row is `silu(gate) * up`.
    fn swiglu(x: &[f32], out: &mut [f32], half: usize) {
        for r in 0..out.len() / half {
            let (gate, up) = x[r * 2 * half..(r + 1) * 2 * half].split_at(half);
            for ((o, g), u) in out[r * half..(r + 1) * half].iter_mut().zip(gate).zip(up) {
                *o = silu(*g) * u;
            }
        }
    }
}

multiversion! {
    /// `out = layer_norm(x + residual) * gamma + beta` per row (`residual` may be empty).
    fn add_layer_norm(x: &[f32], residual: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
        let width = gamma.len();
        for (r, o) in out.chunks_exact_mut(width).enumerate() {
            let xr = &x[r * width..(r + 1) * width];
            if residual.is_empty() {
                o.copy_from_slice(xr);
            } else {
                for ((o, a), b) in o.iter_mut().zip(xr).zip(&residual[r * width..(r + 1) * width]) {
                    *o = a + b;
                }
            }
            let mean = lanes_sum(o, |v| v) / width as f32;
            let var = lanes_sum(o, |v| (v - mean) * (v - mean)) / width as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for ((v, g), b) in o.iter_mut().zip(gamma).zip(beta) {
                *v = (*v - mean) * inv * g + b;
            }
        }
    }
}

multiversion! {
    /// `out = x / rms(x) * gamma` per row; with `sum_into` non-empty, first `x += sum_into`
    /// (the residual add), writing the sum back to `sum_into`.
    fn add_rms_norm(x: &[f32], sum_into: &mut [f32], gamma: &[f32], eps: f32, out: &mut [f32]) {
        let width = gamma.len();
        for (r, o) in out.chunks_exact_mut(width).enumerate() {
            let xr = &x[r * width..(r + 1) * width];
            if sum_into.is_empty() {
                o.copy_from_slice(xr);
            } else {
                let s = &mut sum_into[r * width..(r + 1) * width];
                for ((s, o), a) in s.iter_mut().zip(o.iter_mut()).zip(xr) {
                    *s += a;
                    *o = *s;
                }
            }
            let ms = lanes_sum(o, |v| v * v) / width as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            for (v, g) in o.iter_mut().zip(gamma) {
                *v *= inv * g;
            }
        }
    }
}

multiversion! {
    /// Softmax of `row` in place, scaled by `scale` first (`scale` > 0): passes for the max,
    /// `exp`, the sum and the normalization, each vectorized. A NaN anywhere makes the row NaN
    /// (the max skips it, but its `exp` is NaN, and so are the sum and every quotient).
    fn scaled_softmax(row: &mut [f32], scale: f32) {
        let max = lanes_max(row) * scale;
        row.iter_mut().for_each(|v| *v = exp(*v * scale - max));
        let inv = 1.0 / lanes_sum(row, |v| v);
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

/// Plain versions with libm, for tests.
#[cfg(test)]
pub(crate) mod reference {
    pub(crate) fn gelu(x: f32) -> f32 {
        (0.5 * x as f64 * (1.0 + libm_erf(x as f64 / std::f64::consts::SQRT_2))) as f32
    }

    /// erf in f64 by its Taylor series near 0 and continued fraction beyond (accurate to ~1e-12).
    pub(crate) fn libm_erf(x: f64) -> f64 {
        let a = x.abs();
        let y = if a < 2.5 {
            let mut term = a;
            let mut sum = a;
            for n in 1..80 {
                term *= -a * a / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            let mut f = 0.0;
            for n in (1..60).rev() {
                f = n as f64 / 2.0 / (a + f);
            }
            1.0 - (-a * a).exp() / (a + f) / std::f64::consts::PI.sqrt()
        };
        y.copysign(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid() -> Vec<f32> {
        (-4000..=4000)
            .map(|i| i as f32 * 0.0025)
            .chain([-30.0, -10.0, 10.0, 30.0, 1e-30, -1e-30])
            .collect()
    }

    #[test]
    fn exp_and_erf_are_accurate() {
        for x in (-8700..8800).map(|i| i as f32 * 0.01) {
            let (got, want) = (exp(x), (x as f64).exp());
            assert!(
                ((got as f64 - want) / want).abs() < 5e-7,
                "exp({x}) = {got}, want {want}"
            );
        }
        for x in grid() {
            let (got, want) = (erf(x), reference::libm_erf(x as f64));
            assert!((got as f64 - want).abs() < 5e-7, "erf({x}) = {got}, want {want}");
        }
        assert!(exp(f32::NAN).is_nan() && erf(f32::NAN).is_nan());
        assert_eq!(exp(f32::NEG_INFINITY), exp(-87.3));
        assert!((erf(f32::INFINITY) - 1.0).abs() < 1e-6 && (erf(-7.0) + 1.0).abs() < 1e-6);
    }

    #[test]
    fn fused_bias_gelu_matches_the_reference() {
        let x = grid();
        let bias = vec![0.25f32; x.len()];
        // The dispatching entry (16-lane GELU on AVX-512 CPUs) and the plain rows.
        type Run = fn(&mut [f32], &[f32], crate::Activation);
        for run in [bias_activation as Run, bias_activation_rows] {
            let mut y = x.clone();
            run(&mut y, &bias, crate::Activation::GeluErf);
            for (v, x) in y.iter().zip(&x) {
                let want = reference::gelu(x + 0.25);
                // erf's 5e-7, scaled by x/2, plus f32 rounding of the result.
                let tolerance = 3e-7 * (1.0 + (x + 0.25).abs()) + 2e-7 * want.abs();
                assert!((v - want).abs() <= tolerance, "gelu({x}+0.25) = {v}, want {want}");
            }
            // Odd lengths (the 16-lane tail) and non-finite values.
            let mut odd = vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.0, -9.0];
            run(&mut odd, &[], crate::Activation::GeluErf);
            assert!(odd[0].is_nan() && odd[1] == f32::INFINITY);
            assert!(odd[2] == 0.0 || odd[2].is_nan(), "gelu(-inf) = {}", odd[2]);
            assert!((odd[3] - 0.841_344_7).abs() < 1e-6 && odd[4] == 0.0, "{odd:?}");
        }
    }

    #[test]
    fn norms_and_softmax_match_plain_math() {
        let width = 37;
        let x: Vec<f32> = (0..width * 3)
            .map(|i| ((i * 7919) % 97) as f32 / 13.0 - 3.0)
            .collect();
        let r: Vec<f32> = (0..width * 3).map(|i| ((i * 31) % 11) as f32 / 7.0).collect();
        let gamma: Vec<f32> = (0..width).map(|i| 0.5 + i as f32 / width as f32).collect();
        let beta: Vec<f32> = (0..width).map(|i| i as f32 / 100.0).collect();
        let mut out = vec![0.0; x.len()];
        add_layer_norm(&x, &r, &gamma, &beta, 1e-12, &mut out);
        for row in 0..3 {
            let s: Vec<f64> = (0..width)
                .map(|i| (x[row * width + i] + r[row * width + i]) as f64)
                .collect();
            let mean = s.iter().sum::<f64>() / width as f64;
            let var = s.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / width as f64;
            for i in 0..width {
                let want = (s[i] - mean) / (var + 1e-12).sqrt() * gamma[i] as f64 + beta[i] as f64;
                assert!((out[row * width + i] as f64 - want).abs() < 1e-5);
            }
        }
        let mut sum = r.clone();
        add_rms_norm(&x, &mut sum, &gamma, 1e-5, &mut out);
        for row in 0..3 {
            let s: Vec<f64> = (0..width)
                .map(|i| (x[row * width + i] + r[row * width + i]) as f64)
                .collect();
            let rms = (s.iter().map(|v| v * v).sum::<f64>() / width as f64 + 1e-5).sqrt();
            for i in 0..width {
                assert!((sum[row * width + i] as f64 - s[i]).abs() < 1e-6);
                assert!((out[row * width + i] as f64 - s[i] / rms * gamma[i] as f64).abs() < 1e-5);
            }
        }
        // In the vectorized part of a row and in its tail.
        for at in [1, 20] {
            let mut nan_row: Vec<f32> = (0..21).map(|i| i as f32 / 7.0).collect();
            nan_row[at] = f32::NAN;
            scaled_softmax(&mut nan_row, 1.0);
            assert!(
                nan_row.iter().all(|v| v.is_nan()),
                "NaN must propagate: {nan_row:?}"
            );
        }
        let mut row: Vec<f32> = x[..width].to_vec();
        scaled_softmax(&mut row, 0.5);
        let m = x[..width].iter().fold(f64::MIN, |m, v| m.max(*v as f64 * 0.5));
        let z: f64 = x[..width].iter().map(|v| (*v as f64 * 0.5 - m).exp()).sum();
        for (p, v) in row.iter().zip(&x[..width]) {
            assert!((*p as f64 - (*v as f64 * 0.5 - m).exp() / z).abs() < 1e-6);
        }
    }

    #[test]
    fn swiglu_gates_each_half() {
        let x = [1.0f32, -2.0, 3.0, 4.0, 0.5, 0.0, 2.0, 2.0];
        let mut out = [0.0f32; 4];
        swiglu(&x, &mut out, 2);
        let s = |g: f32| g / (1.0 + (-g).exp());
        let want = [s(1.0) * 3.0, s(-2.0) * 4.0, s(0.5) * 2.0, s(0.0) * 2.0];
        for (a, b) in out.iter().zip(want) {
            assert!((a - b).abs() < 1e-6);
        }
    }
}

#[cfg(test)]
mod timing {
    #[test]
    #[ignore]
    fn gelu_speed() {
        let mut x: Vec<f32> = (0..(1 << 24)).map(|i| (i % 1000) as f32 / 200.0 - 2.5).collect();
        for act in [
            crate::Activation::None,
            crate::Activation::GeluErf,
            crate::Activation::Silu,
        ] {
            let t = std::time::Instant::now();
            super::bias_activation(&mut x, &[], act);
            eprintln!(
                "{act:?}: {:.2} ns/element",
                t.elapsed().as_secs_f64() * 1e9 / x.len() as f64
            );
            let t = std::time::Instant::now();
            for block in x.chunks_exact_mut(1 << 14) {
                for _ in 0..4 {
                    super::bias_activation(block, &[], act);
                }
            }
            eprintln!(
                "{act:?} in L1: {:.2} ns/element",
                t.elapsed().as_secs_f64() * 1e9 / x.len() as f64 / 4.0
            );
        }
        let t = std::time::Instant::now();
        for row in x.chunks_exact_mut(128) {
            super::scaled_softmax(row, 0.1);
        }
        eprintln!(
            "softmax rows of 128: {:.2} ns/element",
            t.elapsed().as_secs_f64() * 1e9 / x.len() as f64
        );
    }
}
