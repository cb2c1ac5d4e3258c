use candle_core::quantized::{QMatMul, QTensor};
use candle_core::Tensor;
use std::sync::Arc;

/// The weight of a linear layer, `[out_features, in_features]` like PyTorch's `nn.Linear`.
#[derive(Debug, Clone)]
pub enum Weight {
    /// A plain (f32) matrix.
    Dense(Tensor),
    /// A block-quantized matrix (Q4_1, Q8_0, ...), multiplied without dequantizing it first.
    Quantized(Arc<QTensor>),
}

impl Weight {
    /// `[out_features, in_features]`.
    pub fn dims(&self) -> (usize, usize) {
        let dims = match self {
            Weight::Dense(t) => t.dims(),
            Weight::Quantized(q) => q.shape().dims(),
        };
        (dims[0], dims[dims.len() - 1])
    }

    /// The same weight as a plain f32 matrix (the reference path for quantized models).
    pub fn dequantized(&self) -> crate::Result<Weight> {
        Ok(match self {
            Weight::Dense(t) => Weight::Dense(t.clone()),
            Weight::Quantized(q) => Weight::Dense(q.dequantize(&q.device())?),
        })
    }

    pub(crate) fn matmul(&self) -> QMatMul {
        match self {
            Weight::Dense(t) => QMatMul::Tensor(t.clone()),
            Weight::Quantized(q) => QMatMul::QTensor(q.clone()),
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
}

impl Linear {
    /// A linear layer with no bias and no activation.
    pub fn new(weight: Weight) -> Self {
        Self {
            weight,
            bias: None,
            activation: Activation::None,
        }
    }

    /// The same layer with a bias.
    pub fn with_bias(mut self, bias: Tensor) -> Self {
        self.bias = Some(bias);
        self
    }

    /// The same layer with an activation.
    pub fn with_activation(mut self, activation: Activation) -> Self {
        self.activation = activation;
        self
    }
}
