//! Behaviour observability: drift of inputs and outputs against a reference profile, and
//! metrics in Prometheus text format.

pub mod stats;
