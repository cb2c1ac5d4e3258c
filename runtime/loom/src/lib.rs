//! The runtime's scheduler queue (`runtime/src/scheduler/queue.rs`), compiled on its own with
//! `cfg(loom)` so that its tests run every interleaving under loom's model checker (the
//! `loom_model` tests in that file). A crate of its own so that loom's models replace the queue's
//! `Mutex`/`Condvar` here without touching the runtime's build.

// The queue and request types are compiled here only for their loom tests.
#![allow(dead_code)]

#[path = "../../src/scheduler/queue.rs"]
mod queue;
#[path = "../../src/request.rs"]
mod request;
