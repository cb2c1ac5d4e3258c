//! Integration tests live beside this crate in `tests/`.
