//! Keel's own f32 GEMM for `y[m×n] = x[m×k] · W[n×k]ᵀ` (PyTorch's `Linear` layout), for CPUs with
//! AVX-512F, where the gemm crate (AVX2 on stable Rust) leaves half of each FMA unit idle.
//!
//! The weight is packed once into panels of [`NR`] output columns, `k`-major, so that the
//! micro-kernel reads one contiguous, aligned stream of B per panel. Each task (a block of [`MC`]
//! rows by a chunk of panels) walks `k` in blocks of [`KC`] and runs the `MR×NR` micro-kernel over
//! every (panel, row tile): B's `KC×NR` block stays in L1 while the rows of `x` come from L2. The
//! rows of `x` are read in place, 8 row pointers broadcast from memory (measured: packing them
//! into tiles first cost 10% on the 384-wide products). Partial tiles at the right edge are stored
//! with AVX-512 masks; bias and activation are applied to each tile right after its last store,
//! while it is still in L1.

use super::alloc::Pages;
use super::{for_each_task, math, SharedOut};
use crate::Activation;
use std::sync::atomic::{AtomicBool, Ordering};

/// Rows per micro-tile: 8 rows × 3 vectors = 24 accumulators of the 32 zmm registers; the MiniLM
/// and SmolLM2 token counts are multiples of 8.
pub(super) const MR: usize = 8;
/// Columns per micro-tile and per packed panel (3 vectors of 16); every MiniLM and SmolLM2 width
/// (384, 1152, 1536, 576, 6144) is a multiple of 48.
const NR: usize = 48;
/// Depth per block: B's `KC×NR` block (24 KiB) stays in the 48 KiB L1 across a task's tiles.
const KC: usize = 128;
/// Rows per task: its `MC×KC` block of `x` (32 KiB) stays in L2 across the panels.
const MC: usize = 64;

/// An f32 weight `[n, k]` packed for the micro-kernel: panel `j` holds columns `j*NR..` of `Wᵀ`,
/// `NR` values per `k` (zero past `n`). Page-aligned, so a row of B is exactly 3 aligned cache
/// lines.
pub(crate) struct PackedF32 {
    n: usize,
    k: usize,
    data: Pages<f32>,
}

impl std::fmt::Debug for PackedF32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedF32({}x{})", self.n, self.k)
    }
}

/// Which f32 GEMM the CPU backend uses for dense [`crate::Linear`] layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenseGemm {
    /// Keel's packed AVX-512 kernel where the CPU has AVX-512F, the gemm crate elsewhere (the
    /// default).
    Auto,
    /// Always the gemm crate, weights unpacked (the path before Keel had its own GEMM).
    GemmCrate,
}

static GEMM_CRATE: AtomicBool = AtomicBool::new(false);

/// Picks the f32 GEMM for the whole process: a switch for benchmarks that compare the two paths
/// in one run (a packed weight stays cached either way).
pub fn set_dense_gemm(choice: DenseGemm) {
    GEMM_CRATE.store(choice == DenseGemm::GemmCrate, Ordering::Relaxed);
}

/// Whether dense layers go to [`PackedF32`]: the CPU has AVX-512F (elsewhere the gemm crate is
/// the faster choice) and [`set_dense_gemm`] has not asked for the gemm crate.
pub(crate) fn use_packed() -> bool {
    available() && !GEMM_CRATE.load(Ordering::Relaxed)
}

/// Whether this CPU runs the AVX-512 micro-kernel.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Where one micro-tile goes in `y`.
#[derive(Clone, Copy)]
struct Tile {
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    /// Add to what `c` holds (a later `k` block) instead of overwriting it.
    accumulate: bool,
    /// The weight block that comes next, and which of its `k` steps this tile prefetches
    /// (spread over the tiles of the current block, so that its memory reads overlap their
    /// arithmetic); null when nothing comes next. Only the AVX-512 kernel prefetches.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    prefetch: *const f32,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    prefetch_steps: (usize, usize),
}

impl PackedF32 {
    /// Packs `w` (`n` rows of `k`, row-major).
    pub(crate) fn pack(w: &[f32], n: usize, k: usize) -> crate::Result<Self> {
        assert_eq!(w.len(), n * k, "weight of {} values for {n}x{k}", w.len());
        let panels = n.div_ceil(NR);
        let mut data = Pages::zeroed(panels * k * NR)?;
        for (col, row) in w.chunks_exact(k.max(1)).enumerate().take(n) {
            let (panel, lane) = (col / NR, col % NR);
            let base = panel * k * NR + lane;
            for (p, &v) in row.iter().enumerate() {
                data[base + p * NR] = v;
            }
        }
        Ok(Self { n, k, data })
    }

