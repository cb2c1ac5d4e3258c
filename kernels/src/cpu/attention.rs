//! Attention as one kernel per (sequence, head): it reads Q, K and V where the fused projection
//! wrote them (strided, no transpose copies), runs the two products with gemm on those strides,
//! and writes the context in its final `[token][head * head_dim]` layout.

use super::math::scaled_softmax;
use super::SharedOut;
use crate::decoder::{KvCache, KvStore, Rope};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// `dst[m×n] = a[m×k] · b`, with `b` read as `k×n` through its strides.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    a: *const f32,
    a_rs: usize,
    b: *const f32,
    b_rs: usize,
    b_cs: usize,
) {
    gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        false,
        a,
        1,
        a_rs as isize,
        b,
        b_cs as isize,
        b_rs as isize,
        0.0,
        1.0,
        false,
        false,
        false,
        Parallelism::None,
    );
}

/// Bidirectional attention of an encoder over a packed batch: `qkv` is `[tokens][3][heads][head_dim]`
/// (a stacked Q/K/V projection) holding the sequences back to back, `lengths[b]` tokens each,
/// with no padding; a token sees the tokens of its own sequence only. `out` is
/// `[tokens][heads * head_dim]`.
pub(crate) fn encoder(qkv: &[f32], lengths: &[usize], heads: usize, head_dim: usize, out: &mut [f32]) {
    encoder_on(qkv, lengths, heads, head_dim, out, super::gemm::available());
}

/// [`encoder`] on the AVX-512 kernel (`avx512`: only where the CPU has it) or the portable one.
fn encoder_on(qkv: &[f32], lengths: &[usize], heads: usize, head_dim: usize, out: &mut [f32], avx512: bool) {
    let width = heads * head_dim;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let starts: Vec<usize> = lengths
        .iter()
        .scan(0, |at, &n| {
            let start = *at;
            *at += n;
            Some(start)
        })
        .collect();
    let out_ptr = SharedOut::new(out);
    (0..lengths.len() * heads).into_par_iter().for_each(|task| {
        let (b, h) = (task / heads, task % heads);
        let (n, start) = (lengths[b], starts[b]);
        let base = start * 3 * width + h * head_dim;
        let (q, k, v) = (&qkv[base..], &qkv[base + width..], &qkv[base + 2 * width..]);
        let out_ptr = &out_ptr;
        #[cfg(target_arch = "x86_64")]
        if avx512 {
            // SAFETY: as below, and the CPU has AVX-512F (the caller's word).
            unsafe {
                let dst = out_ptr.ptr().add(start * width + h * head_dim);
                head_avx512(q, k, v, 3 * width, n, head_dim, scale, dst, width);
            }
            return;
        }
        let _ = avx512;
        let mut scores = vec![0.0f32; n * n];
        // SAFETY: every read stays inside qkv (the n tokens of this sequence); every write goes
        // to this task's own (sequence, head) block of `out`.
        unsafe {
            product(
                n,
                n,
                head_dim,
                scores.as_mut_ptr(),
                n,
                q.as_ptr(),
                3 * width,
                k.as_ptr(),
                1,
                3 * width,
            );
            scores
                .chunks_exact_mut(n)
                .for_each(|row| scaled_softmax(row, scale));
            let dst = out_ptr.ptr().add(start * width + h * head_dim);
            product(
                n,
                head_dim,
                n,
                dst,
                width,
                scores.as_ptr(),
                n,
                v.as_ptr(),
                3 * width,
                1,
            );
        }
    });
}

