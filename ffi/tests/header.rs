//! include/keel.h is generated from the crate by cbindgen and committed: this test regenerates it
//! and fails on any difference. `KEEL_BLESS=1` writes the regenerated header over the committed
//! one instead; `KEEL_HEADER_OUT=PATH` writes it to PATH (scripts/test-ffi.sh diffs that).

use std::path::PathBuf;

#[test]
fn header_is_up_to_date() {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let header = crate_dir.join("../include/keel.h");
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).unwrap();
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen failed to read ffi/src")
        .write(&mut generated);
    let generated = String::from_utf8(generated).unwrap();
    if let Some(out) = std::env::var_os("KEEL_HEADER_OUT") {
        std::fs::write(out, &generated).unwrap();
        return;
    }
    if std::env::var_os("KEEL_BLESS").is_some() {
        std::fs::create_dir_all(header.parent().unwrap()).unwrap();
        std::fs::write(&header, &generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&header).unwrap_or_default();
    if committed != generated {
        let fresh = std::env::temp_dir().join("keel.h.generated");
        std::fs::write(&fresh, &generated).unwrap();
        let line = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| committed.lines().count().min(generated.lines().count()));
        panic!(
            "include/keel.h is not what cbindgen makes of ffi/src (first difference at line {}); \
             the generated one is in {}: diff them, then regenerate with \
             `KEEL_BLESS=1 cargo test --release -p keel-ffi --test header`",
            line + 1,
            fresh.display()
        );
    }
}