    /// `act(x · Wᵀ + bias)` for `x` of `m` rows of `k` (`bias` empty or `n` long), on the shared
    /// pool, in a new `m×n` vector.
    pub(crate) fn matmul(&self, x: &[f32], m: usize, bias: &[f32], act: Activation) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        assert!(x.len() == m * k && (bias.is_empty() || bias.len() == n));
        if m == 0 || n == 0 || k == 0 {
            let mut y = vec![0f32; m * n];
            math::bias_activation(&mut y, bias, act);
            return y;
        }
        // Not zeroed (up to 3% of the MiniLM forward): the first `k` block stores every cell.
        let mut y = Vec::with_capacity(m * n);
        let out = SharedOut(y.as_mut_ptr());
        self.run(x, m, bias, act, &out);
        // SAFETY: `run` wrote all m×n cells (every row tile of every panel, first k block).
        unsafe { y.set_len(m * n) };
        y
    }

    /// [`Self::matmul`] into `out` (`m×n` values, written once each before any is read).
    fn run(&self, x: &[f32], m: usize, bias: &[f32], act: Activation, out: &SharedOut) {
        let (n, k) = (self.n, self.k);
        let panels = n.div_ceil(NR);
        let row_blocks = m.div_ceil(MC);
        // Enough tasks for the pool to balance, 16 per thread, splitting the columns when the
        // rows alone do not give them (few tokens), down to a panel a task but no less than
        // ~2^18 multiply-adds. (At 128 tokens the 384-wide products get a panel a task: 192 ->
        // 226 GFLOP/s on 2 threads, where 4 tasks a thread left one thread idle at the end.)
        let want = 16 * rayon::current_num_threads();
        let chunks = want.div_ceil(row_blocks).clamp(1, panels);
        let min_panels = (1usize << 18).div_ceil(m.min(MC) * NR * k);
        let per_chunk = panels.div_ceil(chunks).max(min_panels).min(panels);
        let chunks = panels.div_ceil(per_chunk);
        let avx512 = available();
        for_each_task(row_blocks * chunks, m * n * k, |task| {
            let (block, chunk) = (task / chunks, task % chunks);
            let rows = block * MC..m.min((block + 1) * MC);
            let cols = chunk * per_chunk..panels.min((chunk + 1) * per_chunk);
            // SAFETY: tasks own disjoint (row block, panel chunk) rectangles of `y`, and `avx512`
            // was detected on this CPU.
            unsafe { self.block(x, rows, cols, bias, act, out, avx512) };
        });
    }

    /// One task: rows `rows` of `y` by panels `panels`.
    ///
    /// # Safety
    /// No other task writes this rectangle of `out` (which holds `m×n` values), and `avx512` is
    /// only true where the CPU has AVX-512F.
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(
        &self,
        x: &[f32],
        rows: std::ops::Range<usize>,
        panels: std::ops::Range<usize>,
        bias: &[f32],
        act: Activation,
        out: &SharedOut,
        avx512: bool,
    ) {
        let (n, k) = (self.n, self.k);
        let tiles = rows.len().div_ceil(MR);
        let b = self.data.as_ptr();
        let epilogue = !bias.is_empty() || act != Activation::None;
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            let last = pc + kc == k;
            for j in panels.clone() {
                let bp = b.add((j * k + pc) * NR);
                let (next, next_kc) = if j + 1 < panels.end {
                    (b.add(((j + 1) * k + pc) * NR), kc)
                } else if !last {
                    (b.add((panels.start * k + pc + kc) * NR), KC.min(k - pc - kc))
                } else {
                    (std::ptr::null(), 0)
                };
                let col = j * NR;
                let cols = NR.min(n - col);
                for t in 0..tiles {
                    let r = rows.start + t * MR;
                    let tile = Tile {
                        c: out.ptr().add(r * n + col),
                        ldc: n,
                        rows: MR.min(rows.end - r),
                        cols,
                        accumulate: pc > 0,
                        prefetch: next,
                        prefetch_steps: (t * next_kc / tiles, (t + 1) * next_kc / tiles),
                    };
                    // The tile's rows of x, read in place; rows past the end repeat the last row
                    // (computed, never stored).
                    let ap: [*const f32; MR] =
                        std::array::from_fn(|i| x.as_ptr().add((r + i).min(rows.end - 1) * k + pc));
                    #[cfg(target_arch = "x86_64")]
                    if avx512 {
                        tile_avx512::<3>(kc, ap, bp, tile);
                    } else {
                        kernel_plain(kc, ap, bp, tile);
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    {
                        let _ = avx512;
                        kernel_plain(kc, ap, bp, tile);
                    }
                    if last && epilogue {
                        let bias = if bias.is_empty() {
                            bias
                        } else {
                            &bias[col..col + cols]
                        };
                        for i in 0..tile.rows {
                            let row = std::slice::from_raw_parts_mut(tile.c.add(i * n), cols);
                            #[cfg(target_arch = "x86_64")]
                            if avx512 {
                                finish_avx512(row, bias, act);
                                continue;
                            }
                            finish(row, bias, act);
                        }
                    }
                }
            }
        }
    }
}

