use crate::backend::Backend;
use crate::cuda::{Cuda, CudaOptions};
use crate::decoder::{KvCache, Rope};
use crate::wgpu::{DeviceStats, Wgpu};
use crate::{cpu::Cpu, Error, Linear, Result, Tensor};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

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

/// What a device is and can do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caps {
    /// Which backend.
    pub kind: DeviceKind,
    /// A human-readable name of the device.
    pub name: String,
    /// Whether quantized (Q4_1, Q8_0) weights can be multiplied without dequantizing them.
    pub quantized_matmul: bool,
    /// Whether a GPU API runs on the host CPU here (a software driver such as Mesa's lavapipe):
    /// it works, but it is no faster than the CPU backend.
    pub emulated: bool,
}

/// How to open the wgpu backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WgpuOptions {
    /// The first adapter whose name contains this (case-insensitive); None: the preferred kind
    /// (discrete GPU, integrated GPU, then a CPU adapter such as Mesa's lavapipe).
    pub adapter: Option<String>,
    /// Keep dense weights as f16 on the device (half the memory and bandwidth; products still
    /// add in f32). Off by default: the f32 weights give the CPU's numbers to ~1e-6.
    pub f16_weights: bool,
}

impl WgpuOptions {
    /// The options the environment sets: `KEEL_WGPU_ADAPTER=name`, `KEEL_WGPU_F16_WEIGHTS=1`.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Self {
            adapter: var("KEEL_WGPU_ADAPTER"),
            f16_weights: var("KEEL_WGPU_F16_WEIGHTS").is_some_and(|v| v != "0"),
        }
    }
}

/// A compute device and the op set on it. Cheap to clone; safe to share between threads.
#[derive(Debug, Clone)]
pub struct Device {
    backend: Arc<dyn Backend>,
}

impl Device {
    /// The host CPU. On Linux with glibc, the first call also tunes malloc so that freed
    /// activation buffers are reused by the next forward instead of being returned to the OS and
    /// faulted in again (see `KEEL_MALLOC_TUNING` in the README).
    pub fn cpu() -> Self {
        crate::cpu::alloc::keep_buffers_for_reuse();
        Self {
            backend: Arc::new(Cpu),
        }
    }

    /// Returns memory freed by unloaded models to the operating system (the CPU backend keeps
    /// freed activation buffers for reuse while models run; see [`Device::cpu`]). Cheap to call
    /// now and then, not per request.
    pub fn release_free_memory(&self) {
        crate::cpu::alloc::return_free_memory();
    }

    /// The wgpu adapters of this machine, preferred first: "name (backend, type, driver)" (empty:
    /// none, and `Device::new(DeviceKind::Wgpu)` says how to get one).
    pub fn wgpu_adapters() -> Vec<String> {
        crate::wgpu::adapters()
    }