/// One (sequence, head) of [`encoder`] on the packed GEMM's AVX-512 micro-kernel: K is packed
/// into panels of 48 keys and V into panels of 32 columns (in a per-thread scratch), then
/// `scores = Q·Kᵀ` a tile of 8 queries at a time, the softmax of each row, and `dst = P·V`.
/// `q`, `k` and `v` start at the head's first value, rows `stride` apart; `dst` rows are
/// `dst_stride` apart.
///
/// # Safety
/// The CPU has AVX-512F; `q`, `k`, `v` hold `n` rows of `d` values `stride` apart, and `dst`
/// has `n` writable rows of `d` cells that no other task writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn head_avx512(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    stride: usize,
    n: usize,
    d: usize,
    scale: f32,
    dst: *mut f32,
    dst_stride: usize,
) {
    use super::gemm::{micro_tile, MR};
    const KEYS: usize = 48;
    const COLS: usize = 32;
    thread_local! {
        static SCRATCH: std::cell::RefCell<[Vec<f32>; 3]> = const { std::cell::RefCell::new([Vec::new(), Vec::new(), Vec::new()]) };
    }
    SCRATCH.with_borrow_mut(|[keys, values, scores]| {
        // Kᵀ in panels: panel j, depth p, lane l holds K[48j + l][p] (zero past n).
        let key_panels = n.div_ceil(KEYS);
        keys.clear();
        keys.resize(key_panels * KEYS * d, 0.0);
        for key in 0..n {
            let (panel, lane) = (key / KEYS, key % KEYS);
            for (p, &x) in k[key * stride..key * stride + d].iter().enumerate() {
                keys[(panel * d + p) * KEYS + lane] = x;
            }
        }
        // V in panels of 32 columns: panel j, key p holds V[p][32j..32j + 32] (zero past d).
        let value_panels = d.div_ceil(COLS);
        values.clear();
        values.resize(value_panels * n * COLS, 0.0);
        for key in 0..n {
            let row = &v[key * stride..key * stride + d];
            for (panel, chunk) in row.chunks(COLS).enumerate() {
                let at = (panel * n + key) * COLS;
                values[at..at + chunk.len()].copy_from_slice(chunk);
            }
        }
        scores.clear();
        scores.resize(n * n, 0.0);
        for r in (0..n).step_by(MR) {
            let rows = MR.min(n - r);
            let a: [*const f32; MR] = std::array::from_fn(|i| q.as_ptr().add((r + i).min(n - 1) * stride));
            for j in 0..key_panels {
                let c = scores.as_mut_ptr().add(r * n + j * KEYS);
                let b = keys.as_ptr().add(j * KEYS * d);
                micro_tile::<3>(d, &a[..rows], b, c, n, KEYS.min(n - j * KEYS));
            }
        }
        scores
            .chunks_exact_mut(n)
            .for_each(|row| scaled_softmax(row, scale));
        for r in (0..n).step_by(MR) {
            let rows = MR.min(n - r);
            let a: [*const f32; MR] = std::array::from_fn(|i| scores.as_ptr().add((r + i).min(n - 1) * n));
            for j in 0..value_panels {
                let c = dst.add(r * dst_stride + j * COLS);
                let b = values.as_ptr().add(j * n * COLS);
                micro_tile::<2>(n, &a[..rows], b, c, dst_stride, COLS.min(d - j * COLS));
            }
        }
    });
}