/// `row = act(row + bias)` (`bias` may be empty): the row kernels' own functions, so a value gets
/// the same bits as from `math::bias_activation` (on AVX-512, see [`finish_avx512`]).
#[inline(always)]
fn finish(row: &mut [f32], bias: &[f32], act: Activation) {
    if !bias.is_empty() {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
    match act {
        Activation::None => {}
        Activation::GeluErf => row.iter_mut().for_each(|v| *v = math::gelu(*v)),
        Activation::Silu => row.iter_mut().for_each(|v| *v = math::silu(*v)),
    }
}

/// [`finish`] compiled for AVX-512: 16 lanes, a tile row in 3 vectors; GELU is the vector one
/// that `math::bias_activation` also uses on this CPU.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn finish_avx512(row: &mut [f32], bias: &[f32], act: Activation) {
    if act == Activation::GeluErf {
        math::bias_gelu_avx512(row, bias)
    } else {
        finish(row, bias, act)
    }
}

/// The `R×(16V)` micro-kernel (`R` up to `MR`, `V` vectors of 16 columns, [`NR`] = 3 vectors
/// for the weight panels): `kc` rank-1 updates of `V·R` zmm accumulators (one value of each of
/// the `R` rows of x broadcast, `V` vectors of B), then masked stores of the valid rows and
/// columns.
///
/// # Safety
/// The CPU has AVX-512F; each of `a` holds `kc` values, `b` `kc×16V`, and `tile` describes
/// valid, writable cells (its prefetch range empty or inside a block of `kc×16V` values).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_avx512<const R: usize, const V: usize>(
    kc: usize,
    a: [*const f32; MR],
    b: *const f32,
    tile: Tile,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    for p in 0..kc {
        let bp = b.add(p * 16 * V);
        if (tile.prefetch_steps.0..tile.prefetch_steps.1).contains(&p) {
            let next = tile.prefetch.add(p * 16 * V).cast::<i8>();
            for line in 0..V {
                _mm_prefetch::<_MM_HINT_T0>(next.add(64 * line));
            }
        }
        let bv: [__m512; V] = std::array::from_fn(|j| _mm512_loadu_ps(bp.add(16 * j)));
        for (acc, a) in acc.iter_mut().zip(a) {
            let x = _mm512_set1_ps(*a.add(p));
            for (acc, &bv) in acc.iter_mut().zip(&bv) {
                *acc = _mm512_fmadd_ps(x, bv, *acc);
            }
        }
    }
    let masks: [__mmask16; V] = std::array::from_fn(|j| {
        let valid = tile.cols.saturating_sub(16 * j).min(16);
        ((1u32 << valid) - 1) as __mmask16
    });
    for (i, acc) in acc.iter().enumerate() {
        if i < tile.rows {
            let row = tile.c.add(i * tile.ldc);
            for (j, &v) in acc.iter().enumerate() {
                let v = if tile.accumulate {
                    _mm512_add_ps(v, _mm512_maskz_loadu_ps(masks[j], row.add(16 * j)))
                } else {
                    v
                };
                _mm512_mask_storeu_ps(row.add(16 * j), masks[j], v);
            }
        }
    }
}

/// Dispatches a tile of `tile.rows` rows to the kernel that computes no more rows than needed
/// (short tiles: one token, the last rows).
///
/// # Safety
/// As for [`kernel_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512<const V: usize>(kc: usize, a: [*const f32; MR], b: *const f32, tile: Tile) {
    match tile.rows {
        1 => kernel_avx512::<1, V>(kc, a, b, tile),
        2 => kernel_avx512::<2, V>(kc, a, b, tile),
        3 | 4 => kernel_avx512::<4, V>(kc, a, b, tile),
        _ => kernel_avx512::<MR, V>(kc, a, b, tile),
    }
}

/// `c[i][j] = Σ_p a[i][p] · b[p][j]` for the `rows` (up to [`MR`]) rows of `a` (read where they
/// lie, `kc` values each) and `cols` (up to `16V`) columns, with `b` packed as `kc` runs of `16V`
/// values; `c` rows are `ldc` apart. The micro-kernel of the packed GEMM, for attention's
/// per-head products.
///
/// # Safety
/// The CPU has AVX-512F; `a` has `rows` valid pointers to `kc` values, `b` holds `kc×16V`
/// values, and `c` has `rows` writable rows of `cols` cells, `ldc` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn micro_tile<const V: usize>(
    kc: usize,
    a: &[*const f32],
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    debug_assert!(!a.is_empty() && a.len() <= MR && cols <= 16 * V);
    let rows = a.len();
    // Rows past the end repeat the last one (computed, never stored).
    let ap: [*const f32; MR] = std::array::from_fn(|i| a[i.min(rows - 1)]);
    let tile = Tile {
        c,
        ldc,
        rows,
        cols,
        accumulate: false,
        prefetch: std::ptr::null(),
        prefetch_steps: (0, 0),
    };
    tile_avx512::<V>(kc, ap, b, tile);
}

