//! The wgpu backend: the op set as WGSL compute shaders (`kernels/wgsl/`) on a Vulkan, Metal or
//! DX12 adapter. Tensors live in pooled GPU buffers; ops record commands that are submitted
//! together when a result is read back (see [`context`]).

mod context;

use crate::backend::Backend;
use crate::decoder::{causal_head_dim, KvCache, KvStore, Rope};
use crate::linear::{Activation, Linear, Weight};
use crate::shapes::{self, HostValues};
use crate::tensor::{Repr, Tensor};
use crate::{Caps, DType, DeviceKind, Error, QuantKind, QuantMatrix, Result, WgpuOptions};
pub(crate) use context::adapters;
pub use context::DeviceStats;
use context::{Context, Shader, Usage};
use std::fmt;
use std::sync::Arc;

macro_rules! shader {
    ($name:literal) => {
        Shader {
            name: $name,
            source: include_str!(concat!("../../wgsl/", $name, ".wgsl")),
        }
    };
    // A shader that uses shared functions: `activation` or `reduction` (WGSL has no includes).
    ($name:literal, with $shared:literal) => {
        Shader {
            name: $name,
            source: concat!(
                include_str!(concat!("../../wgsl/", $shared, ".wgsl")),
                include_str!(concat!("../../wgsl/", $name, ".wgsl"))
            ),
        }
    };
}

const MATMUL: Shader = shader!("matmul", with "activation");
const QMATMUL: Shader = shader!("qmatmul", with "activation");
const LAYER_NORM: Shader = shader!("layer_norm", with "reduction");
const RMS_NORM: Shader = shader!("rms_norm", with "reduction");
const L2_NORMALIZE: Shader = shader!("l2_normalize", with "reduction");
const ELEMENTWISE: Shader = shader!("elementwise");
const MEAN_POOL: Shader = shader!("mean_pool");
const ATTENTION: Shader = shader!("attention");
const ROPE: Shader = shader!("rope");

/// Workgroups a row (or a group of 256 elements) at most along x; the rest go to y.
const GRID_X: usize = 32768;

/// The workgroup grid for `n` workgroups, `GRID_X` wide.
fn grid(n: usize) -> [u32; 3] {
    [n.min(GRID_X) as u32, n.div_ceil(GRID_X) as u32, 1]
}

fn bad(op: &'static str, reason: String) -> Error {
    Error::BadOperands { op, reason }
}

/// A GPU buffer that goes back to the pool when the last tensor using it drops.
pub(crate) struct GpuBuffer {
    pub(crate) buffer: wgpu::Buffer,
    ctx: Arc<Context>,
    pooled: bool,
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        if self.pooled {
            self.ctx.give(self.buffer.clone(), Usage::Storage);
        }
    }
}

/// A tensor in GPU memory: row-major values at the start of a buffer.
#[derive(Clone)]
pub(crate) struct GpuTensor {
    pub(crate) buf: Arc<GpuBuffer>,
    pub(crate) dims: Vec<usize>,
    pub(crate) dtype: DType,
}

impl fmt::Debug for GpuTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GpuTensor({:?}, {:?})", self.dims, self.dtype)
    }
}

impl GpuTensor {
    fn len(&self) -> usize {
        self.dims.iter().product()
    }

    /// Bytes of the values (f16 weights are 2 a value; f32 and u32 are 4).
    fn bytes(&self) -> usize {
        self.len() * if self.dtype == DType::F16 { 2 } else { 4 }
    }

    fn buffer(&self) -> &wgpu::Buffer {
        &self.buf.buffer
    }