/// Causal self-attention of a decoder for `t` new tokens after the `cache.len()` it holds:
/// `qkv` is `[t][(heads + 2 * kv_heads) * head_dim]`. Rotates Q and K, appends K and V to the
/// layer's cache in place, and writes `[t][heads * head_dim]` to `out`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn causal(
    qkv: &[f32],
    t: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    rope: &Rope,
    cache: &mut KvCache,
    layer: usize,
    out: &mut [f32],
) {
    let (q_width, kv_width) = (heads * head_dim, kv_heads * head_dim);
    let row = q_width + 2 * kv_width;
    let pos = cache.len();
    let mut q = Vec::with_capacity(t * q_width);
    let KvStore::Host { keys, values } = &mut cache.store else {
        unreachable!("Cpu::causal_attention checks that the cache is in host memory")
    };
    let (keys, values) = (&mut keys[layer], &mut values[layer]);
    for (i, token) in qkv.chunks_exact(row).enumerate() {
        let start = q.len();
        q.extend_from_slice(&token[..q_width]);
        q[start..]
            .chunks_exact_mut(head_dim)
            .for_each(|head| rope.rotate(head, pos + i));
        let start = keys.len();
        keys.extend_from_slice(&token[q_width..q_width + kv_width]);
        keys[start..]
            .chunks_exact_mut(head_dim)
            .for_each(|head| rope.rotate(head, pos + i));
        values.extend_from_slice(&token[q_width + kv_width..]);
    }
    let (keys, values) = (&keys[..], &values[..]);
    let total = pos + t;
    let group = heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    if t == 1 {
        // Decode: one query row per head, where gemm's own set-up costs more than the product.
        let head = |(h, out): (usize, &mut [f32])| {
            let g = h / group;
            let mut scores = vec![0.0f32; total];
            let q = &q[h * head_dim..(h + 1) * head_dim];
            let (k, v) = (&keys[g * head_dim..], &values[g * head_dim..]);
            decode_head(q, k, v, kv_width, scale, &mut scores, out);
        };
        match total * heads < 1 << 15 {
            true => out.chunks_exact_mut(head_dim).enumerate().for_each(head),
            false => out.par_chunks_exact_mut(head_dim).enumerate().for_each(head),
        }
        return;
    }
    let out_ptr = SharedOut::new(out);
    let head_task = |h: usize| {
        let g = h / group;
        let (k, v) = (&keys[g * head_dim..], &values[g * head_dim..]);
        let mut scores = vec![0.0f32; t * total];
        let out_ptr = &out_ptr;
        // SAFETY: reads stay inside q and the cache (total tokens); each head writes only its own
        // columns of `out`.
        unsafe {
            product(
                t,
                total,
                head_dim,
                scores.as_mut_ptr(),
                total,
                q.as_ptr().add(h * head_dim),
                q_width,
                k.as_ptr(),
                1,
                kv_width,
            );
            for (i, row) in scores.chunks_exact_mut(total).enumerate() {
                let (visible, future) = row.split_at_mut(pos + i + 1);
                scaled_softmax(visible, scale);
                future.fill(0.0);
            }
            product(
                t,
                head_dim,
                total,
                out_ptr.ptr().add(h * head_dim),
                q_width,
                scores.as_ptr(),
                total,
                v.as_ptr(),
                kv_width,
                1,
            );
        }
    };
    if t * total * heads < 1 << 15 {
        (0..heads).for_each(head_task);
    } else {
        (0..heads).into_par_iter().for_each(head_task);
    }
}

multiversion! {
    /// One query row of one head against `scores.len()` cached tokens: `k` and `v` hold the
    /// head's keys and values every `stride` values. Writes the context row to `out`. Plain loops
    /// the compiler vectorizes; 16 running sums for each dot product.
    fn decode_head(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        stride: usize,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let hd = q.len();
        for (j, score) in scores.iter_mut().enumerate() {
            let key = &k[j * stride..j * stride + hd];
            let mut lanes = [0.0f32; 16];
            let (qs, ks) = (q.chunks_exact(16), key.chunks_exact(16));
            let tail: f32 = qs.remainder().iter().zip(ks.remainder()).map(|(a, b)| a * b).sum();
            for (a, b) in qs.zip(ks) {
                for l in 0..16 {
                    lanes[l] += a[l] * b[l];
                }
            }
            *score = lanes.iter().sum::<f32>() + tail;
        }
        scaled_softmax(scores, scale);
        out.fill(0.0);
        for (j, &p) in scores.iter().enumerate() {
            for (o, &x) in out.iter_mut().zip(&v[j * stride..j * stride + hd]) {
                *o += p * x;
            }
        }
    }
}

