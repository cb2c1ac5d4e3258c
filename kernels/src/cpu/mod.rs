//! The CPU backend: tensors are candle-core's, and the work is Keel's own kernels (`quant`,
//! `math`, `attention`, and `gemm` for f32 products on AVX-512) except the f32 GEMM elsewhere and
//! inside the decoder's attention, which is the gemm crate's (candle's own). `alloc` keeps the
//! heap from returning activation buffers to the OS between forwards.

#[macro_use]
mod multiversion {
    /// Defines `pub(crate) fn $name` that runs an AVX-512 or an AVX2+FMA build of `$body` where the
    /// CPU has it and the portable build elsewhere. The builds differ only in vector width: the
    /// same operations in the same order, so the same bits.
    macro_rules! multiversion {
        ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
            $(#[$meta])*
            pub(crate) fn $name($($arg: $ty),*) {
                #[inline(always)]
                fn body($($arg: $ty),*) $body
                #[cfg(target_arch = "x86_64")]
                {
                    #[target_feature(enable = "avx512f,avx2,fma")]
                    unsafe fn avx512($($arg: $ty),*) {
                        body($($arg),*)
                    }
                    if std::arch::is_x86_feature_detected!("avx512f")
                        && std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                    {
                        // SAFETY: the CPU has AVX-512F, AVX2 and FMA (checked just above).
                        return unsafe { avx512($($arg),*) };
                    }
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn avx2($($arg: $ty),*) {
                        body($($arg),*)
                    }
                    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                        // SAFETY: the CPU has AVX2 and FMA (checked just above).
                        return unsafe { avx2($($arg),*) };
                    }
                }
                body($($arg),*)
            }
        };
    }
}

pub(crate) mod alloc;
mod attention;
mod backend;
pub(crate) mod gemm;
pub(crate) mod int8;
mod math;
pub(crate) mod quant;

use crate::decoder::{causal_head_dim, KvCache, KvStore, Rope};
use crate::device::packed;
use crate::{Activation, Error, Linear, Result, Weight};
use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Storage, Tensor, D};

/// An output buffer that parallel tasks write disjoint cells of.
pub(crate) struct SharedOut(*mut f32);

// SAFETY: tasks write disjoint cells (each caller states why), and the buffer outlives them.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub(crate) fn new(out: &mut [f32]) -> Self {
        Self(out.as_mut_ptr())
    }

    pub(crate) fn ptr(&self) -> *mut f32 {
        self.0
    }

    /// # Safety
    /// `at` is inside the buffer and no other task writes it.
    pub(crate) unsafe fn write(&self, at: usize, value: f32) {
        *self.0.add(at) = value;
    }
}

/// Runs `work(0..tasks)` on the shared pool, or on this thread when the job (`size`
/// multiply-adds) is too small to be worth waking the pool for.
pub(crate) fn for_each_task(tasks: usize, size: usize, work: impl Fn(usize) + Sync + Send) {
    use rayon::prelude::*;
    if size < 1 << 16 {
        (0..tasks).for_each(work);
    } else {
        (0..tasks).into_par_iter().for_each(work);
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Cpu;

/// Runs `f` on the f32 values of `t`, row-major (copying only if `t` is a strided view).
fn read<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = if t.dtype() == DType::F32 {
        t.clone()
    } else {
        t.to_dtype(DType::F32)?
    };
    let t = if t.is_contiguous() { t } else { t.contiguous()? };
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(Error::BadOperands {
            op: "cpu",
            reason: "tensor is not in CPU memory".into(),
        });
    };
    let data = cpu.as_slice::<f32>()?;
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| bad("cpu", "tensor is not contiguous".into()))?;
    Ok(f(&data[start..end]))
}

fn tensor(data: Vec<f32>, dims: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(data, dims, &candle_core::Device::Cpu)?)
}

fn bad(op: &'static str, reason: String) -> Error {
    Error::BadOperands { op, reason }
}

