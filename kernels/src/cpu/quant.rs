//! Block-quantized weights (GGML's Q4_1 and Q8_0) times f32 activations.
//!
//! Activations are quantized once per row to 8 bits per value (blocks of 32 with an f32 scale,
//! as llama.cpp's Q8_1 but with f32 scales), then every weight row is a chain of integer dot
//! products: AVX2 `maddubs` where the CPU has it (detected at run time), plain Rust elsewhere.
//! Weight rows are split across the shared thread pool in chunks, and each chunk is reused for
//! every token of a prompt (the multi-token path of prefill) while it is in L1.
//!
//! Several tokens at once (prefill, batched decode) go to an AVX-512 VNNI tile where the CPU has
//! it: up to 4 rows x 8 tokens, two tokens per register, `vpdpbusd` for the integer sums. It does
//! the very same f32 operations per (row, token) as the AVX2 one-token tile, lane for lane, so a
//! token's result has the same bits alone or batched.

use half::f16;

/// Values per quantization block.
pub const BLOCK: usize = 32;

/// Tokens of a tile, and rows of a two-token tile: 2 x 2 keeps four accumulators in AVX2's 16
/// registers. A one-token tile (decode) takes `TILE_ROWS` rows: four independent sums.
const TILE: usize = 2;
const TILE_ROWS: usize = 4;

/// The block formats with a fast kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantKind {
    /// 4-bit values with a scale and a minimum per block: `w = d * q + m`.
    Q4_1,
    /// 8-bit values with a scale per block: `w = d * q`.
    Q8_0,
}

/// A Q4_1 block in GGML's own 20-byte layout: decode streams every weight once per token, so the
/// bytes read are the cost, and f16 scales keep them at 5 bits per weight.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(crate) struct BlockQ4_1 {
    /// Scale and minimum, f16 bits.
    dm: [u16; 2],
    /// Values 0..16 in the low nibbles, 16..32 in the high nibbles.
    qs: [u8; 16],
}

/// A Q8_0 block in GGML's own 34-byte layout.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(crate) struct BlockQ8_0 {
    /// Scale, f16 bits.
    d: u16,
    qs: [i8; 32],
}

impl BlockQ4_1 {
    fn d(&self) -> f32 {
        f16::from_bits(self.dm[0]).to_f32()
    }
    fn m(&self) -> f32 {
        f16::from_bits(self.dm[1]).to_f32()
    }
}

impl BlockQ8_0 {
    fn d(&self) -> f32 {
        f16::from_bits(self.d).to_f32()
    }
}

/// A block of quantized activations: `x ≈ d * q`, and `s = d * sum(q)` for Q4_1's offsets.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(crate) struct BlockQ8 {
    d: f32,
    s: f32,
    qs: [i8; 32],
}

const ZERO_Q8: BlockQ8 = BlockQ8 {
    d: 0.0,
    s: 0.0,
    qs: [0; 32],
};

#[derive(Debug, Clone)]
pub(crate) enum Blocks {
    Q4_1(Vec<BlockQ4_1>),
    Q8_0(Vec<BlockQ8_0>),
}

/// A `[rows, cols]` weight matrix in a block-quantized format, packed once at load.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    rows: usize,
    cols: usize,
    blocks: Blocks,
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

impl QuantMatrix {
    /// Packs GGML-format bytes (`rows * cols / 32` blocks, row-major) of the given kind.
    /// Returns `None` if the byte count or the width does not fit the format.
    pub fn from_ggml(kind: QuantKind, rows: usize, cols: usize, bytes: &[u8]) -> Option<Self> {
        if !cols.is_multiple_of(BLOCK) {
            return None;
        }
        let n = rows * cols / BLOCK;
        let blocks = match kind {
            QuantKind::Q4_1 => {
                if bytes.len() != n * 20 {
                    return None;
                }
                Blocks::Q4_1(
                    bytes
                        .chunks_exact(20)
                        .map(|b| {
                            let mut qs = [0u8; 16];
                            qs.copy_from_slice(&b[4..20]);
                            BlockQ4_1 {
                                dm: [u16_at(b, 0), u16_at(b, 2)],
                                qs,
                            }
                        })
                        .collect(),
                )
            }
            QuantKind::Q8_0 => {
                if bytes.len() != n * 34 {
                    return None;
                }
                Blocks::Q8_0(
                    bytes
                        .chunks_exact(34)
                        .map(|b| {
                            let mut qs = [0i8; 32];
                            for (q, &byte) in qs.iter_mut().zip(&b[2..34]) {
                                *q = byte as i8;
                            }
                            BlockQ8_0 { d: u16_at(b, 0), qs }
                        })
                        .collect(),
                )
            }
        };
        Some(Self { rows, cols, blocks })
    }

