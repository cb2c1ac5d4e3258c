//! [`Tensor`]: values that live on one device.

use crate::cuda::CudaTensor;
use crate::wgpu::GpuTensor;
use crate::{DType, DeviceKind, Error, Result};

/// A tensor on one device: a candle tensor in host memory for the CPU backend, a buffer in GPU
/// memory for wgpu or CUDA. Model code passes tensors between [`crate::Device`] ops and reads results
/// back with [`Tensor::to_host`]; it never looks inside. Cheap to clone (the storage is shared).
#[derive(Debug, Clone)]
pub struct Tensor(pub(crate) Repr);

#[derive(Debug, Clone)]
pub(crate) enum Repr {
    Cpu(candle_core::Tensor),
    Wgpu(GpuTensor),
    Cuda(CudaTensor),
}

impl From<candle_core::Tensor> for Tensor {
    /// A host tensor, which the CPU backend uses where it lies (see [`crate::Device::upload`]).
    fn from(t: candle_core::Tensor) -> Self {
        Tensor(Repr::Cpu(t))
    }
}

impl Tensor {
    /// The shape.
    pub fn dims(&self) -> &[usize] {
        match &self.0 {
            Repr::Cpu(t) => t.dims(),
            Repr::Wgpu(t) => &t.dims,
            Repr::Cuda(t) => &t.dims,
        }
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        match &self.0 {
            Repr::Cpu(t) => t.dtype(),
            Repr::Wgpu(t) => t.dtype,
            Repr::Cuda(t) => t.dtype,
        }
    }

    /// The device the values live on.
    pub fn device_kind(&self) -> DeviceKind {
        match &self.0 {
            Repr::Cpu(_) => DeviceKind::Cpu,
            Repr::Wgpu(_) => DeviceKind::Wgpu,
            Repr::Cuda(_) => DeviceKind::Cuda,
        }
    }

    /// A copy in host memory (waits for the device to finish the work that computes it).
    pub fn to_host(&self) -> Result<candle_core::Tensor> {
        match &self.0 {
            Repr::Cpu(t) => Ok(t.clone()),
            Repr::Wgpu(t) => t.to_host(),
            Repr::Cuda(t) => t.to_host(),
        }
    }

    /// The values of a 1-D f32 tensor.
    pub fn to_vec1(&self) -> Result<Vec<f32>> {
        Ok(self.to_host()?.to_dtype(DType::F32)?.to_vec1()?)
    }

    /// The rows of a 2-D f32 tensor.
    pub fn to_vec2(&self) -> Result<Vec<Vec<f32>>> {
        Ok(self.to_host()?.to_dtype(DType::F32)?.to_vec2()?)
    }

    /// The candle tensor of a CPU tensor; `op` names the caller in the error otherwise.
    pub(crate) fn cpu(&self, op: &'static str) -> Result<&candle_core::Tensor> {
        match &self.0 {
            Repr::Cpu(t) => Ok(t),
            _ => Err(other_device(op, self.device_kind())),
        }
    }

    /// The buffer of a wgpu tensor; `op` names the caller in the error otherwise.
    pub(crate) fn gpu(&self, op: &'static str) -> Result<&GpuTensor> {
        match &self.0 {
            Repr::Wgpu(t) => Ok(t),
            _ => Err(other_device(op, self.device_kind())),
        }
    }

    /// The buffer of a CUDA tensor; `op` names the caller in the error otherwise.
    pub(crate) fn cuda(&self, op: &'static str) -> Result<&CudaTensor> {
        match &self.0 {
            Repr::Cuda(t) => Ok(t),
            _ => Err(other_device(op, self.device_kind())),
        }
    }

    /// Number of elements.
    pub fn elem_count(&self) -> usize {
        self.dims().iter().product()
    }
}

fn other_device(op: &'static str, found: DeviceKind) -> Error {
    Error::BadOperands {
        op,
        reason: format!("an operand lives on the {found} device; upload it first (Device::upload)"),
    }
}
