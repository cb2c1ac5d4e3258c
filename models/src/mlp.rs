//! A tabular classifier: standardization, then dense layers with ReLU between them, then a
//! softmax. Written for models like `examples/models/breast-cancer-mlp` (PyTorch `nn.Linear`
//! layers saved to safetensors).
//!
//! The tensors, by name: `scaler.mean` and `scaler.scale` (`[features]`: x' = (x - mean) / scale),
//! then `layers.0.weight` (`[out, in]`), `layers.0.bias`, `layers.1.weight`, ... The last layer's
//! outputs are the classes' logits.
//!
//! It runs on the host whatever the engine's device: a forward pass is a few thousand
//! multiply-adds, less than one upload to a GPU would cost.

use crate::weights::SafetensorsFile;
use crate::{Error, Result};
use std::path::Path;

/// One dense layer, row-major `[out, in]` as PyTorch stores it.
struct Dense {
    weight: Vec<f32>,
    bias: Vec<f32>,
    inputs: usize,
}

/// A loaded tabular classifier.
pub struct Mlp {
    mean: Vec<f32>,
    scale: Vec<f32>,
    layers: Vec<Dense>,
}

impl Mlp {
    /// Loads the classifier from a safetensors file.
    ///
    /// # Errors
    /// A missing or misshapen tensor, a zero in `scaler.scale`, no layers, non-finite weights.
    pub fn load(path: &Path) -> Result<Self> {
        let file = SafetensorsFile::open(path)?;
        let vector = |name: &str| -> Result<Vec<f32>> {
            let (_, shape) = file
                .info(name)
                .ok_or_else(|| Error::Weights(format!("{} has no tensor '{name}'", path.display())))?;
            Ok(file
                .tensor(name, &shape)?
                .to_host()?
                .flatten_all()?
                .to_vec1::<f32>()?)
        };
        let mean = vector("scaler.mean")?;
        let scale = vector("scaler.scale")?;
        if scale.len() != mean.len() || scale.contains(&0.0) {
            return Err(Error::Weights(format!(
                "'scaler.scale' must have {} non-zero values",
                mean.len()
            )));
        }
        let mut layers = Vec::new();
        let mut inputs = mean.len();
        while let Some((_, shape)) = file.info(&format!("layers.{}.weight", layers.len())) {
            let i = layers.len();
            let [outputs, width] = shape[..] else {
                return Err(Error::Weights(format!("'layers.{i}.weight' must be a matrix")));
            };
            if width != inputs {
                return Err(Error::Weights(format!(
                    "'layers.{i}.weight' takes {width} inputs where the layer before gives {inputs}"
                )));
            }
            let weight = file
                .tensor(&format!("layers.{i}.weight"), &shape)?
                .to_host()?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let bias = file
                .tensor(&format!("layers.{i}.bias"), &[outputs])?
                .to_host()?
                .to_vec1::<f32>()?;
            layers.push(Dense { weight, bias, inputs });
            inputs = outputs;
        }
        if layers.is_empty() {
            return Err(Error::Weights(format!(
                "{} has no 'layers.0.weight'",
                path.display()
            )));
        }
        Ok(Self { mean, scale, layers })
    }

    /// How many features a row has.
    pub fn features(&self) -> usize {
        self.mean.len()
    }

    /// How many classes it tells apart.
    pub fn classes(&self) -> usize {
        self.layers.last().map_or(0, |l| l.bias.len())
    }

    /// The class probabilities of one row of [`Mlp::features`] values.
    ///
    /// # Errors
    /// A row of the wrong length.
    pub fn probabilities(&self, row: &[f32]) -> Result<Vec<f32>> {
        if row.len() != self.features() {
            return Err(Error::EmptyInput(format!(
                "a row has {} values; the model takes {}",
                row.len(),
                self.features()
            )));
        }
        let mut x: Vec<f32> = row
            .iter()
            .zip(self.mean.iter().zip(&self.scale))
            .map(|(v, (m, s))| (v - m) / s)
            .collect();
        for (i, layer) in self.layers.iter().enumerate() {
            let mut y = layer.bias.clone();
            for (out, w) in y.iter_mut().zip(layer.weight.chunks_exact(layer.inputs)) {
                *out += w.iter().zip(&x).map(|(a, b)| a * b).sum::<f32>();
            }
            if i + 1 < self.layers.len() {
                y.iter_mut().for_each(|v| *v = v.max(0.0));
            }
            x = y;
        }
        softmax(&mut x);
        Ok(x)
    }
}

fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    x.iter_mut().for_each(|v| *v /= sum);
}