    /// The matrices' rows one after another (one product instead of several), or `None` if
    /// they differ in format or width.
    pub fn stack(parts: &[&QuantMatrix]) -> Option<QuantMatrix> {
        let first = parts.first()?;
        let mut rows = 0;
        let mut blocks = match first.blocks {
            Blocks::Q4_1(_) => Blocks::Q4_1(Vec::new()),
            Blocks::Q8_0(_) => Blocks::Q8_0(Vec::new()),
        };
        for part in parts {
            if part.cols != first.cols {
                return None;
            }
            rows += part.rows;
            match (&mut blocks, &part.blocks) {
                (Blocks::Q4_1(all), Blocks::Q4_1(b)) => all.extend_from_slice(b),
                (Blocks::Q8_0(all), Blocks::Q8_0(b)) => all.extend_from_slice(b),
                _ => return None,
            }
        }
        Some(QuantMatrix {
            rows,
            cols: first.cols,
            blocks,
        })
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The block format.
    pub fn kind(&self) -> QuantKind {
        match self.blocks {
            Blocks::Q4_1(_) => QuantKind::Q4_1,
            Blocks::Q8_0(_) => QuantKind::Q8_0,
        }
    }

    /// The layout the wgpu shaders read: per block the scale and the minimum (zero for Q8_0) as
    /// f32, and the values as little-endian words (Q4_1: 4 words of nibbles in GGML's order;
    /// Q8_0: 8 words of signed bytes).
    pub(crate) fn gpu_layout(&self) -> (Vec<f32>, Vec<u32>) {
        let words = |bytes: &[u8]| -> Vec<u32> {
            bytes
                .chunks_exact(4)
                .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
                .collect()
        };
        match &self.blocks {
            Blocks::Q4_1(blocks) => (
                blocks.iter().flat_map(|b| [b.d(), b.m()]).collect(),
                blocks.iter().flat_map(|b| words(&b.qs)).collect(),
            ),
            Blocks::Q8_0(blocks) => (
                blocks.iter().flat_map(|b| [b.d(), 0.0]).collect(),
                blocks
                    .iter()
                    .flat_map(|b| words(&b.qs.map(|q| q as u8)))
                    .collect(),
            ),
        }
    }

    /// Every weight as f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        match &self.blocks {
            Blocks::Q4_1(blocks) => {
                for b in blocks {
                    let (d, m) = (b.d(), b.m());
                    out.extend(b.qs.iter().map(|q| d * (q & 0xF) as f32 + m));
                    out.extend(b.qs.iter().map(|q| d * (q >> 4) as f32 + m));
                }
            }
            Blocks::Q8_0(blocks) => {
                for b in blocks {
                    let d = b.d();
                    out.extend(b.qs.iter().map(|&q| d * q as f32));
                }
            }
        }
        out
    }

    /// `y[t, rows] = x[t, cols] · Wᵀ`: `x` holds `t` rows of `cols` values.
    pub fn matmul(&self, x: &[f32], y: &mut [f32]) {
        let t = x.len() / self.cols;
        assert_eq!(x.len(), t * self.cols, "x is not whole rows");
        assert_eq!(y.len(), t * self.rows, "y does not fit the output");
        let nb = self.cols / BLOCK;
        let mut activations = vec![ZERO_Q8; t * nb];
        for (row, blocks) in x.chunks_exact(self.cols).zip(activations.chunks_exact_mut(nb)) {
            quantize_row(row, blocks);
        }
        let tile = tile_kernel(self.kind());
        #[cfg(target_arch = "x86_64")]
        let wide = (t >= 2 && avx512::available())
            .then(|| avx512::Activations::new(&activations, t, nb, self.kind()));
        // Chunks of rows small enough to stay in L2 while every token passes over them, and
        // enough of them to keep every thread busy.
        let chunk = (16usize)
            .max(self.rows / (rayon::current_num_threads() * 2))
            .min(self.rows)
            .max(1);
        let out = super::SharedOut::new(y);
        let work = |c: usize| {
            let rows = c * chunk..((c + 1) * chunk).min(self.rows);
            // `n` rows from `r` x `tokens` tokens from `ti` of a tile's `[row][token]`.
            fn write<const W: usize>(
                out: &super::SharedOut,
                y_rows: usize,
                (r, ti): (usize, usize),
                values: &[[f32; W]],
                n: usize,
                tokens: usize,
            ) {
                for (i, row) in values.iter().enumerate().take(n) {
                    for (j, value) in row.iter().enumerate().take(tokens) {
                        // SAFETY: each (token, row) cell is written by exactly one chunk, and `y`
                        // outlives the parallel loop.
                        unsafe { out.write((ti + j) * y_rows + r + i, *value) };
                    }
                }
            }
            // Tiles of several tokens: each weight block is unpacked once for all of them and
            // each activation block loaded once for several rows (prompts, batched decode). Every
            // (row, token) sum is accumulated in the same order whatever the tile's shape, so a
            // sequence's result does not depend on what it is batched with.
            let mut ti = 0;
            while ti < t {
                #[cfg(target_arch = "x86_64")]
                if let Some(wide) = &wide {
                    // 8, 4 or 2 tokens (pairs from an even token), then a last odd one alone.
                    let tokens = [8, 4, 2].into_iter().find(|&n| n <= t - ti);
                    if let Some(tokens) = tokens {
                        for r in rows.clone().step_by(avx512::ROWS) {
                            let n = (rows.end - r).min(avx512::ROWS);
                            // SAFETY: `wide` exists only where the CPU has what the tile needs.
                            let values = unsafe { wide.tile(&self.blocks, r * nb, ti, n, tokens) };
                            write(&out, self.rows, (r, ti), &values, n, tokens);
                        }
                        ti += tokens;
                        continue;
                    }
                }
                let tokens = (t - ti).min(TILE);
                let act = &activations[ti * nb..(ti + tokens) * nb];
                let step = if tokens == 1 { TILE_ROWS } else { TILE };
                for r in rows.clone().step_by(step) {
                    let n = (rows.end - r).min(step);
                    let values = tile(&self.blocks, r * nb, nb, act, n, tokens);
                    write(&out, self.rows, (r, ti), &values, n, tokens);
                }
                ti += tokens;
            }
        };
        super::for_each_task(self.rows.div_ceil(chunk), t * self.rows * self.cols, work);
    }
}

