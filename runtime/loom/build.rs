//! `cfg(loom)` for this crate only: the queue it compiles takes loom's `Mutex`/`Condvar`, while
//! every other crate of the workspace keeps std's.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(loom)");
    println!("cargo::rustc-cfg=loom");
}