impl Cpu {
    pub(crate) fn linear(&self, x: &Tensor, layer: &Linear) -> Result<Tensor> {
        let (out_features, in_features) = layer.weight.dims();
        if x.dim(D::Minus1)? != in_features {
            return Err(bad(
                "linear",
                format!("input {:?} does not end in {in_features}", x.dims()),
            ));
        }
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("checked above") = out_features;
        let mut y = match &layer.weight {
            Weight::Quantized(q) => read(x, |x| {
                let mut y = vec![0f32; x.len() / in_features * out_features];
                q.matmul(x, &mut y);
                y
            })?,
            Weight::Int8(q) => {
                let bias = match &layer.bias {
                    Some(b) => read(b.cpu("linear")?, <[f32]>::to_vec)?,
                    None => Vec::new(),
                };
                // Bias and activation are fused into the product (on AVX-512 VNNI, per tile).
                let y = read(x, |x| q.linear(x, &bias, layer.activation))?;
                return tensor(y, &dims);
            }
            Weight::Dense(w) if gemm::use_packed() => {
                let w = w.cpu("linear")?;
                let pack = || read(w, |w| gemm::PackedF32::pack(w, out_features, in_features))?;
                let packed = layer.packed.get(w, pack)?;
                let bias = match &layer.bias {
                    Some(b) => read(b.cpu("linear")?, <[f32]>::to_vec)?,
                    None => Vec::new(),
                };
                // Bias and activation are fused into the product's tiles.
                let y = read(x, |x| {
                    packed.matmul(x, x.len() / in_features, &bias, layer.activation)
                })?;
                return tensor(y, &dims);
            }
            Weight::Dense(w) => read(x, |x| {
                read(w.cpu("linear")?, |w| {
                    dense_matmul(x, w, in_features, out_features)
                })
            })???,
            Weight::Ggml(w) => read(&QMatMul::QTensor(w.clone()).forward(x)?, <[f32]>::to_vec)?,
            Weight::GpuQuantized(_) | Weight::CudaQuantized(_) => {
                return Err(bad("linear", "the weight lives on a GPU".into()))
            }
        };
        let bias = match &layer.bias {
            Some(b) => read(b.cpu("linear")?, <[f32]>::to_vec)?,
            None => Vec::new(),
        };
        if !bias.is_empty() || layer.activation != Activation::None {
            math::bias_activation(&mut y, &bias, layer.activation);
        }
        tensor(y, &dims)
    }

    pub(crate) fn add_layer_norm(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
    ) -> Result<Tensor> {
        let width = x.dim(D::Minus1)?;
        if residual.is_some_and(|r| r.dims() != x.dims()) || gamma.dims() != [width] || beta.dims() != [width]
        {
            return Err(bad(
                "add_layer_norm",
                format!(
                    "x {:?}, gamma {:?}, beta {:?}",
                    x.dims(),
                    gamma.dims(),
                    beta.dims()
                ),
            ));
        }
        // Borrow every operand in place: this op is a single pass over memory.
        let out = read(x, |x| {
            read(gamma, |gamma| {
                read(beta, |beta| {
                    let mut out = vec![0f32; x.len()];
                    match residual {
                        Some(r) => read(r, |r| math::add_layer_norm(x, r, gamma, beta, eps, &mut out))?,
                        None => math::add_layer_norm(x, &[], gamma, beta, eps, &mut out),
                    }
                    Ok::<_, Error>(out)
                })
            })
        })????;
        tensor(out, x.dims())
    }

    pub(crate) fn add_rms_norm(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        gamma: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor)> {
        let width = x.dim(D::Minus1)?;
        if residual.is_some_and(|r| r.dims() != x.dims()) || gamma.dims() != [width] {
            return Err(bad(
                "rms_norm",
                format!("x {:?}, gamma {:?}", x.dims(), gamma.dims()),
            ));
        }
        let mut sum = match residual {
            Some(r) => read(r, <[f32]>::to_vec)?,
            None => Vec::new(),
        };
        let out = read(x, |x| {
            read(gamma, |gamma| {
                let mut out = vec![0f32; x.len()];
                math::add_rms_norm(x, &mut sum, gamma, eps, &mut out);
                out
            })
        })??;
        let sum = if sum.is_empty() {
            x.clone()
        } else {
            tensor(sum, x.dims())?
        };
        Ok((sum, tensor(out, x.dims())?))
    }

