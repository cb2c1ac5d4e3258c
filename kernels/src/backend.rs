//! The contract every backend keeps: the op set of [`crate::Device`], on the backend's own
//! tensors. `Device` holds one behind an `Arc<dyn Backend>` and forwards each call; a new backend
//! implements this trait and nothing in `Device` changes.

use crate::decoder::{KvCache, Rope};
use crate::{Caps, DeviceStats, Linear, Result, Tensor};
use std::fmt;

/// The op set on one device. The methods are [`crate::Device`]'s, which documents each; operands
/// are checked by the backend (a tensor of another device is `BadOperands`).
pub(crate) trait Backend: fmt::Debug + Send + Sync {
    fn caps(&self) -> Caps;

    /// Counters of the device's resources (none on the CPU).
    fn stats(&self) -> DeviceStats {
        DeviceStats::default()
    }

    /// Whether a forward should run on a worker of the kernels' thread pool (the CPU's: see
    /// [`crate::Device::run`]).
    fn runs_on_pool(&self) -> bool {
        false
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn upload(&self, t: &Tensor) -> Result<Tensor>;
    fn upload_linear(&self, layer: &Linear) -> Result<Linear>;
    fn tensor_f32(&self, data: &[f32], dims: &[usize]) -> Result<Tensor>;
    fn tensor_u32(&self, data: &[u32], dims: &[usize]) -> Result<Tensor>;
    fn new_kv_cache(&self, layers: usize, kv_heads: usize, head_dim: usize) -> Result<KvCache>;
    fn linear(&self, x: &Tensor, layer: &Linear) -> Result<Tensor>;
    fn add_layer_norm(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
    ) -> Result<Tensor>;
    fn add_rms_norm(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        gamma: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor)>;
    fn encoder_attention(&self, qkv: &Tensor, lengths: &[usize], heads: usize) -> Result<Tensor>;
    fn causal_attention(
        &self,
        qkv: &Tensor,
        heads: usize,
        kv_heads: usize,
        rope: &Rope,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor>;
    fn swiglu(&self, x: &Tensor) -> Result<Tensor>;
    fn embedding(&self, table: &Tensor, ids: &Tensor) -> Result<Tensor>;
    fn mean_pool(&self, hidden: &Tensor, lengths: &[usize]) -> Result<Tensor>;
    fn l2_normalize(&self, x: &Tensor) -> Result<Tensor>;
    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor>;
    fn rows(&self, x: &Tensor, start: usize, len: usize) -> Result<Tensor>;
    fn concat_rows(&self, parts: &[Tensor]) -> Result<Tensor>;
}