    pub(crate) fn to_host(&self) -> Result<candle_core::Tensor> {
        let bytes = self
            .buf
            .ctx
            .read(self.buffer(), 0, (self.bytes().div_ceil(4) * 4) as u64)?;
        let host = candle_core::Device::Cpu;
        Ok(match self.dtype {
            DType::F16 => candle_core::Tensor::from_vec(
                bytemuck::pod_collect_to_vec::<u8, half::f16>(&bytes[..self.bytes()]),
                self.dims.as_slice(),
                &host,
            )?,
            DType::U32 => candle_core::Tensor::from_vec(
                bytemuck::pod_collect_to_vec::<u8, u32>(&bytes),
                self.dims.as_slice(),
                &host,
            )?,
            _ => candle_core::Tensor::from_vec(
                bytemuck::pod_collect_to_vec::<u8, f32>(&bytes),
                self.dims.as_slice(),
                &host,
            )?,
        })
    }
}

/// A block-quantized weight matrix on a wgpu device: per block, the scale and minimum as two
/// f32 (`vec2`), and the values as 4 (Q4_1) or 8 (Q8_0) little-endian words.
pub struct GpuQuantMatrix {
    rows: usize,
    cols: usize,
    kind: QuantKind,
    scales: GpuTensor,
    quants: GpuTensor,
}

impl fmt::Debug for GpuQuantMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GpuQuantMatrix({:?}, {}x{})", self.kind, self.rows, self.cols)
    }
}

impl GpuQuantMatrix {
    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
}

/// One sequence's keys and values on the device: per layer, a key and a value buffer of
/// `capacity` rows, grown by doubling (a copy) when a step needs more.
pub(crate) struct GpuKv {
    ctx: Arc<Context>,
    layers: Vec<(GpuTensor, GpuTensor)>,
    capacity: usize,
}

impl fmt::Debug for GpuKv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GpuKv({} layers, {} rows)", self.layers.len(), self.capacity)
    }
}

impl GpuKv {
    pub(crate) fn layers(&self) -> usize {
        self.layers.len()
    }

    pub(crate) fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, v)| (k.buffer().size() + v.buffer().size()) as usize)
            .sum()
    }

    /// A copy holding the first `values` floats of every layer.
    pub(crate) fn duplicate(&self, values: usize) -> Result<GpuKv> {
        let wgpu = Wgpu {
            ctx: self.ctx.clone(),
            f16_weights: false,
        };
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| {
                let copy = |t: &GpuTensor| -> Result<GpuTensor> {
                    let new = wgpu.alloc(&t.dims, DType::F32)?;
                    self.ctx.copy(t.buffer(), 0, new.buffer(), 0, (values * 4) as u64);
                    Ok(new)
                };
                Ok((copy(k)?, copy(v)?))
            })
            .collect::<Result<_>>()?;
        Ok(GpuKv {
            ctx: self.ctx.clone(),
            layers,
            capacity: self.capacity,
        })
    }
}

#[derive(Clone)]
pub(crate) struct Wgpu {
    ctx: Arc<Context>,
    f16_weights: bool,
}

impl fmt::Debug for Wgpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Wgpu({})", self.ctx.info.name)
    }
}

fn wrap(t: GpuTensor) -> Tensor {
    Tensor(Repr::Wgpu(t))
}

impl Wgpu {
    pub(crate) fn open(options: &WgpuOptions) -> Result<Self> {
        // wgpu's loaders can panic on a broken driver; that must not take the host down.
        let ctx =
            std::panic::catch_unwind(|| Context::open(options.adapter.as_deref())).map_err(|_| {
                Error::NoSuchDevice {
                    kind: DeviceKind::Wgpu,
                    reason: "the graphics driver failed while opening the adapter".into(),
                }
            })??;
        Ok(Self {
            ctx: Arc::new(ctx),
            f16_weights: options.f16_weights,
        })
    }

    fn alloc(&self, dims: &[usize], dtype: DType) -> Result<GpuTensor> {
        let len: usize = dims.iter().product();
        Ok(GpuTensor {
            buf: Arc::new(GpuBuffer {
                buffer: self.ctx.take((len.max(1) * 4) as u64, Usage::Storage)?,
                ctx: self.ctx.clone(),
                pooled: true,
            }),
            dims: dims.to_vec(),
            dtype,
        })
    }

