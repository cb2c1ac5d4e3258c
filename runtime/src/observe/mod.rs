//! Behaviour observability: drift of inputs and outputs against a reference profile, and
//! metrics in Prometheus text format.
//!
//! - [`stats`]: the statistics (PSI, Kolmogorov-Smirnov, Jensen-Shannon, Wasserstein-1,
//!   chi-square), exact and binned.
//! - [`Profile`]: a calibration set's inputs and outputs in fixed bins (`profile.json`).
//! - [`DriftMonitor`]: online windows judged against the profile (ok, warn, alarm).
//! - [`Observed`]: the layer that counts, times and watches every request, and exports it all;
//!   `MetricsServer` (feature `metrics-http`) serves the text on a local port.

mod drift;
#[cfg(feature = "metrics-http")]
mod http;
mod layer;
mod metrics;
mod profile;
pub mod stats;

pub use drift::{DriftConfig, DriftMonitor, OnChange, Signal, State, WindowReport, WindowSize};
#[cfg(feature = "metrics-http")]
pub use http::MetricsServer;
pub use layer::{DriftCallback, DriftState, Observed};
pub use metrics::{Metrics, MetricsBuilder, Sample, Samples};
pub use profile::{Categorical, Embedding, Numeric, Profile, ProfileBuilder, Projection, BINS, PROFILE_FILE};