multiversion! {
    /// Quantizes one row of activations to 8-bit blocks (vectorized where the CPU allows: the
    /// rounding is to nearest even, one instruction). A NaN or infinite value makes its block's
    /// scale NaN, so that it reaches the output instead of vanishing in the rounding.
    fn quantize_row(x: &[f32], out: &mut [BlockQ8]) {
        for (values, block) in x.chunks_exact(BLOCK).zip(out.iter_mut()) {
            // Eight running maxima in vector lanes, not one chain of 32 dependent steps: the same
            // maximum (exact in any order; a NaN makes the scale NaN below whatever it gives).
            let mut lanes = [0.0f32; 8];
            for eight in values.chunks_exact(8) {
                for (m, v) in lanes.iter_mut().zip(eight) {
                    let a = v.abs();
                    *m = if a > *m { a } else { *m };
                }
            }
            let amax = lanes.iter().fold(0.0f32, |m, &v| if v > m { v } else { m });
            let finite = values.iter().fold(true, |ok, v| ok & v.is_finite());
            let d = if finite { amax / 127.0 } else { f32::NAN };
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, v) in block.qs.iter_mut().zip(values) {
                *q = (v * id).round_ties_even() as i8;
                sum += *q as i32;
            }
            block.d = d;
            block.s = d * sum as f32;
        }
    }
}

/// Up to `TILE` rows times up to `TILE` tokens: `(blocks, first block of the first row, blocks
/// per row, the tokens' blocks one after another, rows, tokens)` -> `[row][token]`.
type TileFn = fn(&Blocks, usize, usize, &[BlockQ8], usize, usize) -> [[f32; TILE]; TILE_ROWS];

fn tile_kernel(kind: QuantKind) -> TileFn {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
    {
        // SAFETY (both closures): the CPU has AVX2, FMA and F16C (checked above).
        return match kind {
            QuantKind::Q4_1 => |b, at, nb, a, rows, tokens| match b {
                Blocks::Q4_1(w) => unsafe { avx2::tile(avx2::Q4_1, w, at, nb, a, rows, tokens) },
                Blocks::Q8_0(_) => [[f32::NAN; TILE]; TILE_ROWS],
            },
            QuantKind::Q8_0 => |b, at, nb, a, rows, tokens| match b {
                Blocks::Q8_0(w) => unsafe { avx2::tile(avx2::Q8_0, w, at, nb, a, rows, tokens) },
                Blocks::Q4_1(_) => [[f32::NAN; TILE]; TILE_ROWS],
            },
        };
    }
    let _ = kind;
    reference::tile
}

/// Plain Rust: the portable fallback, and the reference the SIMD kernels are tested against.
pub(crate) mod reference {
    use super::*;

    pub(crate) fn dot(b: &Blocks, at: usize, a: &[BlockQ8]) -> f32 {
        match b {
            Blocks::Q4_1(w) => dot_q4_1(&w[at..at + a.len()], a),
            Blocks::Q8_0(w) => dot_q8_0(&w[at..at + a.len()], a),
        }
    }

    pub(crate) fn tile(
        b: &Blocks,
        at: usize,
        nb: usize,
        a: &[BlockQ8],
        rows: usize,
        tokens: usize,
    ) -> [[f32; TILE]; TILE_ROWS] {
        let mut out = [[0.0; TILE]; TILE_ROWS];
        for (r, row) in out.iter_mut().enumerate().take(rows) {
            for (t, value) in row.iter_mut().enumerate().take(tokens) {
                *value = dot(b, at + r * nb, &a[t * nb..(t + 1) * nb]);
            }
        }
        out
    }

