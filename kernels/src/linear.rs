use crate::cpu::gemm::PackedF32;
use crate::cpu::int8::Int8Matrix;
use crate::cpu::quant::{QuantKind, QuantMatrix};
use crate::cuda::CudaQuantMatrix;
use crate::{GpuQuantMatrix, Tensor};
use candle_core::quantized::{GgmlDType, QTensor};
use std::sync::{Arc, Mutex};

/// The weight of a linear layer, `[out_features, in_features]` like PyTorch's `nn.Linear`.
#[derive(Debug, Clone)]
pub enum Weight {
    /// A plain (f32) matrix.
    Dense(Tensor),
    /// A block-quantized matrix with Keel's own kernels (Q4_1, Q8_0), multiplied without
    /// dequantizing it.
    Quantized(Arc<QuantMatrix>),
    /// Another GGML block format (K-quants, ...), multiplied by candle's kernels.
    Ggml(Arc<QTensor>),
    /// An f32 matrix quantized at load to int8 per output channel (the encoder's int8 path).
    Int8(Arc<Int8Matrix>),
    /// A Q4_1 or Q8_0 matrix on a wgpu device ([`crate::Device::upload_linear`]).
    GpuQuantized(Arc<GpuQuantMatrix>),
    /// A Q4_1 or Q8_0 matrix on a CUDA device ([`crate::Device::upload_linear`]).
    CudaQuantized(Arc<CudaQuantMatrix>),
}

impl Weight {
    /// The weight for a GGUF tensor: Keel's kernels for Q4_1 and Q8_0, f32 for float formats,
    /// candle's kernels for the other block formats.
    pub fn from_qtensor(q: QTensor) -> crate::Result<Weight> {
        let dims = q.shape().dims().to_vec();
        let [rows, cols] = dims[..] else {
            return Err(crate::Error::BadOperands {
                op: "linear",
                reason: format!("weight of shape {dims:?}"),
            });
        };
        let kind = match q.dtype() {
            GgmlDType::Q4_1 => QuantKind::Q4_1,
            GgmlDType::Q8_0 => QuantKind::Q8_0,
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                return Ok(Weight::Dense(q.dequantize(&q.device())?.into()))
            }
            _ => return Ok(Weight::Ggml(Arc::new(q))),
        };
        let packed = QuantMatrix::from_ggml(kind, rows, cols, &q.data()?).ok_or_else(|| {
            crate::Error::BadOperands {
                op: "linear",
                reason: format!("{kind:?} data does not fit {rows}x{cols}"),
            }
        })?;
        Ok(Weight::Quantized(Arc::new(packed)))
    }

    /// The same weight quantized to int8 per output channel, if it is a dense f32 matrix (other
    /// formats are returned as they are).
    pub fn to_int8(&self) -> crate::Result<Weight> {
        Ok(match self {
            Weight::Dense(t) => {
                let (rows, cols) = self.dims();
                let values = t.to_host()?.flatten_all()?.to_vec1::<f32>()?;
                Weight::Int8(Arc::new(Int8Matrix::quantize(&values, rows, cols)))
            }
            other => other.clone(),
        })
    }

    /// `[out_features, in_features]`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Weight::Int8(q) => q.dims(),
            Weight::Dense(t) => {
                let d = t.dims();
                (d[0], d[d.len() - 1])
            }
            Weight::Quantized(q) => q.dims(),
            Weight::Ggml(q) => {
                let d = q.shape().dims();
                (d[0], d[d.len() - 1])
            }
            Weight::GpuQuantized(q) => q.dims(),
            Weight::CudaQuantized(q) => q.dims(),
        }
    }

    /// The same weight as a plain f32 matrix in host memory (the reference path for quantized
    /// models); load-time formats only, not one already on a GPU.
    pub fn dequantized(&self) -> crate::Result<Weight> {
        let host = |values: Vec<f32>, dims: (usize, usize)| -> crate::Result<Weight> {
            Ok(Weight::Dense(
                candle_core::Tensor::from_vec(values, dims, &candle_core::Device::Cpu)?.into(),
            ))
        };
        match self {
            Weight::Dense(t) => Ok(Weight::Dense(t.clone())),
            Weight::Quantized(q) => host(q.dequantize(), q.dims()),
            Weight::Ggml(q) => Ok(Weight::Dense(q.dequantize(&q.device())?.into())),
            Weight::Int8(q) => host(q.dequantize(), q.dims()),
            Weight::GpuQuantized(_) | Weight::CudaQuantized(_) => Err(crate::Error::BadOperands {
                op: "linear",
                reason: "a weight on a GPU is dequantized before it is uploaded, not after".into(),
            }),
        }
    }
}

/// An activation fused into a [`Linear`] layer's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// No activation.
    None,
    /// GELU with the exact erf (BERT's `gelu`).
    GeluErf,
    /// SiLU (`x * sigmoid(x)`).
    Silu,
}

/// `y = activation(x W^T + b)`: one op, so that a backend can fuse bias and activation into the
/// matrix product's epilogue.
#[derive(Debug, Clone)]
pub struct Linear {
    /// The weight, `[out_features, in_features]`.
    pub weight: Weight,
    /// An optional bias, `[out_features]`.
    pub bias: Option<Tensor>,
    /// The activation applied last.
    pub activation: Activation,
    /// The CPU backend's packed form of a dense weight, made on first use (empty until then;
    /// `Default::default()` when a layer is built field by field). It remembers which tensor it
    /// was packed from, so a layer copied with another `weight` (`Linear { weight, ..layer }`)
    /// repacks instead of multiplying by stale panels.
    pub packed: PackedCache,
}