    /// Copies `bytes` to the device: big ones (weights) into a buffer of their own, small ones
    /// (inputs of a request) into a pooled buffer, in order with the recorded commands.
    fn upload_bytes(&self, bytes: &[u8], dims: &[usize], dtype: DType) -> Result<GpuTensor> {
        if bytes.len() >= 1 << 20 {
            return Ok(GpuTensor {
                buf: Arc::new(GpuBuffer {
                    buffer: self.ctx.create_with(bytes),
                    ctx: self.ctx.clone(),
                    pooled: false,
                }),
                dims: dims.to_vec(),
                dtype,
            });
        }
        let t = self.alloc(dims, dtype)?;
        self.ctx.upload(bytes, t.buffer(), 0);
        Ok(t)
    }

    /// A dense weight in f32, or as f16 pairs in u32 words with the f16 option (rows whose
    /// length is a multiple of 4, which the matmul reads as vec4s).
    fn upload_dense(&self, t: &Tensor) -> Result<Tensor> {
        let host = match &t.0 {
            Repr::Cpu(h) if self.f16_weights && h.dims().last().is_some_and(|k| k % 4 == 0) => h,
            _ => return self.upload(t),
        };
        let halves = host.flatten_all()?.to_dtype(DType::F16)?.to_vec1::<half::f16>()?;
        let bits: Vec<u16> = halves.iter().map(|h| h.to_bits()).collect();
        Ok(wrap(self.upload_bytes(
            bytemuck::cast_slice(&bits),
            host.dims(),
            DType::F16,
        )?))
    }

    fn upload_quant(&self, q: &QuantMatrix) -> Result<GpuQuantMatrix> {
        let (scales, quants) = q.gpu_layout();
        let (rows, cols) = q.dims();
        let blocks = rows * cols / crate::cpu::quant::BLOCK;
        Ok(GpuQuantMatrix {
            rows,
            cols,
            kind: q.kind(),
            scales: self.upload_bytes(bytemuck::cast_slice(&scales), &[blocks, 2], DType::F32)?,
            quants: self.upload_bytes(bytemuck::cast_slice(&quants), &[quants.len()], DType::U32)?,
        })
    }

    fn norm_operands<'a>(
        op: &'static str,
        x: &'a Tensor,
        residual: Option<&'a Tensor>,
        gamma: &'a Tensor,
    ) -> Result<(&'a GpuTensor, Option<&'a GpuTensor>, &'a GpuTensor, usize)> {
        let (x, gamma) = (x.gpu(op)?, gamma.gpu(op)?);
        let residual = residual.map(|r| r.gpu(op)).transpose()?;
        let width = shapes::norm(op, &x.dims, residual.map(|r| r.dims.as_slice()), &gamma.dims)?;
        Ok((x, residual, gamma, width))
    }

    /// Where each sequence of a packed batch starts, and where the last one ends (`batch + 1`
    /// row indices), on the device.
    fn starts(&self, lengths: &[usize]) -> Result<GpuTensor> {
        let starts = shapes::starts(lengths);
        self.upload_bytes(bytemuck::cast_slice(&starts), &[starts.len()], DType::U32)
    }

    fn rope_tables(&self, rope: &Rope) -> Result<(GpuTensor, GpuTensor)> {
        if let Some(tables) = rope.gpu.get() {
            return Ok(tables.clone());
        }
        let upload = |v: &[f32]| self.upload_bytes(bytemuck::cast_slice(v), &[v.len()], DType::F32);
        let tables = (upload(&rope.cos)?, upload(&rope.sin)?);
        Ok(rope.gpu.get_or_init(|| tables).clone())
    }

    /// Makes room in every layer of `kv` for `rows` rows of `width` values, keeping `keep` rows.
    fn reserve(&self, kv: &mut GpuKv, rows: usize, keep: usize, width: usize) -> Result<()> {
        if rows <= kv.capacity {
            return Ok(());
        }
        let capacity = rows.max(2 * kv.capacity).max(16);
        for (k, v) in kv.layers.iter_mut() {
            for t in [k, v] {
                let grown = self.alloc(&[capacity, width], DType::F32)?;
                self.ctx
                    .copy(t.buffer(), 0, grown.buffer(), 0, (keep * width * 4) as u64);
                *t = grown;
            }
        }
        kv.capacity = capacity;
        Ok(())
    }

    /// Runs the elementwise shader's `op` (see `elementwise.wgsl`) into an output of shape `dims`,
    /// with its operands `[a, b, ids]` (an op binds its first operand where it needs no other).
    fn elementwise(
        &self,
        op: u32,
        dims: &[usize],
        (width, b_len): (usize, usize),
        [a, b, ids]: [&GpuTensor; 3],
    ) -> Result<Tensor> {
        let out = self.alloc(dims, DType::F32)?;
        let n = out.len();
        self.ctx.dispatch(
            &ELEMENTWISE,
            &[op, n as u32, width as u32, b_len as u32],
            &[a.buffer(), b.buffer(), ids.buffer(), out.buffer()],
            grid(n.div_ceil(256)),
        );
        Ok(wrap(out))
    }
}

