//! Keel's benchmarks: criterion benches in `benches/` (`cargo bench -p keel-benches`), and the
//! load-testing harness ([`harness`]), run as `keel bench SCENARIO` or `keel-harness SCENARIO`.
#![warn(missing_docs)]

pub mod harness;
