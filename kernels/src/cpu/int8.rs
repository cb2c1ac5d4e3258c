//! f32 matrices quantized to int8 per output channel, times activations quantized to int8 per
//! row: an encoder's dense layers at a quarter of the bytes and integer-dot speed.
//!
//! `y[t][n] = sx[t] * sw[n] * sum_k qx[t][k] * qw[n][k]`, with the integer sums exact (i32), so a
//! row's result does not depend on the tile that computed it. The inner step is AVX-VNNI's
//! `dpbusd` where the CPU has it, AVX2's `maddubs` + `madd` elsewhere on x86, plain Rust otherwise.

/// Values per step of the kernels; rows are zero-padded to a multiple of it.
const STEP: usize = 32;

/// A `[rows, cols]` matrix of int8 values with one f32 scale per row.
#[derive(Debug, Clone)]
pub struct Int8Matrix {
    rows: usize,
    cols: usize,
    /// Row length in memory: `cols` rounded up to a multiple of 32, zero-padded.
    stride: usize,
    values: Vec<i8>,
    scales: Vec<f32>,
}

/// Quantizes `x` (length <= `out.len()`) symmetrically to [-127, 127]; returns the scale. A
/// non-finite value gives a NaN scale, so that it reaches the output.
fn quantize_row(x: &[f32], out: &mut [i8]) -> f32 {
    let mut scale = [0.0f32];
    quantize_into(x, out, &mut scale);
    scale[0]
}

multiversion! {
    /// The body of [`quantize_row`], vectorized: 8-lane maximum, rounding to nearest even.
    fn quantize_into(x: &[f32], out: &mut [i8], scale: &mut [f32]) {
        let mut lanes = [0.0f32; 8];
        let chunks = x.chunks_exact(8);
        // `x > m` is false for NaN: NaN and infinities are caught by the finiteness check.
        let mut amax = chunks.remainder().iter().fold(0.0f32, |m, v| if v.abs() > m { v.abs() } else { m });
        for c in chunks {
            for i in 0..8 {
                let a = c[i].abs();
                lanes[i] = if a > lanes[i] { a } else { lanes[i] };
            }
        }
        amax = lanes.iter().fold(amax, |m, &v| if v > m { v } else { m });
        let finite = x.iter().fold(true, |ok, v| ok & v.is_finite());
        let s = if finite { amax / 127.0 } else { f32::NAN };
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        for (q, v) in out.iter_mut().zip(x) {
            *q = (v * inv).round_ties_even() as i8;
        }
        out[x.len()..].fill(0);
        scale[0] = s;
    }
}

impl Int8Matrix {
    /// Quantizes a row-major `[rows, cols]` f32 matrix, one scale per row.
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(w.len(), rows * cols, "w is not rows x cols");
        let stride = cols.div_ceil(STEP) * STEP;
        let mut values = vec![0i8; rows * stride];
        let scales = w
            .chunks_exact(cols)
            .zip(values.chunks_exact_mut(stride))
            .map(|(row, q)| quantize_row(row, q))
            .collect();
        Self {
            rows,
            cols,
            stride,
            values,
            scales,
        }
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Every value as f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        self.values
            .chunks_exact(self.stride)
            .zip(&self.scales)
            .flat_map(|(row, s)| row[..self.cols].iter().map(move |&q| q as f32 * s))
            .collect()
    }

    /// `y[t, rows] = x[t, cols] · Wᵀ`.
    pub fn matmul(&self, x: &[f32], y: &mut [f32]) {
        let t = x.len() / self.cols;
        assert_eq!(x.len(), t * self.cols, "x is not whole rows");
        assert_eq!(y.len(), t * self.rows, "y does not fit the output");
        let mut qx = vec![0i8; t * self.stride];
        let sx: Vec<f32> = x
            .chunks_exact(self.cols)
            .zip(qx.chunks_exact_mut(self.stride))
            .map(|(r, q)| quantize_row(r, q))
            .collect();
        let kernel = kernel();
        // Tiles of 4 tokens x 2 weight rows; chunks of weight rows per task, sized for L2.
        let chunk = 64.min(self.rows);
        let out = super::SharedOut::new(y);
        let work = |c: usize| {
            let rows = c * chunk..((c + 1) * chunk).min(self.rows);
            for ti in (0..t).step_by(4) {
                let tokens = (t - ti).min(4);
                for r in rows.clone().step_by(2) {
                    let n = (rows.end - r).min(2);
                    let sums = kernel(
                        &self.values[r * self.stride..],
                        &qx[ti * self.stride..],
                        self.stride,
                        n,
                        tokens,
                    );
                    for (i, row) in sums.iter().enumerate().take(n) {
                        for (j, sum) in row.iter().enumerate().take(tokens) {
                            let value = *sum as f32 * self.scales[r + i] * sx[ti + j];
                            // SAFETY: each (token, row) cell is written by exactly one task, and
                            // `y` outlives the parallel loop.
                            unsafe { out.write((ti + j) * self.rows + r + i, value) };
                        }
                    }
                }
            }
        };
        super::for_each_task(self.rows.div_ceil(chunk), t * self.rows * self.cols, work);
    }
}