impl Backend for Wgpu {
    fn caps(&self) -> Caps {
        Caps {
            kind: DeviceKind::Wgpu,
            name: format!(
                "{} ({:?}, {:?})",
                self.ctx.info.name, self.ctx.info.device_type, self.ctx.info.backend
            ),
            quantized_matmul: true,
            emulated: self.ctx.info.device_type == wgpu::DeviceType::Cpu,
        }
    }

    fn stats(&self) -> DeviceStats {
        self.ctx.stats()
    }

    fn synchronize(&self) -> Result<()> {
        self.ctx.wait()
    }

    fn upload(&self, t: &Tensor) -> Result<Tensor> {
        let host = match &t.0 {
            Repr::Wgpu(_) => return Ok(t.clone()),
            Repr::Cuda(_) => return Err(bad("upload", "the tensor lives on a CUDA device".into())),
            Repr::Cpu(h) => h,
        };
        let values = HostValues::of(host)?;
        Ok(wrap(self.upload_bytes(
            values.bytes(),
            host.dims(),
            values.dtype(),
        )?))
    }

    fn upload_linear(&self, layer: &Linear) -> Result<Linear> {
        let host = |t: Vec<f32>, dims: (usize, usize)| -> Result<Tensor> {
            self.upload(&Tensor::from(candle_core::Tensor::from_vec(
                t,
                &[dims.0, dims.1],
                &candle_core::Device::Cpu,
            )?))
        };
        let weight = match &layer.weight {
            Weight::Dense(t) => Weight::Dense(self.upload_dense(t)?),
            Weight::Quantized(q) => Weight::GpuQuantized(Arc::new(self.upload_quant(q)?)),
            Weight::GpuQuantized(q) => Weight::GpuQuantized(q.clone()),
            Weight::CudaQuantized(_) => {
                return Err(bad("upload_linear", "the weight lives on a CUDA device".into()))
            }
            // No int8 or other GGML kernels here: their values, dequantized, run as f32.
            other @ (Weight::Int8(_) | Weight::Ggml(_)) => match other.dequantized()? {
                Weight::Dense(t) => Weight::Dense(host(t.to_vec2()?.concat(), other.dims())?),
                _ => unreachable!("dequantized() returns a dense weight"),
            },
        };
        Ok(Linear {
            weight,
            bias: layer.bias.as_ref().map(|b| self.upload(b)).transpose()?,
            activation: layer.activation,
            packed: Default::default(),
        })
    }

    fn tensor_f32(&self, data: &[f32], dims: &[usize]) -> Result<Tensor> {
        Ok(wrap(self.upload_bytes(
            bytemuck::cast_slice(data),
            dims,
            DType::F32,
        )?))
    }

