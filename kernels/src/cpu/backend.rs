//! The CPU as a [`Backend`]: Keel's tensors unwrapped to the candle tensors the kernels take
//! (an operand of another device is `BadOperands`), the results wrapped back.

use super::Cpu;
use crate::backend::Backend;
use crate::decoder::{KvCache, Rope};
use crate::tensor::Repr;
use crate::{Caps, DeviceKind, Linear, Result, Tensor};

fn host(t: candle_core::Tensor) -> Tensor {
    Tensor(Repr::Cpu(t))
}

impl Backend for Cpu {
    fn caps(&self) -> Caps {
        Caps {
            kind: DeviceKind::Cpu,
            name: "cpu".into(),
            quantized_matmul: true,
            emulated: false,
        }
    }

    fn runs_on_pool(&self) -> bool {
        true
    }

    fn upload(&self, t: &Tensor) -> Result<Tensor> {
        Ok(host(t.to_host()?))
    }

    fn upload_linear(&self, layer: &Linear) -> Result<Linear> {
        Ok(layer.clone())
    }

    fn tensor_f32(&self, data: &[f32], dims: &[usize]) -> Result<Tensor> {
        Ok(host(candle_core::Tensor::from_slice(
            data,
            dims,
            &candle_core::Device::Cpu,
        )?))
    }

    fn tensor_u32(&self, data: &[u32], dims: &[usize]) -> Result<Tensor> {
        Ok(host(candle_core::Tensor::from_slice(
            data,
            dims,
            &candle_core::Device::Cpu,
        )?))
    }

    fn new_kv_cache(&self, layers: usize, kv_heads: usize, head_dim: usize) -> Result<KvCache> {
        Ok(KvCache::new(layers, kv_heads, head_dim))
    }

    fn linear(&self, x: &Tensor, layer: &Linear) -> Result<Tensor> {
        Cpu::linear(self, x.cpu("linear")?, layer).map(host)
    }

    fn add_layer_norm(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
    ) -> Result<Tensor> {
        const OP: &str = "add_layer_norm";
        let residual = residual.map(|r| r.cpu(OP)).transpose()?;
        Cpu::add_layer_norm(self, x.cpu(OP)?, residual, gamma.cpu(OP)?, beta.cpu(OP)?, eps).map(host)
    }

    fn add_rms_norm(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        gamma: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor)> {
        const OP: &str = "rms_norm";
        let residual = residual.map(|r| r.cpu(OP)).transpose()?;
        let (sum, normed) = Cpu::add_rms_norm(self, x.cpu(OP)?, residual, gamma.cpu(OP)?, eps)?;
        Ok((host(sum), host(normed)))
    }

    fn encoder_attention(&self, qkv: &Tensor, lengths: &[usize], heads: usize) -> Result<Tensor> {
        Cpu::encoder_attention(self, qkv.cpu("attention")?, lengths, heads).map(host)
    }

    fn causal_attention(
        &self,
        qkv: &Tensor,
        heads: usize,
        kv_heads: usize,
        rope: &Rope,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let qkv = qkv.cpu("attention")?;
        Cpu::causal_attention(self, qkv, heads, kv_heads, rope, cache, layer).map(host)
    }

    fn swiglu(&self, x: &Tensor) -> Result<Tensor> {
        Cpu::swiglu(self, x.cpu("swiglu")?).map(host)
    }

    fn embedding(&self, table: &Tensor, ids: &Tensor) -> Result<Tensor> {
        const OP: &str = "embedding";
        Cpu::embedding(self, table.cpu(OP)?, ids.cpu(OP)?).map(host)
    }

    fn mean_pool(&self, hidden: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        Cpu::mean_pool(self, hidden.cpu("mean_pool")?, lengths).map(host)
    }

    fn l2_normalize(&self, x: &Tensor) -> Result<Tensor> {
        Cpu::l2_normalize(self, x.cpu("l2_normalize")?).map(host)
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Cpu::add(self, a.cpu("add")?, b.cpu("add")?).map(host)
    }

    fn rows(&self, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        Cpu::rows(self, x.cpu("rows")?, start, len).map(host)
    }

    fn concat_rows(&self, parts: &[Tensor]) -> Result<Tensor> {
        let parts = parts
            .iter()
            .map(|p| p.cpu("concat_rows"))
            .collect::<Result<Vec<_>>>()?;
        Cpu::concat_rows(self, &parts).map(host)
    }
}
