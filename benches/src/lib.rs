//! Keel's benchmarks: criterion benches in `benches/` (`cargo bench -p keel-benches`), and the
//! load-testing harness ([`harness`]), run as `keel bench SCENARIO` or `keel-harness SCENARIO`;
//! [`workloads`] holds the timed calls that the harness and `compare_keel` share.
#![warn(missing_docs)]

pub mod harness;
pub mod workloads;