    fn tensor_u32(&self, data: &[u32], dims: &[usize]) -> Result<Tensor> {
        Ok(wrap(self.upload_bytes(
            bytemuck::cast_slice(data),
            dims,
            DType::U32,
        )?))
    }

    fn linear(&self, x: &Tensor, layer: &Linear) -> Result<Tensor> {
        let x = x.gpu("linear")?;
        let (n, k) = layer.weight.dims();
        if x.dims.last() != Some(&k) {
            return Err(bad("linear", format!("input {:?} does not end in {k}", x.dims)));
        }
        let m = x.len() / k;
        let mut dims = x.dims.clone();
        *dims.last_mut().expect("checked above") = n;
        let y = self.alloc(&dims, DType::F32)?;
        let bias = layer.bias.as_ref().map(|b| b.gpu("linear")).transpose()?;
        let act = match layer.activation {
            Activation::None => 0,
            Activation::GeluErf => 1,
            Activation::Silu => 2,
        };
        let has_bias = bias.is_some() as u32;
        match &layer.weight {
            Weight::Dense(w) => {
                let w = w.gpu("linear")?;
                let bias = bias.unwrap_or(w);
                let f16 = (w.dtype == DType::F16) as u32;
                self.ctx.dispatch(
                    &MATMUL,
                    &[m as u32, n as u32, k as u32, has_bias, act, f16],
                    &[
                        x.buffer(),
                        x.buffer(),
                        w.buffer(),
                        w.buffer(),
                        w.buffer(),
                        bias.buffer(),
                        y.buffer(),
                    ],
                    [n.div_ceil(64) as u32, m.div_ceil(64) as u32, 1],
                );
            }
            Weight::GpuQuantized(q) => {
                let kind = match q.kind {
                    QuantKind::Q4_1 => 0,
                    QuantKind::Q8_0 => 1,
                };
                let bias = bias.unwrap_or(x);
                let blocks = (k / crate::cpu::quant::BLOCK) as u32;
                self.ctx.dispatch(
                    &QMATMUL,
                    &[m as u32, n as u32, blocks, kind, has_bias, act],
                    &[
                        x.buffer(),
                        q.scales.buffer(),
                        q.quants.buffer(),
                        bias.buffer(),
                        y.buffer(),
                    ],
                    // 16 rows of w by 4 rows of x a workgroup.
                    {
                        let groups = n.div_ceil(16);
                        [
                            groups.min(GRID_X) as u32,
                            m.div_ceil(4) as u32,
                            groups.div_ceil(GRID_X) as u32,
                        ]
                    },
                );
            }
            _ => {
                return Err(bad(
                    "linear",
                    "the weight is not on the wgpu device (Device::upload_linear)".into(),
                ))
            }
        }
        Ok(wrap(y))
    }

    fn add_layer_norm(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
    ) -> Result<Tensor> {
        let (x, residual, gamma, width) = Self::norm_operands("add_layer_norm", x, residual, gamma)?;
        let beta = beta.gpu("add_layer_norm")?;
        if beta.dims != [width] {
            return Err(bad("add_layer_norm", format!("beta {:?}", beta.dims)));
        }
        let out = self.alloc(&x.dims, DType::F32)?;
        let rows = x.len() / width;
        self.ctx.dispatch(
            &LAYER_NORM,
            &[
                rows as u32,
                width as u32,
                residual.is_some() as u32,
                eps.to_bits(),
            ],
            &[
                x.buffer(),
                residual.unwrap_or(x).buffer(),
                gamma.buffer(),
                beta.buffer(),
                out.buffer(),
            ],
            grid(rows),
        );
        Ok(wrap(out))
    }

