//! The CPU backend, on candle-core tensors. The fused kernels of the CPU kernels issue replace
//! these bodies one by one; each keeps its plain version as the reference for tests.

pub(crate) mod quant;

use crate::{Activation, Caps, DeviceKind, Error, Linear, Op, Result, Tensor, Weight};
use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, D};

#[derive(Debug, Clone)]
pub(crate) struct Cpu {
    device: candle_core::Device,
}

impl Cpu {
    pub(crate) fn new() -> Self {
        Self {
            device: candle_core::Device::Cpu,
        }
    }

    pub(crate) fn candle(&self) -> &candle_core::Device {
        &self.device
    }

    pub(crate) fn caps(&self) -> Caps {
        Caps {
            kind: DeviceKind::Cpu,
            name: "cpu".into(),
            quantized_matmul: true,
        }
    }

    pub(crate) fn supports(_op: Op) -> bool {
        true
    }

    pub(crate) fn linear(&self, x: &Tensor, layer: &Linear) -> Result<Tensor> {
        let (_, in_features) = layer.weight.dims();
        if x.dim(D::Minus1)? != in_features {
            return Err(Error::BadOperands {
                op: "linear",
                reason: format!("input {:?} does not end in {in_features}", x.dims()),
            });
        }
        let mut y = match &layer.weight {
            Weight::Quantized(q) => {
                let (rows, _) = q.dims();
                let mut dims = x.dims().to_vec();
                let input = x.flatten_all()?.to_vec1::<f32>()?;
                let mut output = vec![0f32; input.len() / in_features * rows];
                q.matmul(&input, &mut output);
                *dims.last_mut().unwrap() = rows;
                Tensor::from_vec(output, dims, x.device())?
            }
            Weight::Dense(w) => QMatMul::Tensor(w.clone()).forward(x)?,
            Weight::Ggml(w) => QMatMul::QTensor(w.clone()).forward(x)?,
        };
        if let Some(bias) = &layer.bias {
            y = y.broadcast_add(bias)?;
        }
        Ok(match layer.activation {
            Activation::None => y,
            Activation::GeluErf => y.gelu_erf()?,
            Activation::Silu => y.silu()?,
        })
    }

    pub(crate) fn add_layer_norm(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
    ) -> Result<Tensor> {
        let x = match residual {
            Some(r) => (x + r)?,
            None => x.clone(),
        };
        Ok(candle_nn::ops::layer_norm(&x.contiguous()?, gamma, beta, eps)?)
    }

    pub(crate) fn rms_norm(&self, x: &Tensor, gamma: &Tensor, eps: f32) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, gamma, eps)?)
    }

    pub(crate) fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        scale: f32,
    ) -> Result<Tensor> {
        let (batch, heads, q_len, head_dim) = q.dims4()?;
        let (_, kv_heads, kv_len, _) = k.dims4()?;
        if kv_heads == 0 || heads % kv_heads != 0 || v.dims4()? != k.dims4()? {
            return Err(Error::BadOperands {
                op: "attention",
                reason: format!("q {:?}, k {:?}, v {:?}", q.dims(), k.dims(), v.dims()),
            });
        }
        // Grouped-query attention: fold the query heads that share a kv head into the row
        // dimension, so that each kv head is read once and never copied.
        let group = heads / kv_heads;
        let q = (q * scale as f64)?.reshape((batch, kv_heads, group * q_len, head_dim))?;
        let scores = q.contiguous()?.matmul(&k.t()?.contiguous()?)?;
        let scores = scores.reshape((batch, heads, q_len, kv_len))?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let probs = probs.reshape((batch, kv_heads, group * q_len, kv_len))?;
        let context = probs.matmul(&v.contiguous()?)?;
        Ok(context.reshape((batch, heads, q_len, head_dim))?)
    }

    pub(crate) fn rope_interleaved(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::rotary_emb::rope_i(&x.contiguous()?, cos, sin)?)
    }

    pub(crate) fn embedding(&self, table: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let mut dims = ids.dims().to_vec();
        dims.push(table.dim(1)?);
        let rows = table.index_select(&ids.flatten_all()?, 0)?;
        Ok(rows.reshape(dims)?)
    }

    pub(crate) fn mean_pool(&self, hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let mask = mask.to_dtype(hidden.dtype())?;
        let summed = hidden.broadcast_mul(&mask.unsqueeze(2)?)?.sum(1)?;
        let counts = mask.sum_keepdim(1)?.clamp(1e-9, f64::MAX)?;
        Ok(summed.broadcast_div(&counts)?)
    }

    pub(crate) fn l2_normalize(&self, x: &Tensor) -> Result<Tensor> {
        let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        Ok(x.broadcast_div(&norm)?)
    }

    pub(crate) fn softmax(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::softmax_last_dim(
            &x.to_dtype(DType::F32)?.contiguous()?,
        )?)
    }

    pub(crate) fn gelu(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.gelu_erf()?)
    }

    pub(crate) fn silu(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.silu()?)
    }

    pub(crate) fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Ok(a.broadcast_add(b)?)
    }

    pub(crate) fn mul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Ok(a.broadcast_mul(b)?)
    }
}
