use crate::decoder::{KvCache, Rope};
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
    /// [`Device::add_rms_norm`].
    AddRmsNorm,
    /// [`Device::encoder_attention`].
    EncoderAttention,
    /// [`Device::causal_attention`], with rotary embeddings and an in-place KV cache.
    CausalAttention,
    /// [`Device::swiglu`].
    SwiGlu,
    /// [`Device::embedding`].
    Embedding,
    /// [`Device::mean_pool`].
    MeanPool,
    /// [`Device::l2_normalize`].
    L2Normalize,
    /// [`Device::add`].
    Add,
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

    /// `sum = x + residual` (or `x`), then `(sum, sum / rms(sum) * gamma)` over the last
    /// dimension: the residual add and the next block's norm in one pass.
    pub fn add_rms_norm(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        gamma: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor)> {
        match &self.backend {
            Backend::Cpu(cpu) => cpu.add_rms_norm(x, residual, gamma, eps),
        }
    }

    /// Bidirectional multi-head attention of an encoder, scaled by `1/sqrt(head_dim)`.
    ///
    /// `qkv` is `[batch, len, 3 * heads * head_dim]`, the output of a stacked Q/K/V projection;
    /// sequence `b` holds `lengths[b]` real tokens followed by padding that no query attends to
    /// (so a sequence's result does not depend on its batch-mates). Returns
    /// `[batch, len, heads * head_dim]`, zero on padding rows.
    pub fn encoder_attention(&self, qkv: &Tensor, lengths: &[usize], heads: usize) -> Result<Tensor> {
        match &self.backend {
            Backend::Cpu(cpu) => cpu.encoder_attention(qkv, lengths, heads),
        }
    }

    /// Causal grouped-query self-attention of a decoder layer for `t` new tokens of one sequence.
    ///
    /// `qkv` is `[t, (heads + 2 * kv_heads) * head_dim]` (a fused Q/K/V projection). Q and K are
    /// rotated by `rope` at positions `cache.len()..`, K and V are appended to layer `layer` of
    /// the cache in place; call [`KvCache::commit`] once every layer has run. Returns
    /// `[t, heads * head_dim]`.
    pub fn causal_attention(
        &self,
        qkv: &Tensor,
        heads: usize,
        kv_heads: usize,
        rope: &Rope,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor> {
        match &self.backend {
            Backend::Cpu(cpu) => cpu.causal_attention(qkv, heads, kv_heads, rope, cache, layer),
        }
    }

    /// `silu(gate) * up` where the last dimension of `x` is `[gate | up]` (a fused gate/up
    /// projection); the result is half as wide.
    pub fn swiglu(&self, x: &Tensor) -> Result<Tensor> {
        match &self.backend {
            Backend::Cpu(cpu) => cpu.swiglu(x),
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

    /// `a + b` with broadcasting.
    pub fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        match &self.backend {
            Backend::Cpu(cpu) => cpu.add(a, b),
        }
    }
}