    fn add_rms_norm(
        &self,
        x_t: &Tensor,
        residual: Option<&Tensor>,
        gamma: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor)> {
        let (x, residual, gamma, width) = Self::norm_operands("rms_norm", x_t, residual, gamma)?;
        let out = self.alloc(&x.dims, DType::F32)?;
        // Without a residual the sum is x itself; the shader then writes nothing to `sum`.
        let sum = match residual {
            Some(_) => self.alloc(&x.dims, DType::F32)?,
            None => self.alloc(&[1], DType::F32)?,
        };
        let rows = x.len() / width;
        self.ctx.dispatch(
            &RMS_NORM,
            &[
                rows as u32,
                width as u32,
                residual.is_some() as u32,
                eps.to_bits(),
            ],
            &[
                x.buffer(),
                residual.unwrap_or(x).buffer(),
                gamma.buffer(),
                sum.buffer(),
                out.buffer(),
            ],
            grid(rows),
        );
        let sum = match residual {
            Some(_) => wrap(sum),
            None => x_t.clone(),
        };
        Ok((sum, wrap(out)))
    }

    fn encoder_attention(&self, qkv: &Tensor, lengths: &[usize], heads: usize) -> Result<Tensor> {
        let qkv = qkv.gpu("attention")?;
        let (tokens, width, head_dim) = shapes::encoder_attention(&qkv.dims, lengths, heads)?;
        let width3 = 3 * width;
        let starts = self.starts(lengths)?;
        let out = self.alloc(&[tokens, width], DType::F32)?;
        let scale = 1.0 / (head_dim as f32).sqrt();
        #[rustfmt::skip]
        let params = [
            heads, 1, head_dim, 0,
            width3, width3, width3, width,
            0, width, 2 * width, 0,
        ];
        let mut params: Vec<u32> = params.iter().map(|&v| v as u32).collect();
        params.push(scale.to_bits());
        let b = qkv.buffer();
        let longest = lengths.iter().max().copied().unwrap_or(0);
        self.ctx.dispatch(
            &ATTENTION,
            &params,
            &[b, b, b, starts.buffer(), out.buffer()],
            [longest as u32, heads as u32, lengths.len() as u32],
        );
        Ok(wrap(out))
    }

