//! Keel's backend layer: the small op set every model needs, behind one [`Device`].
//!
//! Models are written once against the methods of [`Device`]; each backend implements them its own
//! way (the CPU on candle-core tensors and our own GEMMs, wgpu on WGSL shaders, CUDA on cuBLAS and
//! our kernels compiled by NVRTC). The op set is
//! chosen at a granularity that lets a backend fuse: [`Linear`] carries its bias and activation,
//! [`Device::add_layer_norm`] adds the residual and normalizes in one call, and attention
//! (with rotary embeddings and the KV cache, for decoders) is one op.
//!
//! ```
//! use keel_kernels::{Device, DeviceKind};
//! let cpu = Device::new(DeviceKind::Cpu).unwrap();
//! assert_eq!(cpu.caps().kind, DeviceKind::Cpu);
//! // A backend that is not compiled in, or finds no device, says so instead of panicking.
//! assert!(Device::new(DeviceKind::Cuda).is_err());
//! ```
#![warn(missing_docs)]

mod backend;
mod cpu;
pub mod cuda;
mod decoder;
mod device;
mod error;
mod linear;
mod shapes;
mod tensor;
mod wgpu;

pub use candle_core::DType;
pub use cpu::gemm::{set_dense_gemm, DenseGemm};
pub use cpu::int8::Int8Matrix;
pub use cpu::quant::{QuantKind, QuantMatrix};
pub use cuda::{CudaOptions, CudaQuantMatrix};
pub use decoder::{KvCache, Rope};
pub use device::{Caps, Device, DeviceKind, WgpuOptions};
pub use error::{one_line, Error, Result};
pub use linear::{Activation, Linear, PackedCache, Weight};
pub use tensor::Tensor;
pub use wgpu::{DeviceStats, GpuQuantMatrix};

/// Re-exported so that model code can name candle types (shapes, quantized tensors) without a
/// dependency of its own that could drift from ours.
pub use candle_core;
