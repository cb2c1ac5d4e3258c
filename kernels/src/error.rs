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
    #[error("compute error: {}", one_line(.0))]
    Compute(#[from] candle_core::Error),
}

/// A candle error as one line: without the backtrace candle captures when `RUST_BACKTRACE` is
/// set (dozens of lines in what should be a message), its context and path kept.
pub fn one_line(e: &candle_core::Error) -> String {
    use candle_core::Error as E;
    let text = match e {
        E::WithBacktrace { inner, .. } => return one_line(inner),
        E::Context { inner, context } => format!("{context}: {}", one_line(inner)),
        E::WithPath { inner, path } => format!("{}: {}", path.display(), one_line(inner)),
        E::WrappedContext { wrapped, context } => format!("{context}: {wrapped}"),
        other => other.to_string(),
    };
    text.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The result type of every backend call.
pub type Result<T> = std::result::Result<T, Error>;