/// A dense weight packed for the CPU's own AVX-512 GEMM on the first product, with the id of
/// the candle tensor it came from. Clones share the panels.
#[derive(Debug, Default)]
pub struct PackedCache(Mutex<Option<(candle_core::TensorId, Arc<PackedF32>)>>);

impl Clone for PackedCache {
    fn clone(&self) -> Self {
        PackedCache(Mutex::new(self.slot().clone()))
    }
}

impl PackedCache {
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<(candle_core::TensorId, Arc<PackedF32>)>> {
        // The slot only ever holds a complete value: a panic elsewhere leaves it usable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The packed form of `w` (`[n, k]`), packing it on the first call and again whenever the
    /// cache holds another tensor's panels.
    pub(crate) fn get(
        &self,
        w: &candle_core::Tensor,
        pack: impl FnOnce() -> crate::Result<PackedF32>,
    ) -> crate::Result<Arc<PackedF32>> {
        if let Some((id, packed)) = self.slot().as_ref() {
            if *id == w.id() {
                return Ok(packed.clone());
            }
        }
        // Packed outside the lock; two threads may pack at once and one result is kept (they
        // are equal).
        let packed = Arc::new(pack()?);
        *self.slot() = Some((w.id(), packed.clone()));
        Ok(packed)
    }
}

impl Linear {
    /// A linear layer with no bias and no activation.
    pub fn new(weight: Weight) -> Self {
        Self {
            weight,
            bias: None,
            activation: Activation::None,
            packed: PackedCache::default(),
        }
    }

    /// The same layer with another weight (of the same shape, as the bias expects).
    pub fn with_weight(self, weight: Weight) -> Self {
        Self {
            weight,
            packed: PackedCache::default(),
            ..self
        }
    }

    /// The same layer with a bias.
    pub fn with_bias(mut self, bias: Tensor) -> Self {
        self.bias = Some(bias);
        self
    }

    /// One layer whose output is the concatenation of `layers`' outputs (all of the same input
    /// width, weight format and activation): several projections of one input in one product.
    pub fn stack(layers: &[Linear]) -> crate::Result<Linear> {
        let bad = |reason: &str| crate::Error::BadOperands {
            op: "linear",
            reason: reason.into(),
        };
        let first = layers.first().ok_or_else(|| bad("nothing to stack"))?;
        if layers
            .iter()
            .any(|l| l.activation != first.activation || l.bias.is_some() != first.bias.is_some())
        {
            return Err(bad("stacked layers differ in activation or bias"));
        }
        let weight = match &first.weight {
            Weight::Dense(_) => {
                let parts = layers
                    .iter()
                    .map(|l| match &l.weight {
                        Weight::Dense(t) => t.to_host(),
                        _ => Err(bad("cannot stack dense with quantized weights")),
                    })
                    .collect::<crate::Result<Vec<_>>>()?;
                Weight::Dense(candle_core::Tensor::cat(&parts, 0)?.into())
            }
            Weight::Quantized(_) => {
                let parts = layers
                    .iter()
                    .map(|l| match &l.weight {
                        Weight::Quantized(q) => Ok(q.as_ref()),
                        _ => Err(bad("cannot stack weights of different formats")),
                    })
                    .collect::<crate::Result<Vec<_>>>()?;
                let stacked = QuantMatrix::stack(&parts)
                    .ok_or_else(|| bad("quantized weights differ in format or width"))?;
                Weight::Quantized(Arc::new(stacked))
            }
            Weight::Ggml(_) | Weight::Int8(_) | Weight::GpuQuantized(_) | Weight::CudaQuantized(_) => {
                return Err(bad(
                    "stack weights on the host before quantizing or uploading them",
                ))
            }
        };
        let bias = match first.bias {
            Some(_) => {
                let parts = layers
                    .iter()
                    .filter_map(|l| l.bias.as_ref().map(Tensor::to_host))
                    .collect::<crate::Result<Vec<_>>>()?;
                Some(candle_core::Tensor::cat(&parts, 0)?.into())
            }
            None => None,
        };
        Ok(Linear {
            weight,
            bias,
            activation: first.activation,
            packed: PackedCache::default(),
        })
    }

    /// The same layer with an activation.
    pub fn with_activation(mut self, activation: Activation) -> Self {
        self.activation = activation;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize, seed: f32) -> Tensor {
        let values = (0..rows * cols).map(|i| (i as f32 * 0.37 + seed).sin()).collect();
        candle_core::Tensor::from_vec(values, (rows, cols), &candle_core::Device::Cpu)
            .unwrap()
            .into()
    }

    #[test]
    fn a_layer_copied_with_another_weight_does_not_use_the_old_panels() {
        let d = crate::Device::cpu();
        let x = matrix(5, 32, 0.5);
        let layer = Linear::new(Weight::Dense(matrix(48, 32, 1.0)));
        // The first product packs the weight (on AVX-512) into the layer's cache.
        d.linear(&x, &layer).unwrap();
        let copied = Linear {
            weight: Weight::Dense(matrix(48, 32, 2.0)),
            ..layer.clone()
        };
        let fresh = Linear::new(copied.weight.clone());
        let got = d.linear(&x, &copied).unwrap().to_host().unwrap();
        let want = d.linear(&x, &fresh).unwrap().to_host().unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }
}
