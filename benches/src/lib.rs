//! Keel's criterion benches live in `benches/` (`cargo bench -p keel-benches`).
