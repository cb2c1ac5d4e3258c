//! f32 matrices quantized to int8 per output channel, times activations quantized to int8 per
//! row: an encoder's dense layers at a quarter of the bytes and integer-dot speed.
//!
//! `y[t][n] = sx[t] * sw[n] * sum_k qx[t][k] * qw[n][k]`, with the integer sums exact (i32), so a
//! row's result does not depend on the kernel or tile that computed it. Where the CPU has AVX-512
//! VNNI the weight is packed into panels for a register-tiled GEMM ([`packed`]); elsewhere it
//! stays row-major for a dot-product tile: AVX-VNNI's `dpbusd` where the CPU has it, AVX2's
//! `maddubs` + `madd` elsewhere on x86, plain Rust otherwise.

#[cfg(target_arch = "x86_64")]
mod packed;

use crate::Activation;

/// Values per step of the dot-product kernels; rows are zero-padded to a multiple of it.
const STEP: usize = 32;

/// A `[rows, cols]` matrix of int8 values with one f32 scale per row.
#[derive(Debug, Clone)]
pub struct Int8Matrix {
    rows: usize,
    cols: usize,
    scales: Vec<f32>,
    layout: Layout,
}

/// How the values are stored: chosen at quantization for this CPU's kernel.
#[derive(Debug, Clone)]
enum Layout {
    /// Row-major, each row zero-padded to `stride` values (a multiple of [`STEP`]).
    Rows { stride: usize, values: Vec<i8> },
    /// Panels for the AVX-512 VNNI GEMM.
    #[cfg(target_arch = "x86_64")]
    Panels(packed::Panels),
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
        let m = Self::quantize_rows(w, rows, cols);
        #[cfg(target_arch = "x86_64")]
        if packed::available() {
            return m.into_panels();
        }
        m
    }

    /// [`Self::quantize`] in the row-major layout.
    fn quantize_rows(w: &[f32], rows: usize, cols: usize) -> Self {
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
            scales,
            layout: Layout::Rows { stride, values },
        }
    }

    /// The same values packed for the AVX-512 VNNI GEMM (the CPU must have it).
    #[cfg(target_arch = "x86_64")]
    fn into_panels(self) -> Self {
        let Layout::Rows { stride, values } = &self.layout else {
            return self;
        };
        let panels = packed::Panels::pack(values, *stride, &self.scales, self.rows, self.cols);
        Self {
            layout: Layout::Panels(panels),
            ..self
        }
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The int8 value at row `r`, column `c`.
    fn value(&self, r: usize, c: usize) -> i8 {
        match &self.layout {
            Layout::Rows { stride, values } => values[r * stride + c],
            #[cfg(target_arch = "x86_64")]
            Layout::Panels(p) => p.value(r, c),
        }
    }

    /// Every value as f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.rows)
            .flat_map(|r| (0..self.cols).map(move |c| self.value(r, c) as f32 * self.scales[r]))
            .collect()
    }

    /// `y[t, rows] = x[t, cols] · Wᵀ`.
    pub fn matmul(&self, x: &[f32], y: &mut [f32]) {
        let t = self.tokens(x);
        assert_eq!(y.len(), t * self.rows, "y does not fit the output");
        match &self.layout {
            Layout::Rows { stride, values } => self.dot_tiles(values, *stride, x, y),
            #[cfg(target_arch = "x86_64")]
            Layout::Panels(p) => p.matmul(x, t, &[], Activation::None, &super::SharedOut::new(y)),
        }
    }

    /// `act(x · Wᵀ + bias)` in a new vector (`bias` empty or `rows` long): a dense layer.
    pub(crate) fn linear(&self, x: &[f32], bias: &[f32], act: Activation) -> Vec<f32> {
        let t = self.tokens(x);
        assert!(
            bias.is_empty() || bias.len() == self.rows,
            "bias does not fit the output"
        );
        match &self.layout {
            #[cfg(target_arch = "x86_64")]
            Layout::Panels(p) => {
                // Not zeroed: the product writes every cell.
                let mut y = Vec::with_capacity(t * self.rows);
                p.matmul(x, t, bias, act, &super::SharedOut(y.as_mut_ptr()));
                // SAFETY: `matmul` wrote all t×rows cells, bias and activation fused.
                unsafe { y.set_len(t * self.rows) };
                y
            }
            Layout::Rows { .. } => {
                let mut y = vec![0f32; t * self.rows];
                self.matmul(x, &mut y);
                if !bias.is_empty() || act != Activation::None {
                    super::math::bias_activation(&mut y, bias, act);
                }
                y
            }
        }
    }

    /// How many rows of `cols` values `x` holds.
    fn tokens(&self, x: &[f32]) -> usize {
        let t = x.len() / self.cols;
        assert_eq!(x.len(), t * self.cols, "x is not whole rows");
        t
    }

    /// [`Self::matmul`] with the dot-product tiles, on the row-major `values`.
    fn dot_tiles(&self, values: &[i8], stride: usize, x: &[f32], y: &mut [f32]) {
        let t = x.len() / self.cols;
        let mut qx = vec![0i8; t * stride];
        let sx: Vec<f32> = x
            .chunks_exact(self.cols)
            .zip(qx.chunks_exact_mut(stride))
            .map(|(r, q)| quantize_row(r, q))
            .collect();
        let kernel = kernel();
        // Tiles of 4 tokens x 2 weight rows; chunks of weight rows per task, sized for L2.
        let chunk = 64.min(self.rows).max(1);
        let out = super::SharedOut::new(y);
        let work = |c: usize| {
            let rows = c * chunk..((c + 1) * chunk).min(self.rows);
            for ti in (0..t).step_by(4) {
                let tokens = (t - ti).min(4);
                for r in rows.clone().step_by(2) {
                    let n = (rows.end - r).min(2);
                    let sums = kernel(&values[r * stride..], &qx[ti * stride..], stride, n, tokens);
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

    use crate::cpu::test_rng::Rng;

    /// Every layout this CPU runs: row-major and, with AVX-512 VNNI, panels.
    fn layouts(w: &[f32], rows: usize, cols: usize) -> Vec<Int8Matrix> {
        let m = Int8Matrix::quantize_rows(w, rows, cols);
        #[cfg(target_arch = "x86_64")]
        let panels = packed::available().then(|| m.clone().into_panels());
        #[cfg(not(target_arch = "x86_64"))]
        let panels = None;
        std::iter::once(m).chain(panels).collect()
    }

    /// The product from plain integer sums on the values of `m`: `sum * sw * sx` per cell, in
    /// the kernels' order, then bias and activation.
    fn reference(m: &Int8Matrix, x: &[f32], bias: &[f32], act: Activation) -> Vec<f32> {
        let t = x.len() / m.cols;
        let mut qx = vec![0i8; x.len()];
        let sx: Vec<f32> = x
            .chunks_exact(m.cols)
            .zip(qx.chunks_exact_mut(m.cols))
            .map(|(r, q)| quantize_row(r, q))
            .collect();
        let mut y = vec![0f32; t * m.rows];
        for ti in 0..t {
            for r in 0..m.rows {
                let qx = &qx[ti * m.cols..(ti + 1) * m.cols];
                let sum: i32 = qx
                    .iter()
                    .enumerate()
                    .map(|(c, &q)| q as i32 * m.value(r, c) as i32)
                    .sum();
                y[ti * m.rows + r] = sum as f32 * m.scales[r] * sx[ti];
            }
        }
        if !bias.is_empty() || act != Activation::None {
            super::super::math::bias_activation(&mut y, bias, act);
        }
        y
    }

    #[test]
    fn a_matrix_without_rows_gives_an_empty_product() {
        for m in layouts(&[], 0, 8) {
            let mut y = Vec::new();
            m.matmul(&values(16, 1), &mut y);
            assert!(m.linear(&values(16, 1), &[], Activation::GeluErf).is_empty());
        }
    }

    #[test]
    fn every_layout_equals_the_plain_sums_exactly_and_the_product_is_close() {
        for (rows, cols, t) in [(1, 1, 1), (3, 31, 5), (64, 384, 9), (130, 100, 4), (67, 1536, 3)] {
            let w = values(rows * cols, 1);
            let x = values(t * cols, 7);
            let all = layouts(&w, rows, cols);
            let want = reference(&all[0], &x, &[], Activation::None);
            for m in &all {
                assert_eq!(m.dequantize(), all[0].dequantize(), "{rows}x{cols}");
                let mut y = vec![0.0; t * rows];
                m.matmul(&x, &mut y);
                // Exact integer sums: the SIMD and plain kernels agree to the bit.
                assert_eq!(y, want, "{rows}x{cols} t{t} {:?}", m.layout);
            }
            // Close to the f64 product of the unquantized values: 8 bits on each side.
            for ti in 0..t {
                for r in 0..rows {
                    let exact: f64 = (0..cols)
                        .map(|k| w[r * cols + k] as f64 * x[ti * cols + k] as f64)
                        .sum();
                    let bound = 0.02 * (cols as f64).sqrt() + 1e-6;
                    let got = want[ti * rows + r] as f64;
                    assert!((got - exact).abs() <= bound, "{got} vs {exact}");
                }
            }
        }
    }

    /// Random odd shapes (tokens not a multiple of the tile, columns and rows not multiples of
    /// 4, 32, 48 or 64, depths over several `k` blocks), with bias and activation fused: every
    /// layout gives the reference's bits.
    #[test]
    fn every_layout_equals_the_reference_on_random_shapes() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut shapes = vec![
            (1, 1, 1),
            (20, 47, 1),
            (7, 48, 1300),
            (70, 97, 515),
            (130, 200, 99),
        ];
        for _ in 0..30 {
            shapes.push((1 + rng.below(20), 1 + rng.below(200), 1 + rng.below(1300)));
        }
        for (i, (t, rows, cols)) in shapes.into_iter().enumerate() {
            let (w, x, bias) = (
                values(rows * cols, i),
                values(t * cols, 3 * i),
                values(rows, 5 * i),
            );
            let (bias, act) = match i % 3 {
                0 => (Vec::new(), Activation::None),
                1 => (bias, Activation::None),
                _ => (bias, Activation::GeluErf),
            };
            let all = layouts(&w, rows, cols);
            let want = reference(&all[0], &x, &bias, act);
            for m in &all {
                let got = m.linear(&x, &bias, act);
                assert_eq!(got, want, "t{t} {rows}x{cols} {act:?} {:?}", m.layout);
            }
        }
    }

    /// Both x86 dot-product kernels, whichever the dispatcher would pick, against the plain sums.
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

    /// A non-finite activation row gives a NaN row (and leaves the others alone); zeros give zero.
    #[test]
    fn non_finite_activations_give_nan_and_zeros_give_zero() {
        let (rows, cols, t) = (50, 40, 11);
        for m in layouts(&values(rows * cols, 3), rows, cols) {
            let mut y = vec![1.0; rows];
            m.matmul(&[0.0; 40], &mut y);
            assert!(y.iter().all(|v| *v == 0.0));
            let mut x = values(t * cols, 9);
            x[5 * cols + 3] = f32::INFINITY;
            x[9 * cols + 39] = f32::NAN;
            let mut y = vec![0.0; t * rows];
            m.matmul(&x, &mut y);
            for (ti, row) in y.chunks_exact(rows).enumerate() {
                if ti == 5 || ti == 9 {
                    assert!(row.iter().all(|v| v.is_nan()), "row {ti}: {row:?}");
                } else {
                    assert!(row.iter().all(|v| v.is_finite()), "row {ti}: {row:?}");
                }
            }
        }
    }
}