    /// The instruction-set extensions of this CPU that Keel's kernels use (AVX2, FMA, F16C,
    /// AVX-512 F/BW/VNNI, AVX-VNNI on x86-64; NEON and dot products on aarch64).
    pub fn cpu_features() -> Vec<&'static str> {
        #[cfg(target_arch = "x86_64")]
        {
            macro_rules! detected {
                ($($f:tt),*) => { vec![$((std::arch::is_x86_feature_detected!($f), $f)),*] };
            }
            detected!(
                "avx2",
                "fma",
                "f16c",
                "avx512f",
                "avx512bw",
                "avx512vnni",
                "avxvnni"
            )
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect()
        }
        #[cfg(target_arch = "aarch64")]
        {
            let mut found = vec![];
            if std::arch::is_aarch64_feature_detected!("neon") {
                found.push("neon");
            }
            if std::arch::is_aarch64_feature_detected!("dotprod") {
                found.push("dotprod");
            }
            found
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            Vec::new()
        }
    }

    /// The device of the given kind, or [`Error::NoSuchDevice`] saying why there is none.
    /// For wgpu and CUDA, the environment sets the options ([`WgpuOptions::from_env`],
    /// [`CudaOptions::from_env`]).
    pub fn new(kind: DeviceKind) -> Result<Self> {
        match kind {
            DeviceKind::Cpu => Ok(Self::cpu()),
            DeviceKind::Wgpu => Self::wgpu(&WgpuOptions::from_env()),
            DeviceKind::Cuda => Self::cuda(&CudaOptions::from_env()),
        }
    }

    /// A wgpu adapter chosen and set up by `options` (see [`WgpuOptions`]).
    pub fn wgpu(options: &WgpuOptions) -> Result<Self> {
        Ok(Self {
            backend: Arc::new(Wgpu::open(options)?),
        })
    }

    /// A CUDA GPU opened with `options` (see [`CudaOptions`]), or [`Error::NoSuchDevice`] naming
    /// what is missing: a library, a driver that answers, or the GPU asked for.
    pub fn cuda(options: &CudaOptions) -> Result<Self> {
        Ok(Self {
            backend: Arc::new(Cuda::open(options)?),
        })
    }

    /// The fastest device available: CUDA, then wgpu on a real GPU, then the CPU (which always
    /// exists). A wgpu adapter that runs on the CPU itself (lavapipe) is not faster than Keel's
    /// own CPU kernels, so it is never picked here.
    pub fn best() -> Self {
        // Probing opens the graphics drivers: once per process, then every engine shares it.
        static BEST: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
        BEST.get_or_init(|| {
            [DeviceKind::Cuda, DeviceKind::Wgpu]
                .into_iter()
                .filter_map(|kind| Self::new(kind).ok())
                .find(|d| !d.caps().emulated)
                .unwrap_or_else(Self::cpu)
        })
        .clone()
    }

    /// What this device is and can do.
    pub fn caps(&self) -> Caps {
        self.backend.caps()
    }

    /// Counters of the device's resources (all zero on the CPU, which has no buffers of its own).
    pub fn stats(&self) -> DeviceStats {
        self.backend.stats()
    }

    /// Runs `f`, a whole forward, where this device's host threads are. On the CPU that is a
    /// worker of the thread pool the kernels split their products over, so that each product's
    /// fork and join is a steal between threads that are awake, not a job handed in from outside
    /// the pool with a wake-up and a sleep each way (measured on SmolLM2 decode, ~150 products
    /// a token: a fifth of its time went to those). Elsewhere `f` runs on the calling thread.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        if self.backend.runs_on_pool() {
            rayon::scope(|_| f())
        } else {
            f()
        }
    }

    /// Waits until all work queued on the device has finished (a no-op on the CPU).
    pub fn synchronize(&self) -> Result<()> {
        self.backend.synchronize()
    }

    /// `t` on this device: weights once at load, inputs once per request. On the CPU a host
    /// tensor is used where it lies.
    pub fn upload(&self, t: &Tensor) -> Result<Tensor> {
        self.backend.upload(t)
    }

    /// A layer with its weight and bias on this device, in the format its kernels take
    /// (block-quantized weights stay quantized; formats a device has no kernel for are
    /// dequantized to f32).
    pub fn upload_linear(&self, layer: &Linear) -> Result<Linear> {
        self.backend.upload_linear(layer)
    }

    /// An f32 tensor of `dims` on this device.
    pub fn tensor_f32(&self, data: &[f32], dims: &[usize]) -> Result<Tensor> {
        check_len(data.len(), dims)?;
        self.backend.tensor_f32(data, dims)
    }

    /// A u32 tensor (token ids) of `dims` on this device.
    pub fn tensor_u32(&self, data: &[u32], dims: &[usize]) -> Result<Tensor> {
        check_len(data.len(), dims)?;
        self.backend.tensor_u32(data, dims)
    }

    /// An empty KV cache on this device for a decoder of `layers` layers.
    pub fn new_kv_cache(&self, layers: usize, kv_heads: usize, head_dim: usize) -> Result<KvCache> {
        self.backend.new_kv_cache(layers, kv_heads, head_dim)
    }

    /// `activation(x W^T + b)` over the last dimension of `x`.
    pub fn linear(&self, x: &Tensor, layer: &Linear) -> Result<Tensor> {
        self.backend.linear(x, layer)
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
        self.backend.add_layer_norm(x, residual, gamma, beta, eps)
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
        self.backend.add_rms_norm(x, residual, gamma, eps)
    }

    /// Bidirectional multi-head attention of an encoder, scaled by `1/sqrt(head_dim)`, over a
    /// packed batch.
    ///
    /// `qkv` is `[tokens, 3 * heads * head_dim]`, the output of a stacked Q/K/V projection over
    /// sequences laid back to back with no padding: the first `lengths[0]` rows are the first
    /// sequence, and so on (`lengths` sums to `tokens`). A token attends to its own sequence only,
    /// so a sequence's result does not depend on its batch-mates. Returns
    /// `[tokens, heads * head_dim]`.
    pub fn encoder_attention(&self, qkv: &Tensor, lengths: &[usize], heads: usize) -> Result<Tensor> {
        self.backend.encoder_attention(qkv, lengths, heads)
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
        self.backend
            .causal_attention(qkv, heads, kv_heads, rope, cache, layer)
    }

    /// `silu(gate) * up` where the last dimension of `x` is `[gate | up]` (a fused gate/up
    /// projection); the result is half as wide.
    pub fn swiglu(&self, x: &Tensor) -> Result<Tensor> {
        self.backend.swiglu(x)
    }

    /// Rows of `table` gathered by `ids` (any shape of u32): the result has shape
    /// `ids.shape() + [table.dim(1)]`.
    pub fn embedding(&self, table: &Tensor, ids: &Tensor) -> Result<Tensor> {
        self.backend.embedding(table, ids)
    }

    /// The mean of each sequence's rows of `hidden` (`[tokens, dim]`, sequences packed back to
    /// back, `lengths[b]` rows each, as for [`Device::encoder_attention`]): `[batch, dim]`.
    pub fn mean_pool(&self, hidden: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        self.backend.mean_pool(hidden, lengths)
    }

    /// Each row of `x` divided by its L2 norm (at least 1e-12, like PyTorch's `F.normalize`).
    pub fn l2_normalize(&self, x: &Tensor) -> Result<Tensor> {
        self.backend.l2_normalize(x)
    }

    /// `a + b`, with `b` broadcast over the leading dimensions of `a`.
    pub fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.backend.add(a, b)
    }

    /// Rows `start..start + len` of `x` (along its first dimension).
    pub fn rows(&self, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        self.backend.rows(x, start, len)
    }

    /// The tensors one after another along the first dimension.
    pub fn concat_rows(&self, parts: &[Tensor]) -> Result<Tensor> {
        self.backend.concat_rows(parts)
    }
}

/// Whether `lengths` split `tokens` packed rows into sequences: at least one, none empty, every
/// row used.
pub(crate) fn packed(lengths: &[usize], tokens: usize) -> bool {
    !lengths.is_empty()
        && lengths.iter().all(|&n| n > 0)
        && lengths.iter().try_fold(0usize, |sum, &n| sum.checked_add(n)) == Some(tokens)
}

fn check_len(len: usize, dims: &[usize]) -> Result<()> {
    if dims.iter().product::<usize>() != len {
        return Err(Error::BadOperands {
            op: "tensor",
            reason: format!("{len} values do not fill a tensor of shape {dims:?}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Device;

    #[test]
    fn a_cpu_forward_runs_on_a_worker_of_the_kernels_pool() {
        // The caller is the test's own thread, outside rayon's pool.
        assert_eq!(rayon::current_thread_index(), None);
        let inside = Device::cpu().run(rayon::current_thread_index);
        assert!(inside.is_some(), "Device::run left the forward outside the pool");
        // And it hands back what the forward returns.
        assert_eq!(Device::cpu().run(|| 6 * 7), 42);
    }
}
