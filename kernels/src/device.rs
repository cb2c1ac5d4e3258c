use crate::{cpu::Cpu, Error, Linear, Result, Tensor};
use std::fmt;
use std::str::FromStr;

/// The kinds of backend Keel knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// The host CPU (always available).
    Cpu,
    /// A GPU reached through wgpu (Vulkan, Metal, DX12).
    Wgpu,
    /// An NVIDIA GPU reached through CUDA.
    Cuda,
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Wgpu => "wgpu",
            DeviceKind::Cuda => "cuda",
        })
    }
}

impl FromStr for DeviceKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(DeviceKind::Cpu),
            "wgpu" => Ok(DeviceKind::Wgpu),
            "cuda" => Ok(DeviceKind::Cuda),
            other => Err(format!("unknown device '{other}' (expected cpu, wgpu or cuda)")),
        }
    }
}

/// The ops of the backend layer, for capability queries ([`Device::supports`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// [`Device::linear`] with a dense f32 weight.
    Linear,
    /// [`Device::linear`] with a block-quantized weight.
    QuantizedLinear,
    /// [`Device::add_layer_norm`].
    AddLayerNorm,
    /// [`Device::rms_norm`].
    RmsNorm,
    /// [`Device::attention`].
    Attention,
    /// [`Device::rope_interleaved`].
    Rope,
    /// [`Device::embedding`].
    Embedding,
    /// [`Device::mean_pool`].
    MeanPool,
    /// [`Device::l2_normalize`].
    L2Normalize,
    /// [`Device::softmax`].
    Softmax,
    /// [`Device::gelu`] and [`Device::silu`].
    Activation,
    /// [`Device::add`] and [`Device::mul`].
    Elementwise,
}

/// What a device is and can do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caps {
    /// Which backend.
    pub kind: DeviceKind,
    /// A human-readable name of the device.
    pub name: String,
    /// Whether quantized (Q4_1, Q8_0) weights can be multiplied without dequantizing them.
    pub quantized_matmul: bool,
}

/// A compute device and the op set on it. Cheap to clone; safe to share between threads.
#[derive(Debug, Clone)]
pub struct Device {
    backend: Backend,
}

#[derive(Debug, Clone)]
enum Backend {
    Cpu(Cpu),
}

impl Device {
    /// The host CPU.
    pub fn cpu() -> Self {
        Self {
            backend: Backend::Cpu(Cpu::new()),
        }
    }

    /// The device of the given kind, or [`Error::NoSuchDevice`] saying why there is none.
    pub fn new(kind: DeviceKind) -> Result<Self> {
        match kind {
            DeviceKind::Cpu => Ok(Self::cpu()),
            // Their backends land in their own issues; until then this build has none.
            DeviceKind::Wgpu | DeviceKind::Cuda => Err(Error::NoSuchDevice {
                kind,
                reason: format!("the {kind} backend is not compiled into this build of Keel"),
            }),
        }
    }

    /// The fastest device available: CUDA, then wgpu, then the CPU (which always exists).
    pub fn best() -> Self {
        [DeviceKind::Cuda, DeviceKind::Wgpu]
            .into_iter()
            .find_map(|kind| Self::new(kind).ok())
            .unwrap_or_else(Self::cpu)
    }

    /// What this device is and can do.
    pub fn caps(&self) -> Caps {
        match &self.backend {
            Backend::Cpu(cpu) => cpu.caps(),
        }
    }

    /// Whether this device implements `op`.
    pub fn supports(&self, op: Op) -> bool {
        match &self.backend {
            Backend::Cpu(_) => Cpu::supports(op),
        }
    }

    /// Waits until all work queued on the device has finished (a no-op on the CPU).
    pub fn synchronize(&self) -> Result<()> {
        match &self.backend {
            Backend::Cpu(_) => Ok(()),
        }
    }

    /// The candle device that holds this backend's tensors (where weights are loaded).
    pub fn candle(&self) -> &candle_core::Device {
        match &self.backend {
            Backend::Cpu(cpu) => cpu.candle(),
        }
    }

