//! An idle engine uses no CPU: its scheduler threads sleep on condition variables (no thread
//! spins waiting for work). Alone in its own test binary, so that no other test's work is counted.

mod common;
use common::*;
use keel::{Engine, GenerateParams};
use std::time::Duration;

/// CPU time (user + system) of this whole process so far, from /proc/self/stat, in clock ticks
/// (1/100 s on Linux).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn an_idle_engine_uses_no_cpu() {
    let engine = Engine::builder().build().unwrap();
    let minilm = engine.load(minilm_dir()).unwrap().to_string();
    let smollm = engine.load(smollm2_gguf()).unwrap().to_string();
    // Every thread has started and worked once.
    engine.embed(&minilm, &["warm up", "the threads"]).unwrap();
    engine
        .generate(&smollm, "Hi", &GenerateParams::greedy().max_tokens(4))
        .unwrap()
        .complete()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_ticks();
    std::thread::sleep(Duration::from_secs(5));
    let used = cpu_ticks() - before;
    eprintln!("CPU time of the idle engine over 5 s: {} ms", used * 10);
    // 5 s of one spinning thread would be 500 ticks; allow 5 (50 ms) for the test's own noise.
    assert!(used <= 5, "the idle engine used {} ms of CPU in 5 s", used * 10);
}