    fn new_kv_cache(&self, layers: usize, kv_heads: usize, head_dim: usize) -> Result<KvCache> {
        let width = kv_heads * head_dim;
        let empty = || self.alloc(&[0, width], DType::F32);
        let layers = (0..layers)
            .map(|_| Ok((empty()?, empty()?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache::on_device(
            KvStore::Wgpu(GpuKv {
                ctx: self.ctx.clone(),
                layers,
                capacity: 0,
            }),
            width,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn causal_attention(
        &self,
        qkv: &Tensor,
        heads: usize,
        kv_heads: usize,
        rope: &Rope,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let qkv = qkv.gpu("attention")?;
        let head_dim = causal_head_dim(&qkv.dims, heads, kv_heads, rope, cache, layer)?;
        let (t, width, pos0, kv_width) = (qkv.dims[0], qkv.dims[1], cache.len(), cache.width);
        let KvStore::Wgpu(kv) = &mut cache.store else {
            return Err(bad("attention", "the KV cache is not on the wgpu device".into()));
        };
        if head_dim > 256 {
            return Err(bad(
                "attention",
                format!("heads of {head_dim} (the shader holds 256)"),
            ));
        }
        // Every layer grows together, on the first layer of the step.
        self.reserve(kv, pos0 + t, pos0, kv_width)?;
        let (keys, values) = &kv.layers[layer];
        let (cos, sin) = self.rope_tables(rope)?;
        let q = self.alloc(&[t, heads * head_dim], DType::F32)?;
        let pairs = t * width / 2;
        self.ctx.dispatch(
            &ROPE,
            &[
                t as u32,
                pos0 as u32,
                heads as u32,
                kv_heads as u32,
                head_dim as u32,
            ],
            &[
                qkv.buffer(),
                cos.buffer(),
                sin.buffer(),
                q.buffer(),
                keys.buffer(),
                values.buffer(),
            ],
            [
                pairs.div_ceil(64).min(GRID_X) as u32,
                pairs.div_ceil(64 * GRID_X) as u32,
                1,
            ],
        );
        let out = self.alloc(&[t, heads * head_dim], DType::F32)?;
        let q_width = heads * head_dim;
        let scale = 1.0 / (head_dim as f32).sqrt();
        #[rustfmt::skip]
        let params = [
            heads, heads / kv_heads, head_dim, 1,
            q_width, kv_width, kv_width, q_width,
            0, 0, 0, pos0,
        ];
        let mut params: Vec<u32> = params.iter().map(|&v| v as u32).collect();
        params.push(scale.to_bits());
        self.ctx.dispatch(
            &ATTENTION,
            &params,
            &[
                q.buffer(),
                keys.buffer(),
                values.buffer(),
                q.buffer(),
                out.buffer(),
            ],
            [t as u32, heads as u32, 1],
        );
        Ok(wrap(out))
    }

    fn swiglu(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.gpu("swiglu")?;
        let dims = shapes::swiglu(&x.dims)?;
        let width = 2 * dims.last().expect("swiglu keeps the rank");
        self.elementwise(1, &dims, (width / 2, 1), [x, x, x])
    }

    fn embedding(&self, table: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let (table, ids) = (table.gpu("embedding")?, ids.gpu("embedding")?);
        let (rows, width, dims) = shapes::embedding(&table.dims, &ids.dims, ids.dtype)?;
        self.elementwise(2, &dims, (width, rows), [table, table, ids])
    }

    fn mean_pool(&self, hidden: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let hidden = hidden.gpu("mean_pool")?;
        let width = shapes::mean_pool(&hidden.dims, lengths)?;
        let batch = lengths.len();
        let starts = self.starts(lengths)?;
        let out = self.alloc(&[batch, width], DType::F32)?;
        self.ctx.dispatch(
            &MEAN_POOL,
            &[batch as u32, width as u32],
            &[hidden.buffer(), starts.buffer(), out.buffer()],
            grid((batch * width).div_ceil(256)),
        );
        Ok(wrap(out))
    }

    fn l2_normalize(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.gpu("l2_normalize")?;
        let width = shapes::l2_normalize(&x.dims)?;
        let out = self.alloc(&x.dims, DType::F32)?;
        let rows = x.len() / width;
        self.ctx.dispatch(
            &L2_NORMALIZE,
            &[rows as u32, width as u32],
            &[x.buffer(), out.buffer()],
            grid(rows),
        );
        Ok(wrap(out))
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (a, b) = (a.gpu("add")?, b.gpu("add")?);
        shapes::broadcast(&a.dims, &b.dims)?;
        self.elementwise(0, &a.dims, (1, b.len()), [a, b, a])
    }

    fn rows(&self, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        let x = x.gpu("rows")?;
        let dims = shapes::rows(&x.dims, start, len)?;
        let row: usize = x.dims[1..].iter().product();
        let out = self.alloc(&dims, x.dtype)?;
        // Activations and ids: 4 bytes a value (f16 is for weights, never sliced).
        let size = 4;
        self.ctx.copy(
            x.buffer(),
            (start * row * size) as u64,
            out.buffer(),
            0,
            (len * row * size) as u64,
        );
        Ok(wrap(out))
    }

    fn concat_rows(&self, parts: &[Tensor]) -> Result<Tensor> {
        let parts = parts
            .iter()
            .map(|p| p.gpu("concat_rows"))
            .collect::<Result<Vec<_>>>()?;
        let shapes: Vec<_> = parts.iter().map(|p| (p.dims.as_slice(), p.dtype)).collect();
        let dims = shapes::concat_rows(&shapes)?;
        let out = self.alloc(&dims, parts[0].dtype)?;
        let mut at = 0;
        for p in &parts {
            let bytes = p.bytes() as u64;
            self.ctx.copy(p.buffer(), 0, out.buffer(), at, bytes);
            at += bytes;
        }
        Ok(wrap(out))
    }
}