/// `(weight rows, tokens, stride, rows <= 2, tokens <= 4)` -> integer sums `[row][token]`.
type Kernel = fn(&[i8], &[i8], usize, usize, usize) -> [[i32; 4]; 2];

fn kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avxvnni") && std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX-VNNI and AVX2 (checked just above).
            return |w, x, stride, rows, tokens| unsafe { x86::tile_vnni(w, x, stride, rows, tokens) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return |w, x, stride, rows, tokens| unsafe { x86::tile_avx2(w, x, stride, rows, tokens) };
        }
    }
    reference::tile
}

/// Plain Rust: the portable fallback and the tests' reference.
mod reference {
    pub(super) fn tile(w: &[i8], x: &[i8], stride: usize, rows: usize, tokens: usize) -> [[i32; 4]; 2] {
        let mut out = [[0; 4]; 2];
        for (r, row) in out.iter_mut().enumerate().take(rows) {
            for (t, sum) in row.iter_mut().enumerate().take(tokens) {
                let (wr, xr) = (&w[r * stride..(r + 1) * stride], &x[t * stride..(t + 1) * stride]);
                *sum = wr.iter().zip(xr).map(|(&a, &b)| a as i32 * b as i32).sum();
            }
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    // The helpers are `inline(always)` without target features of their own, so that they are
    // compiled into each entry point below with that entry point's features (a function with more
    // features than its caller cannot be inlined, and a call per step would spill the tile).

    #[inline(always)]
    unsafe fn hsum(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }

    /// `acc + sum of |w| * (x with w's sign)` in 8 i32 lanes: the products of `w` and `x`.
    #[inline(always)]
    unsafe fn step<const VNNI: bool>(acc: __m256i, magnitude: __m256i, signed: __m256i) -> __m256i {
        if VNNI {
            _mm256_dpbusd_avx_epi32(acc, magnitude, signed)
        } else {
            // |w| <= 127 and |x| <= 127: a pair of products stays within i16 (127 * 127 * 2).
            _mm256_add_epi32(
                acc,
                _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, signed), _mm256_set1_epi16(1)),
            )
        }
    }

    #[inline(always)]
    unsafe fn fixed<const VNNI: bool, const R: usize, const T: usize>(
        w: &[i8],
        x: &[i8],
        stride: usize,
    ) -> [[i32; 4]; 2] {
        let mut acc = [[_mm256_setzero_si256(); T]; R];
        for k in (0..stride).step_by(32) {
            let mut xs = [_mm256_setzero_si256(); T];
            for (t, v) in xs.iter_mut().enumerate() {
                *v = _mm256_loadu_si256(x.as_ptr().add(t * stride + k) as *const __m256i);
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let wv = _mm256_loadu_si256(w.as_ptr().add(r * stride + k) as *const __m256i);
                let magnitude = _mm256_sign_epi8(wv, wv);
                for t in 0..T {
                    acc[t] = step::<VNNI>(acc[t], magnitude, _mm256_sign_epi8(xs[t], wv));
                }
            }
        }
        let mut out = [[0; 4]; 2];
        for r in 0..R {
            for t in 0..T {
                out[r][t] = hsum(acc[r][t]);
            }
        }
        out
    }

    #[inline(always)]
    unsafe fn shapes<const VNNI: bool>(
        w: &[i8],
        x: &[i8],
        stride: usize,
        rows: usize,
        tokens: usize,
    ) -> [[i32; 4]; 2] {
        assert!(w.len() >= rows * stride && x.len() >= tokens * stride && rows <= 2 && tokens <= 4);
        match (rows, tokens) {
            (2, 4) => fixed::<VNNI, 2, 4>(w, x, stride),
            (2, 3) => fixed::<VNNI, 2, 3>(w, x, stride),
            (2, 2) => fixed::<VNNI, 2, 2>(w, x, stride),
            (2, 1) => fixed::<VNNI, 2, 1>(w, x, stride),
            (1, 4) => fixed::<VNNI, 1, 4>(w, x, stride),
            (1, 3) => fixed::<VNNI, 1, 3>(w, x, stride),
            (1, 2) => fixed::<VNNI, 1, 2>(w, x, stride),
            _ => fixed::<VNNI, 1, 1>(w, x, stride),
        }
    }