    /// `activation(x W^T + b)` over the last dimension of `x`.
    pub fn linear(&self, x: &Tensor, layer: &Linear) -> Result<Tensor> {
        match &self.backend {
            Backend::Cpu(cpu) => cpu.linear(x, layer),
        }
    }

    /// `layer_norm(x + residual) * gamma + beta` over the last dimension.
    pub fn add_layer_norm(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
    ) -> Result<Tensor> {
        match &self.backend {
            Backend::Cpu(cpu) => cpu.add_layer_norm(x, residual, gamma, beta, eps),
        }
    }

    /// `x / rms(x) * gamma` over the last dimension.
    pub fn rms_norm(&self, x: &Tensor, gamma: &Tensor, eps: f32) -> Result<Tensor> {
        match &self.backend {
            Backend::Cpu(cpu) => cpu.rms_norm(x, gamma, eps),
        }
    }

    /// Scaled dot-product attention: `softmax(q k^T * scale + mask) v`.
    ///
    /// `q` is `[batch, heads, q_len, head_dim]`; `k` and `v` are `[batch, kv_heads, kv_len,
    /// head_dim]` where `heads` is a multiple of `kv_heads` (grouped-query attention). `mask`, if
    /// given, is added to the scores and must broadcast to `[batch, heads, q_len, kv_len]`
    /// (use a large negative value, not `-inf`, for masked positions so that a fully masked row
    /// stays finite).
    pub fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        scale: f32,
    ) -> Result<Tensor> {
        match &self.backend {
            Backend::Cpu(cpu) => cpu.attention(q, k, v, mask, scale),
        }
    }

    /// Rotary position embedding with interleaved pairs (GGML's "normal" mode): `x` is
    /// `[batch, heads, len, head_dim]`, `cos` and `sin` are `[len, head_dim / 2]`.
    pub fn rope_interleaved(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        match &self.backend {
            Backend::Cpu(cpu) => cpu.rope_interleaved(x, cos, sin),
        }
    }

    /// Rows of `table` gathered by `ids` (any shape of u32): the result has shape
    /// `ids.shape() + [table.dim(1)]`.
    pub fn embedding(&self, table: &Tensor, ids: &Tensor) -> Result<Tensor> {
        match &self.backend {
            Backend::Cpu(cpu) => cpu.embedding(table, ids),
        }
    }

    /// The mean of `hidden` (`[batch, len, dim]`) over the positions where `mask` (`[batch, len]`,
    /// 1.0 or 0.0) is set.
    pub fn mean_pool(&self, hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
        match &self.backend {
            Backend::Cpu(cpu) => cpu.mean_pool(hidden, mask),
        }
    }

    /// Each row of `x` divided by its L2 norm (at least 1e-12, like PyTorch's `F.normalize`).
    pub fn l2_normalize(&self, x: &Tensor) -> Result<Tensor> {
        match &self.backend {
            Backend::Cpu(cpu) => cpu.l2_normalize(x),
        }
    }

    /// Softmax over the last dimension.
    pub fn softmax(&self, x: &Tensor) -> Result<Tensor> {
        match &self.backend {
            Backend::Cpu(cpu) => cpu.softmax(x),
        }
    }

    /// GELU with the exact erf.
    pub fn gelu(&self, x: &Tensor) -> Result<Tensor> {
        match &self.backend {
            Backend::Cpu(cpu) => cpu.gelu(x),
        }
    }

    /// SiLU, `x * sigmoid(x)`.
    pub fn silu(&self, x: &Tensor) -> Result<Tensor> {
        match &self.backend {
            Backend::Cpu(cpu) => cpu.silu(x),
        }
    }

    /// `a + b` with broadcasting.
    pub fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        match &self.backend {
            Backend::Cpu(cpu) => cpu.add(a, b),
        }
    }

    /// `a * b` with broadcasting.
    pub fn mul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        match &self.backend {
            Backend::Cpu(cpu) => cpu.mul(a, b),
        }
    }
}