/// The same tile in plain Rust (CPUs without AVX-512 only reach it from tests).
///
/// # Safety
/// As for [`kernel_avx512`], less the CPU feature.
unsafe fn kernel_plain(kc: usize, a: [*const f32; MR], b: *const f32, tile: Tile) {
    let mut acc = [[0f32; NR]; MR];
    for p in 0..kc {
        let bp = std::slice::from_raw_parts(b.add(p * NR), NR);
        for (acc, a) in acc.iter_mut().zip(a) {
            let x = *a.add(p);
            for (acc, &bv) in acc.iter_mut().zip(bp) {
                *acc += x * bv;
            }
        }
    }
    for (i, acc) in acc.iter().enumerate().take(tile.rows) {
        let row = std::slice::from_raw_parts_mut(tile.c.add(i * tile.ldc), tile.cols);
        for (c, &v) in row.iter_mut().zip(acc) {
            *c = if tile.accumulate { *c + v } else { v };
        }
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

    /// Plain `x · wᵀ + bias` in f64, then the activation (from the reference math).
    fn reference(x: &[f32], w: &[f32], bias: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for r in 0..m {
            for c in 0..n {
                let dot: f64 = (0..k).map(|p| x[r * k + p] as f64 * w[c * k + p] as f64).sum();
                y[r * n + c] = (dot + bias.get(c).copied().unwrap_or(0.0) as f64) as f32;
            }
        }
        y
    }

    use crate::cpu::test_rng::Rng;

    /// Random odd shapes (m in 1..70, n and k not multiples of the tile, k over several `KC`
    /// blocks): every result within 1e-4 of the f64 reference, relative to the sum of the
    /// products' magnitudes (the scale of f32 rounding in a dot product of length k).
    #[test]
    fn matches_the_reference_on_random_shapes() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut shapes = vec![
            (1, 1, 1),
            (2, 50, 130),
            (3, 47, 300),
            (4, 97, 257),
            (5, 48, 64),
            (8, 48, 128),
            (64, 96, 256),
            (65, 49, 129),
        ];
        for _ in 0..40 {
            shapes.push((1 + rng.below(69), 1 + rng.below(200), 1 + rng.below(600)));
        }
        for (m, n, k) in shapes {
            let (x, w, bias) = (values(m * k, 3), values(n * k, 11), values(n, 5));
            let packed = PackedF32::pack(&w, n, k).unwrap();
            let bias = if (m + n) % 2 == 0 { bias } else { Vec::new() };
            let want = reference(&x, &w, &bias, m, n, k);
            let abs = reference(
                &x.iter().map(|v| v.abs()).collect::<Vec<_>>(),
                &w.iter().map(|v| v.abs()).collect::<Vec<_>>(),
                &[],
                m,
                n,
                k,
            );
            for avx512 in [false, available()] {
                let y = if avx512 {
                    packed.matmul(&x, m, &bias, Activation::None)
                } else {
                    let mut y = vec![f32::NAN; m * n];
                    // The portable kernel through the same blocking.
                    let out = SharedOut::new(&mut y);
                    // SAFETY: one task writes all of `y` (m×n), and no AVX-512 is asked for.
                    unsafe {
                        packed.block(&x, 0..m, 0..n.div_ceil(NR), &bias, Activation::None, &out, false)
                    };
                    // NaN would remain in any cell the blocking missed.
                    y
                };
                for (i, ((&got, &want), &scale)) in y.iter().zip(&want).zip(&abs).enumerate() {
                    let tol = 1e-4 * (scale + bias.get(i % n).map_or(0.0, |b| b.abs()) + 1e-6);
                    assert!(
                        (got - want).abs() <= tol,
                        "{m}x{n}x{k} (avx512 {avx512}) at {i}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// The epilogue is the row kernels' own bias + activation, applied once per output.
    #[test]
    fn fuses_bias_and_activation() {
        let (m, n, k) = (13, 100, 200);
        let (x, w, bias) = (values(m * k, 1), values(n * k, 2), values(n, 3));
        let packed = PackedF32::pack(&w, n, k).unwrap();
        for act in [Activation::GeluErf, Activation::Silu] {
            let mut want = packed.matmul(&x, m, &[], Activation::None);
            math::bias_activation(&mut want, &bias, act);
            let got = packed.matmul(&x, m, &bias, act);
            assert_eq!(got, want, "{act:?}");
        }
    }
}
