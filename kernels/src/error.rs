use crate::DeviceKind;

/// What can go wrong inside a backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backend is not compiled in, or it found no usable device.
    #[error("no such device: {kind} ({reason})")]
    NoSuchDevice {
        /// The backend that was asked for.
        kind: DeviceKind,
        /// Why it is not available, in words a user can act on.
        reason: String,
    },
    /// The backend exists but does not implement this op (see [`crate::Device::supports`]).
    #[error("the {kind} backend does not support {op}")]
    Unsupported {
        /// The backend.
        kind: DeviceKind,
        /// The op, by name.
        op: &'static str,
    },
    /// Shapes or dtypes that the op cannot take.
    #[error("bad operands for {op}: {reason}")]
    BadOperands {
        /// The op, by name.
        op: &'static str,
        /// What is wrong with them.
        reason: String,
    },
    /// The device failed while running work (a driver error, lost device, out of memory).
    #[error("{kind} device error: {message}")]
    Backend {
        /// The backend.
        kind: DeviceKind,
        /// What the driver said.
        message: String,
    },
    /// An error raised by the tensor library underneath (candle).
    #[error("compute error: {0}")]
    Compute(#[from] candle_core::Error),
}

/// The result type of every backend call.
pub type Result<T> = std::result::Result<T, Error>;