/// Plain loops over the same layouts, for tests.
#[cfg(test)]
pub(crate) mod reference {
    pub(crate) fn attend(q: &[f32], k: &[Vec<f32>], v: &[Vec<f32>], scale: f32) -> Vec<f32> {
        let s: Vec<f64> = k
            .iter()
            .map(|k| {
                q.iter()
                    .zip(k)
                    .map(|(a, b)| (*a as f64) * (*b as f64))
                    .sum::<f64>()
                    * scale as f64
            })
            .collect();
        let m = s.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
        (0..q.len())
            .map(|d| {
                s.iter()
                    .zip(v)
                    .map(|(x, v)| (x - m).exp() / z * v[d] as f64)
                    .sum::<f64>() as f32
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed) * 2654435761usize % 1000) as f32 / 500.0) - 1.0)
            .collect()
    }

    /// Both kernels (AVX-512 where the CPU has it, and the portable one) against plain f64
    /// loops: head widths under, at and over a 32-column panel, sequences over several 48-key
    /// panels and partial 8-query tiles, within 1e-5.
    #[test]
    fn packed_encoder_attention_matches_plain_loops_per_sequence() {
        let lengths = [13, 5, 1, 50, 97];
        let tokens: usize = lengths.iter().sum();
        for (heads, hd) in [(3, 8), (2, 32), (2, 40), (1, 64)] {
            let width = heads * hd;
            let qkv = values(tokens * 3 * width, 1);
            let at = |i: usize, part: usize, h: usize| &qkv[(i * 3 + part) * width + h * hd..][..hd];
            for avx512 in [false, crate::cpu::gemm::available()] {
                let mut out = vec![f32::NAN; tokens * width];
                encoder_on(&qkv, &lengths, heads, hd, &mut out, avx512);
                let mut start = 0;
                for &n in &lengths {
                    for h in 0..heads {
                        let k: Vec<Vec<f32>> = (start..start + n).map(|j| at(j, 1, h).to_vec()).collect();
                        let v: Vec<Vec<f32>> = (start..start + n).map(|j| at(j, 2, h).to_vec()).collect();
                        for i in start..start + n {
                            let got = &out[i * width + h * hd..][..hd];
                            let want = reference::attend(at(i, 0, h), &k, &v, 1.0 / (hd as f32).sqrt());
                            for (a, w) in got.iter().zip(&want) {
                                assert!(
                                    (a - w).abs() < 1e-5,
                                    "hd {hd} avx512 {avx512} token {i} head {h}: {a} vs {w}"
                                );
                            }
                        }
                    }
                    start += n;
                }
                // A sequence's result does not depend on its neighbours.
                let mut alone = vec![0.0; 5 * width];
                encoder_on(
                    &qkv[13 * 3 * width..18 * 3 * width],
                    &[5],
                    heads,
                    hd,
                    &mut alone,
                    avx512,
                );
                assert_eq!(&alone[..], &out[13 * width..18 * width]);
            }
        }
    }

    #[test]
    fn causal_attention_in_steps_equals_one_prompt_and_plain_loops() {
        let (heads, kv_heads, hd, t) = (6, 2, 8, 9);
        let row = (heads + 2 * kv_heads) * hd;
        let qkv = values(t * row, 3);
        let rope = Rope::new(hd, 10000.0, 64);
        let mut whole = KvCache::new(1, kv_heads, hd);
        let mut out_whole = vec![0.0; t * heads * hd];
        causal(&qkv, t, heads, kv_heads, hd, &rope, &mut whole, 0, &mut out_whole);
        whole.commit(t);
        // The same tokens as a 4-token prompt then one at a time.
        let mut stepped = KvCache::new(1, kv_heads, hd);
        let mut out_steps = vec![0.0; t * heads * hd];
        let mut at = 0;
        for n in [4, 1, 1, 1, 1, 1] {
            causal(
                &qkv[at * row..(at + n) * row],
                n,
                heads,
                kv_heads,
                hd,
                &rope,
                &mut stepped,
                0,
                &mut out_steps[at * heads * hd..(at + n) * heads * hd],
            );
            stepped.commit(n);
            at += n;
        }
        for (a, b) in out_whole.iter().zip(&out_steps) {
            assert!((a - b).abs() < 1e-5);
        }
        // Plain loops for the last token of head 5 (kv head 2 in a group of 3).
        let (h, g, i) = (5, 1, t - 1);
        let mut q = qkv[i * row + h * hd..][..hd].to_vec();
        rope.rotate(&mut q, i);
        let KvStore::Host { keys, .. } = &whole.store else {
            unreachable!("KvCache::new is in host memory")
        };
        let k: Vec<Vec<f32>> = (0..t)
            .map(|j| keys[0][j * kv_heads * hd + g * hd..][..hd].to_vec())
            .collect();
        let v: Vec<Vec<f32>> = (0..t)
            .map(|j| qkv[j * row + (heads + kv_heads) * hd + g * hd..][..hd].to_vec())
            .collect();
        let want = reference::attend(&q, &k, &v, 1.0 / (hd as f32).sqrt());
        for (a, w) in out_whole[i * heads * hd + h * hd..][..hd].iter().zip(&want) {
            assert!((a - w).abs() < 1e-5);
        }
    }
}