    /// Reads `rows` weight rows and `tokens` activation rows of `stride` values each.
    #[target_feature(enable = "avx2,avxvnni")]
    pub(super) unsafe fn tile_vnni(
        w: &[i8],
        x: &[i8],
        stride: usize,
        rows: usize,
        tokens: usize,
    ) -> [[i32; 4]; 2] {
        shapes::<true>(w, x, stride, rows, tokens)
    }

    /// [`tile_vnni`] for CPUs with AVX2 only.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn tile_avx2(
        w: &[i8],
        x: &[i8],
        stride: usize,
        rows: usize,
        tokens: usize,
    ) -> [[i32; 4]; 2] {
        shapes::<false>(w, x, stride, rows, tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed) * 2654435761usize % 2001) as f32 / 1000.0) - 1.0)
            .collect()
    }

    #[test]
    fn simd_sums_equal_plain_sums_exactly_and_the_product_is_close() {
        for (rows, cols, t) in [(1, 1, 1), (3, 31, 5), (64, 384, 9), (130, 100, 4), (67, 1536, 3)] {
            let w = values(rows * cols, 1);
            let m = Int8Matrix::quantize(&w, rows, cols);
            let x = values(t * cols, 7);
            let mut y = vec![0.0; t * rows];
            m.matmul(&x, &mut y);
            // Exact integer sums: the SIMD and plain kernels agree to the bit.
            let mut qx = vec![0i8; t * m.stride];
            let sx: Vec<f32> = x
                .chunks_exact(cols)
                .zip(qx.chunks_exact_mut(m.stride))
                .map(|(r, q)| quantize_row(r, q))
                .collect();
            for ti in 0..t {
                for r in 0..rows {
                    let sum =
                        reference::tile(&m.values[r * m.stride..], &qx[ti * m.stride..], m.stride, 1, 1)[0]
                            [0];
                    assert_eq!(
                        y[ti * rows + r],
                        sum as f32 * m.scales[r] * sx[ti],
                        "{rows}x{cols} t{t}"
                    );
                }
            }
            // Close to the f64 product of the unquantized values: 8 bits on each side.
            for ti in 0..t {
                for r in 0..rows {
                    let exact: f64 = (0..cols)
                        .map(|k| w[r * cols + k] as f64 * x[ti * cols + k] as f64)
                        .sum();
                    let bound = 0.02 * (cols as f64).sqrt() + 1e-6;
                    assert!(
                        (y[ti * rows + r] as f64 - exact).abs() <= bound,
                        "{} vs {exact}",
                        y[ti * rows + r]
                    );
                }
            }
        }
    }

    /// Both x86 kernels, whichever the dispatcher would pick, against the plain sums.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_x86_kernel_equals_the_plain_sums() {
        let stride = 96;
        let w: Vec<i8> = (0..2 * stride)
            .map(|i| ((i * 37 % 255) as i32 - 127) as i8)
            .collect();
        let x: Vec<i8> = (0..4 * stride)
            .map(|i| ((i * 91 % 255) as i32 - 127) as i8)
            .collect();
        let want = reference::tile(&w, &x, stride, 2, 4);
        if std::arch::is_x86_feature_detected!("avx2") {
            assert_eq!(unsafe { x86::tile_avx2(&w, &x, stride, 2, 4) }, want);
        }
        if std::arch::is_x86_feature_detected!("avxvnni") {
            assert_eq!(unsafe { x86::tile_vnni(&w, &x, stride, 2, 4) }, want);
        }
    }

    #[test]
    fn non_finite_activations_give_nan_and_zeros_give_zero() {
        let m = Int8Matrix::quantize(&values(4 * 40, 3), 4, 40);
        let mut y = vec![1.0; 4];
        m.matmul(&[0.0; 40], &mut y);
        assert!(y.iter().all(|v| *v == 0.0));
        let mut x = vec![0.5; 40];
        x[3] = f32::INFINITY;
        m.matmul(&x, &mut y);
        assert!(y.iter().all(|v| v.is_nan()));
    }
}