    pub(crate) fn dot_q4_1(w: &[BlockQ4_1], a: &[BlockQ8]) -> f32 {
        w.iter()
            .zip(a)
            .map(|(w, a)| {
                let mut sum = 0i32;
                for j in 0..16 {
                    sum += (w.qs[j] & 0xF) as i32 * a.qs[j] as i32;
                    sum += (w.qs[j] >> 4) as i32 * a.qs[j + 16] as i32;
                }
                w.d() * a.d * sum as f32 + w.m() * a.s
            })
            .sum()
    }

    pub(crate) fn dot_q8_0(w: &[BlockQ8_0], a: &[BlockQ8]) -> f32 {
        w.iter()
            .zip(a)
            .map(|(w, a)| {
                let sum: i32 = w.qs.iter().zip(&a.qs).map(|(&x, &y)| x as i32 * y as i32).sum();
                w.d() * a.d * sum as f32
            })
            .sum()
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BlockQ4_1, BlockQ8, BlockQ8_0, TILE, TILE_ROWS};
    use std::arch::x86_64::*;

    /// A weight block format's inner step, for [`tile`].
    pub(super) trait Format {
        type Block;
        /// A block's values, ready for [`Format::products`] with any number of tokens.
        type Unpacked: Copy;
        /// The block's values, its scale `d` and its minimum `m` (0 for symmetric formats).
        unsafe fn unpack(w: &Self::Block) -> (Self::Unpacked, f32, f32);
        /// The 32 products of the block's values and an activation block, as 8 f32 lanes.
        unsafe fn products(q: Self::Unpacked, x: __m256i) -> __m256;
    }

    pub(super) struct Q4_1Format;
    pub(super) const Q4_1: Q4_1Format = Q4_1Format;
    pub(super) struct Q8_0Format;
    pub(super) const Q8_0: Q8_0Format = Q8_0Format;

    impl Format for Q4_1Format {
        type Block = BlockQ4_1;
        type Unpacked = __m256i;
        #[inline(always)]
        unsafe fn unpack(w: &BlockQ4_1) -> (__m256i, f32, f32) {
            let bytes = _mm_loadu_si128(w.qs.as_ptr() as *const __m128i);
            // Low nibbles are values 0..16, high nibbles 16..32: one 32-lane vector of 0..15.
            let q = _mm256_and_si256(
                _mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes),
                _mm256_set1_epi8(0x0F),
            );
            // d and m side by side: one conversion for both.
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                w.dm.as_ptr() as *const i32
            )));
            (q, _mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_movehdup_ps(dm)))
        }
        #[inline(always)]
        unsafe fn products(q: __m256i, x: __m256i) -> __m256 {
            _mm256_cvtepi32_ps(_mm256_madd_epi16(
                _mm256_maddubs_epi16(q, x),
                _mm256_set1_epi16(1),
            ))
        }
    }

    impl Format for Q8_0Format {
        type Block = BlockQ8_0;
        /// The magnitudes, and the values (for their signs).
        type Unpacked = (__m256i, __m256i);
        #[inline(always)]
        unsafe fn unpack(w: &BlockQ8_0) -> ((__m256i, __m256i), f32, f32) {
            let q = _mm256_loadu_si256(w.qs.as_ptr() as *const __m256i);
            let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(w.d as i32)));
            ((_mm256_sign_epi8(q, q), q), d, 0.0)
        }
        #[inline(always)]
        unsafe fn products((magnitude, q): (__m256i, __m256i), x: __m256i) -> __m256 {
            // maddubs multiplies unsigned by signed: move q's sign onto x.
            let pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(x, q));
            _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// `R` rows x `T` tokens; each (row, token) keeps one accumulator, summed block by block in
    /// order, so every tile shape gives the same bits for the same (row, token).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn fixed<F: Format, const R: usize, const T: usize>(
        w: &[F::Block],
        at: usize,
        nb: usize,
        a: &[BlockQ8],
    ) -> [[f32; TILE]; TILE_ROWS] {
        // Checked once here, so that the loop below indexes without checks.
        assert!(w.len() >= at + R * nb && a.len() >= T * nb);
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        let mut offsets = [[0.0f32; T]; R];
        for b in 0..nb {
            let mut x = [_mm256_setzero_si256(); T];
            for (t, x) in x.iter_mut().enumerate() {
                *x = _mm256_loadu_si256(a.get_unchecked(t * nb + b).qs.as_ptr() as *const __m256i);
            }
            for r in 0..R {
                // Decode streams every weight once: ask for the rows four tiles ahead early (measured
                // on SmolLM2 decode: 55 -> 75-95 tokens/s; one tile ahead gave 74).
                let ahead = w.as_ptr().wrapping_add(at + (r + 4 * R) * nb + b) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(ahead);
                // Each weight block is unpacked once for every token of the tile.
                let (q, d, m) = F::unpack(w.get_unchecked(at + r * nb + b));
                for t in 0..T {
                    let ab = a.get_unchecked(t * nb + b);
                    acc[r][t] = _mm256_fmadd_ps(F::products(q, x[t]), _mm256_set1_ps(d * ab.d), acc[r][t]);
                    offsets[r][t] += m * ab.s;
                }
            }
        }
        let mut out = [[0.0f32; TILE]; TILE_ROWS];
        for r in 0..R {
            for t in 0..T {
                out[r][t] = hsum(acc[r][t]) + offsets[r][t];
            }
        }
        out
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile<F: Format>(
        _: F,
        w: &[F::Block],
        at: usize,
        nb: usize,
        a: &[BlockQ8],
        rows: usize,
        tokens: usize,
    ) -> [[f32; TILE]; TILE_ROWS] {
        match (rows, tokens) {
            (4, 1) => fixed::<F, 4, 1>(w, at, nb, a),
            (3, 1) => fixed::<F, 3, 1>(w, at, nb, a),
            (2, 2) => fixed::<F, 2, 2>(w, at, nb, a),
            (2, 1) => fixed::<F, 2, 1>(w, at, nb, a),
            (1, 2) => fixed::<F, 1, 2>(w, at, nb, a),
            _ => fixed::<F, 1, 1>(w, at, nb, a),
        }
    }
}