    pub(crate) fn encoder_attention(&self, qkv: &Tensor, lengths: &[usize], heads: usize) -> Result<Tensor> {
        let (tokens, width3) = qkv.dims2()?;
        if !packed(lengths, tokens) || heads == 0 || width3 % (3 * heads) != 0 {
            return Err(bad(
                "attention",
                format!("qkv {:?}, lengths {lengths:?}, {heads} heads", qkv.dims()),
            ));
        }
        let head_dim = width3 / 3 / heads;
        let out = read(qkv, |qkv| {
            let mut out = vec![0f32; tokens * heads * head_dim];
            attention::encoder(qkv, lengths, heads, head_dim, &mut out);
            out
        })?;
        tensor(out, &[tokens, heads * head_dim])
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn causal_attention(
        &self,
        qkv: &Tensor,
        heads: usize,
        kv_heads: usize,
        rope: &Rope,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let head_dim = causal_head_dim(qkv.dims(), heads, kv_heads, rope, cache, layer)?;
        if !matches!(cache.store, KvStore::Host { .. }) {
            return Err(bad("attention", "the KV cache is not in host memory".into()));
        }
        let t = qkv.dims()[0];
        let out = read(qkv, |qkv| {
            let mut out = vec![0f32; t * heads * head_dim];
            attention::causal(qkv, t, heads, kv_heads, head_dim, rope, cache, layer, &mut out);
            out
        })?;
        tensor(out, &[t, heads * head_dim])
    }

    pub(crate) fn swiglu(&self, x: &Tensor) -> Result<Tensor> {
        let width = x.dim(D::Minus1)?;
        if width % 2 != 0 {
            return Err(bad("swiglu", format!("odd width {width}")));
        }
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("has a last dim") = width / 2;
        let out = read(x, |x| {
            let mut out = vec![0f32; x.len() / 2];
            math::swiglu(x, &mut out, width / 2);
            out
        })?;
        tensor(out, &dims)
    }

    pub(crate) fn embedding(&self, table: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let mut dims = ids.dims().to_vec();
        dims.push(table.dim(1)?);
        let rows = table.index_select(&ids.flatten_all()?, 0)?;
        Ok(rows.reshape(dims)?)
    }

    pub(crate) fn mean_pool(&self, hidden: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let (tokens, width) = hidden.dims2()?;
        if !packed(lengths, tokens) {
            return Err(bad(
                "mean_pool",
                format!("hidden {:?}, lengths {lengths:?}", hidden.dims()),
            ));
        }
        let out = read(hidden, |hidden| {
            let mut out = vec![0f32; lengths.len() * width];
            let mut rows = hidden.chunks_exact(width);
            for (mean, &n) in out.chunks_exact_mut(width).zip(lengths) {
                for row in rows.by_ref().take(n) {
                    mean.iter_mut().zip(row).for_each(|(m, x)| *m += x);
                }
                mean.iter_mut().for_each(|m| *m /= n as f32);
            }
            out
        })?;
        tensor(out, &[lengths.len(), width])
    }

    pub(crate) fn l2_normalize(&self, x: &Tensor) -> Result<Tensor> {
        let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        Ok(x.broadcast_div(&norm)?)
    }

    pub(crate) fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Ok(a.broadcast_add(b)?)
    }

    pub(crate) fn rows(&self, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        Ok(x.narrow(0, start, len)?)
    }

    pub(crate) fn concat_rows(&self, parts: &[&Tensor]) -> Result<Tensor> {
        Ok(Tensor::cat(parts, 0)?)
    }
}

/// `x[m×k] · w[n×k]ᵀ` with the gemm crate on the shared pool (packing happens inside gemm).
fn dense_matmul(x: &[f32], w: &[f32], k: usize, n: usize) -> Result<Vec<f32>> {
    if w.len() != n * k || !x.len().is_multiple_of(k) {
        return Err(bad(
            "linear",
            format!("x of {} values, w of {} for {n}x{k}", x.len(), w.len()),
        ));
    }
    let m = x.len() / k;
    let mut y = vec![0f32; m * n];
    let threads = if m * n * k < 1 << 18 {
        ::gemm::Parallelism::None
    } else {
        ::gemm::Parallelism::Rayon(rayon::current_num_threads())
    };
    // SAFETY: the sizes and strides above describe exactly x (m×k), w (n×k) and y (m×n).
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            threads,
        );
    }
    Ok(y)
}

/// Test helper shared by the kernels' property tests.
#[cfg(test)]
pub(crate) mod test_rng {
    /// A tiny xorshift generator: shapes that vary without a dependency.
    pub(crate) struct Rng(pub u64);
    impl Rng {
        pub(crate) fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }
}