/// Several tokens at once with AVX-512 VNNI: a register holds one 32-value block for two
/// tokens, their 4-byte groups alternating, so that one `vpdpbusd` makes both tokens' 8 lane sums,
/// the very integers of the AVX2 kernel's `maddubs` + `madd`. Each is then converted and scaled
/// with the same `fmadd` as there, into the same per-lane accumulator, and summed in the same
/// order at the end: the same bits as the AVX2 one-token tile.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{BlockQ4_1, BlockQ8, BlockQ8_0, Blocks, QuantKind};
    use std::arch::x86_64::*;

    /// Rows of a tile (tokens: up to 8): 4 x 4 token pairs is 16 accumulators of 32 registers.
    pub(super) const ROWS: usize = 4;

    /// Whether the CPU has all the tile is compiled for (AVX2 and FMA too, which every AVX-512
    /// CPU has, but the tile's features name them).
    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }

    /// The activations laid out for the tile, built once per product.
    pub(super) struct Activations {
        /// Per token pair (from token 0) and block: the two tokens' values, 4 bytes of one then
        /// 4 of the other; plus 128 (unsigned) for Q8_0, whose weights are the signed side.
        pairs: Vec<[u8; 64]>,
        /// Per block, every token's `d` then (at `scales.len() / 2`) every token's `s`, so a
        /// tile's tokens are side by side; padded so that 8 can always be loaded.
        scales: Vec<f32>,
        tokens: usize,
        nb: usize,
        kind: QuantKind,
    }

    impl Activations {
        pub(super) fn new(a: &[BlockQ8], tokens: usize, nb: usize, kind: QuantKind) -> Self {
            let bias = if kind == QuantKind::Q8_0 { 0x80 } else { 0 };
            let mut pairs = vec![[0u8; 64]; tokens / 2 * nb];
            for (p, pair) in pairs.chunks_exact_mut(nb).enumerate() {
                for (b, out) in pair.iter_mut().enumerate() {
                    let (x, y) = (&a[2 * p * nb + b].qs, &a[(2 * p + 1) * nb + b].qs);
                    for (i, group) in out.chunks_exact_mut(8).enumerate() {
                        for j in 0..4 {
                            group[j] = x[4 * i + j] as u8 ^ bias;
                            group[4 + j] = y[4 * i + j] as u8 ^ bias;
                        }
                    }
                }
            }
            let half = tokens * nb + 8;
            let mut scales = vec![0.0; 2 * half];
            for (t, blocks) in a.chunks_exact(nb).enumerate() {
                for (b, block) in blocks.iter().enumerate() {
                    scales[b * tokens + t] = block.d;
                    scales[half + b * tokens + t] = block.s;
                }
            }
            Self {
                pairs,
                scales,
                tokens,
                nb,
                kind,
            }
        }

        /// `rows` (up to [`ROWS`]) rows from block `at` times `tokens` (2, 4 or 8) tokens from
        /// token `ti` (even) -> `[row][token]`.
        ///
        /// # Safety
        /// The CPU has what [`available`] checks, and `blocks` is the matrix these activations
        /// were laid out for.
        pub(super) unsafe fn tile(
            &self,
            blocks: &Blocks,
            at: usize,
            ti: usize,
            rows: usize,
            tokens: usize,
        ) -> [[f32; 8]; ROWS] {
            match (blocks, self.kind) {
                (Blocks::Q4_1(w), QuantKind::Q4_1) => self.shape::<Q4_1>(w, at, ti, rows, tokens),
                (Blocks::Q8_0(w), QuantKind::Q8_0) => self.shape::<Q8_0>(w, at, ti, rows, tokens),
                _ => [[f32::NAN; 8]; ROWS],
            }
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
        unsafe fn shape<F: Format>(
            &self,
            w: &[F::Block],
            at: usize,
            ti: usize,
            rows: usize,
            tokens: usize,
        ) -> [[f32; 8]; ROWS] {
            match (rows, tokens) {
                (4, 8) => self.fixed::<F, 4, 4>(w, at, ti),
                (4, 4) => self.fixed::<F, 4, 2>(w, at, ti),
                (4, _) => self.fixed::<F, 4, 1>(w, at, ti),
                (3, 8) => self.fixed::<F, 3, 4>(w, at, ti),
                (3, 4) => self.fixed::<F, 3, 2>(w, at, ti),
                (3, _) => self.fixed::<F, 3, 1>(w, at, ti),
                (2, 8) => self.fixed::<F, 2, 4>(w, at, ti),
                (2, 4) => self.fixed::<F, 2, 2>(w, at, ti),
                (2, _) => self.fixed::<F, 2, 1>(w, at, ti),
                (_, 8) => self.fixed::<F, 1, 4>(w, at, ti),
                (_, 4) => self.fixed::<F, 1, 2>(w, at, ti),
                _ => self.fixed::<F, 1, 1>(w, at, ti),
            }
        }

        /// `R` rows x `P` token pairs.
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
        #[inline]
        unsafe fn fixed<F: Format, const R: usize, const P: usize>(
            &self,
            w: &[F::Block],
            at: usize,
            ti: usize,
        ) -> [[f32; 8]; ROWS] {
            let nb = self.nb;
            let half = self.scales.len() / 2;
            // Checked once here, so that the loop below indexes without checks.
            assert!(w.len() >= at + R * nb && (ti / 2 + P) * nb <= self.pairs.len());
            assert!(half >= self.tokens * nb + 8 && ti + 2 * P <= self.tokens);
            let mut acc = [[_mm512_setzero_ps(); P]; R];
            let mut offsets = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                let mut x = [_mm512_setzero_si512(); P];
                for (p, x) in x.iter_mut().enumerate() {
                    let pair = self.pairs.get_unchecked((ti / 2 + p) * nb + b);
                    *x = _mm512_loadu_si512(pair.as_ptr() as *const _);
                }
                let d = self.scales.as_ptr().add(b * self.tokens + ti);
                let s = _mm256_loadu_ps(self.scales.as_ptr().add(half + b * self.tokens + ti));
                // The token pairs' activation scales, alternating as their values do.
                let mut dx = [_mm512_setzero_ps(); P];
                for (p, dx) in dx.iter_mut().enumerate() {
                    let pair = std::ptr::read_unaligned(d.add(2 * p) as *const f64);
                    *dx = _mm512_castpd_ps(_mm512_set1_pd(pair));
                }
                for r in 0..R {
                    // As the AVX2 tile: ask early for the rows four tiles ahead (the first tokens
                    // of a chunk stream its weights from memory).
                    let ahead = w.as_ptr().wrapping_add(at + (r + 4 * R) * nb + b) as *const i8;
                    _mm_prefetch::<_MM_HINT_T0>(ahead);
                    let (q, dw, m) = F::unpack(w.get_unchecked(at + r * nb + b));
                    // `offsets += m * ab.s` and `d * ab.d` of the AVX2 tile, for every token.
                    offsets[r] = _mm256_add_ps(offsets[r], _mm256_mul_ps(_mm256_set1_ps(m), s));
                    let dw = _mm512_set1_ps(dw);
                    for p in 0..P {
                        let sums = _mm512_cvtepi32_ps(F::dot(q, x[p]));
                        acc[r][p] = _mm512_fmadd_ps(sums, _mm512_mul_ps(dw, dx[p]), acc[r][p]);
                    }
                }
            }
            // The AVX2 kernel's horizontal sum, in its order: halves, then quarters, then
            // pairs; each step adds both tokens' lanes at once.
            let mut out = [[0.0f32; 8]; ROWS];
            for r in 0..R {
                let mut sums = [0.0f32; 8];
                for (p, &v) in acc[r].iter().enumerate() {
                    let high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
                    let h = _mm256_add_ps(_mm512_castps512_ps256(v), high);
                    let q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
                    let pair = _mm_add_ps(q, _mm_movehl_ps(q, q));
                    _mm_storel_pd(sums.as_mut_ptr().add(2 * p) as *mut f64, _mm_castps_pd(pair));
                }
                let total = _mm256_add_ps(_mm256_loadu_ps(sums.as_ptr()), offsets[r]);
                _mm256_storeu_ps(out[r].as_mut_ptr(), total);
            }
            out
        }
    }

    /// A weight block format's inner step, for [`Activations::fixed`].
    trait Format {
        type Block;
        type Unpacked: Copy;
        /// The block's values with each 4-byte group twice (for the two tokens), its scale `d`
        /// and its minimum `m` (0 for symmetric formats).
        unsafe fn unpack(w: &Self::Block) -> (Self::Unpacked, f32, f32);
        /// Each lane's sum of 4 products of the block's values and a token pair's.
        unsafe fn dot(q: Self::Unpacked, x: __m512i) -> __m512i;
    }

    struct Q4_1;
    struct Q8_0;

    impl Format for Q4_1 {
        type Block = BlockQ4_1;
        type Unpacked = __m512i;
        #[inline(always)]
        unsafe fn unpack(w: &BlockQ4_1) -> (__m512i, f32, f32) {
            // Values 0..16 are the low nibbles, 16..32 the high ones: groups 0..4 twice from the
            // bytes as they are, groups 4..8 twice from the bytes shifted.
            let bytes = _mm512_castsi128_si512(_mm_loadu_si128(w.qs.as_ptr() as *const __m128i));
            let twice = _mm512_permutexvar_epi32(
                _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 0, 0, 1, 1, 2, 2, 3, 3),
                bytes,
            );
            let shift = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4);
            let q = _mm512_and_si512(_mm512_srlv_epi32(twice, shift), _mm512_set1_epi8(0x0F));
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                w.dm.as_ptr() as *const i32
            )));
            (q, _mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_movehdup_ps(dm)))
        }
        #[inline(always)]
        unsafe fn dot(q: __m512i, x: __m512i) -> __m512i {
            // Weights 0..15 are the unsigned side.
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, x)
        }
    }

    impl Format for Q8_0 {
        type Block = BlockQ8_0;
        /// The values, and minus 128 times each lane's sum of them.
        type Unpacked = (__m512i, __m512i);
        #[inline(always)]
        unsafe fn unpack(w: &BlockQ8_0) -> ((__m512i, __m512i), f32, f32) {
            let bytes = _mm512_castsi256_si512(_mm256_loadu_si256(w.qs.as_ptr() as *const __m256i));
            let q = _mm512_permutexvar_epi32(
                _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7),
                bytes,
            );
            // Activations come as x + 128 (unsigned): start each sum at -128 * sum(q), exact.
            let bias = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(-128), q);
            let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(w.d as i32)));
            ((q, _mm512_sub_epi32(_mm512_setzero_si512(), bias)), d, 0.0)
        }
        #[inline(always)]
        unsafe fn dot((q, start): (__m512i, __m512i), x: __m512i) -> __m512i {
            _mm512_dpbusd_epi32(start, x, q)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [-1, 1) (no RNG dependency in the kernels crate).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn ggml_q4_1(rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let v = values(rows * cols, seed);
        let mut bytes = Vec::new();
        for block in v.chunks_exact(BLOCK) {
            let (lo, hi) = block
                .iter()
                .fold((f32::MAX, f32::MIN), |(l, h), &x| (l.min(x), h.max(x)));
            let d = (hi - lo) / 15.0;
            bytes.extend(f16::from_f32(d).to_le_bytes());
            bytes.extend(f16::from_f32(lo).to_le_bytes());
            for j in 0..16 {
                let q = |x: f32| (((x - lo) / d).round() as u8).min(15);
                bytes.push(q(block[j]) | (q(block[j + 16]) << 4));
            }
        }
        bytes
    }

    fn ggml_q8_0(rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let v = values(rows * cols, seed);
        let mut bytes = Vec::new();
        for block in v.chunks_exact(BLOCK) {
            let d = block.iter().fold(0.0f32, |m, x| m.max(x.abs())) / 127.0;
            bytes.extend(f16::from_f32(d).to_le_bytes());
            bytes.extend(block.iter().map(|x| (x / d).round() as i8 as u8));
        }
        bytes
    }

    /// The product computed in f64 from the dequantized weights and the unquantized activations.
    fn exact(m: &QuantMatrix, x: &[f32]) -> Vec<f32> {
        let w = m.dequantize();
        let (rows, cols) = m.dims();
        x.chunks_exact(cols)
            .flat_map(|xr| {
                (0..rows)
                    .map(|r| {
                        w[r * cols..(r + 1) * cols]
                            .iter()
                            .zip(xr)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>() as f32
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn simd_kernels_equal_the_reference_and_the_exact_product() {
        for (kind, bytes) in [
            (QuantKind::Q4_1, ggml_q4_1 as fn(usize, usize, u64) -> Vec<u8>),
            (QuantKind::Q8_0, ggml_q8_0),
        ] {
            // Token counts that take every tile: 8, 4 and 2 tokens, and a last odd one.
            for (rows, cols, t) in [
                (1, 32, 1),
                (7, 64, 3),
                (33, 96, 1),
                (130, 576, 5),
                (300, 1536, 2),
                (45, 160, 15),
            ] {
                let m = QuantMatrix::from_ggml(kind, rows, cols, &bytes(rows, cols, rows as u64)).unwrap();
                let x = values(t * cols, 99);
                let mut y = vec![0.0; t * rows];
                m.matmul(&x, &mut y);
                // Against the plain-Rust kernel on the same quantized activations: the same
                // integer sums, so only the f32 accumulation order differs.
                let nb = cols / BLOCK;
                let mut act = vec![ZERO_Q8; t * nb];
                for (xr, a) in x.chunks_exact(cols).zip(act.chunks_exact_mut(nb)) {
                    quantize_row(xr, a);
                }
                let reference: Vec<f32> = act
                    .chunks_exact(nb)
                    .flat_map(|a| (0..rows).map(move |r| (r, a)))
                    .map(|(r, a)| match &m.blocks {
                        Blocks::Q4_1(w) => reference::dot_q4_1(&w[r * nb..(r + 1) * nb], a),
                        Blocks::Q8_0(w) => reference::dot_q8_0(&w[r * nb..(r + 1) * nb], a),
                    })
                    .collect();
                for (a, b) in y.iter().zip(&reference) {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "{kind:?} {rows}x{cols}: {a} vs {b}"
                    );
                }
                // Against the exact product: 8-bit activations cost at most ~1% of the row's scale.
                let exact = exact(&m, &x);
                let scale = (cols as f32).sqrt() * 0.6;
                for (a, b) in y.iter().zip(&exact) {
                    assert!(
                        (a - b).abs() <= 0.01 * scale,
                        "{kind:?} {rows}x{cols}: {a} vs exact {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_token_gets_the_same_bits_alone_or_in_a_batch() {
        for (kind, bytes) in [
            (QuantKind::Q4_1, ggml_q4_1 as fn(usize, usize, u64) -> Vec<u8>),
            (QuantKind::Q8_0, ggml_q8_0),
        ] {
            let (rows, cols) = (37, 128);
            let m = QuantMatrix::from_ggml(kind, rows, cols, &bytes(rows, cols, 7)).unwrap();
            for t in [2, 5, 15] {
                let x = values(t * cols, 11);
                let mut batched = vec![0.0; t * rows];
                m.matmul(&x, &mut batched);
                for (token, expected) in x.chunks_exact(cols).zip(batched.chunks_exact(rows)) {
                    let mut alone = vec![0.0; rows];
                    m.matmul(token, &mut alone);
                    assert_eq!(alone, expected, "{kind:?}, {t} tokens");
                }
            }
        }
    }

    #[test]
    fn extreme_values_are_summed_exactly() {
        // Every nibble and byte value, -128 included, against activations at +-127: any
        // saturation or overflow in the integer sums would show.
        let (rows, cols, t) = (9, 256, 11);
        let random = |n: usize| {
            values(n, 5)
                .iter()
                .map(|v| ((v + 1.0) * 128.0) as u8)
                .collect::<Vec<_>>()
        };
        let scale = f16::from_f32(0.01).to_le_bytes();
        let q4: Vec<u8> = random(rows * cols / 2)
            .chunks_exact(16)
            .flat_map(|q| [&scale[..], &scale[..], q].concat())
            .collect();
        let q8: Vec<u8> = random(rows * cols)
            .chunks_exact(32)
            .flat_map(|q| [&scale[..], q].concat())
            .collect();
        let x: Vec<f32> = values(t * cols, 3).iter().map(|v| v.signum()).collect();
        for (kind, bytes) in [(QuantKind::Q4_1, q4), (QuantKind::Q8_0, q8)] {
            let m = QuantMatrix::from_ggml(kind, rows, cols, &bytes).unwrap();
            let mut y = vec![0.0; t * rows];
            m.matmul(&x, &mut y);
            for (a, b) in y.iter().zip(exact(&m, &x)) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{kind:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert!(QuantMatrix::from_ggml(QuantKind::Q4_1, 2, 33, &[0; 40]).is_none());
        assert!(QuantMatrix::from_ggml(QuantKind::Q8_0, 2, 32, &[0; 67]).is_none());
    }

    #[test]
    fn zeros_give_zeros_and_non_finite_activations_give_nan() {
        let m = QuantMatrix::from_ggml(QuantKind::Q8_0, 4, 64, &ggml_q8_0(4, 64, 1)).unwrap();
        let mut y = vec![1.0; 4];
        m.matmul(&[0.0; 64], &mut y);
        assert!(y.iter().all(|v| *v == 0.0));
        for bad in [f32::NAN, f32::INFINITY] {
            let mut x = vec![0.5; 64];
            x[40] = bad;
            m.matmul(&x, &mut y);
            assert!(y.iter().all(|v| v.is_nan()), "{bad} must not vanish: {y:?}");
        }
    }
}
