//! Bad input of every kind gets a clear, typed error: never a panic, never a hang.

mod common;
use common::*;
use keel::{Engine, Error, ErrorKind, GenerateParams};
use keel_models::Error as ModelError;
use std::path::Path;

fn engine() -> Engine {
    Engine::builder().build().unwrap()
}

/// A folder holding the MiniLM files as symlinks (cheap), where a test can replace one.
fn minilm_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::os::unix::fs::symlink(minilm_dir().join(f), dir.path().join(f)).unwrap();
    }
    dir
}

fn write_truncated(from: &Path, to: &Path, len: usize) {
    let bytes = std::fs::read(from).unwrap();
    std::fs::write(to, &bytes[..len]).unwrap();
}

#[test]
fn missing_path() {
    let err = engine().load("/no/such/model").unwrap_err();
    assert!(matches!(err, Error::NotAModel { .. }), "{err}");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let dir = tempfile::tempdir().unwrap();
    let err = engine().load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("keel.toml"), "{err}");
}

#[test]
fn truncated_and_corrupt_safetensors() {
    let dir = minilm_copy();
    let weights = dir.path().join("model.safetensors");
    std::fs::remove_file(&weights).unwrap();
    write_truncated(&minilm_dir().join("model.safetensors"), &weights, 1 << 20);
    let err = engine().load(dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Model(ModelError::Format {
                format: "safetensors",
                ..
            })
        ),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::InvalidModel);

    std::fs::write(&weights, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a header").unwrap();
    let err = engine().load(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Model(ModelError::Format { .. })), "{err}");
    std::fs::write(&weights, b"").unwrap();
    assert!(matches!(
        engine().load(dir.path()).unwrap_err(),
        Error::Model(ModelError::Format { .. })
    ));
}

#[test]
fn truncated_and_corrupt_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.gguf");
    // Cut inside the tensor data: the header parses, a tensor runs past the end of the file.
    write_truncated(&smollm2_gguf(), &path, 40 << 20);
    let err = engine().load(&path).unwrap_err();
    assert!(
        matches!(err, Error::Model(ModelError::Format { format: "GGUF", .. })),
        "{err}"
    );
    // Cut inside the header.
    write_truncated(&smollm2_gguf(), &path, 100_000);
    let err = engine().load(&path).unwrap_err();
    assert!(
        matches!(err, Error::Model(ModelError::Format { format: "GGUF", .. })),
        "{err}"
    );
    std::fs::write(&path, b"GGUF but not really").unwrap();
    assert!(matches!(
        engine().load(&path).unwrap_err(),
        Error::Model(ModelError::Format { .. })
    ));
}

#[test]
fn checksum_mismatch_is_refused() {
    let dir = minilm_copy();
    let manifest = keel::inspect(&minilm_dir()).unwrap().manifest;
    std::fs::write(dir.path().join("keel.toml"), manifest.to_toml()).unwrap();
    // The manifest as derived loads, and the same bytes get the same version id.
    let engine = engine();
    assert_eq!(
        engine.load(dir.path()).unwrap(),
        engine.load(minilm_dir()).unwrap()
    );

    let mut tampered = manifest.clone();
    tampered.files[0].sha256 = "0".repeat(64);
    std::fs::write(dir.path().join("keel.toml"), tampered.to_toml()).unwrap();
    let err = engine.load(dir.path()).unwrap_err();
    assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
    assert!(err.to_string().contains("refusing"), "{err}");
}

#[test]
fn bad_manifests() {
    let dir = minilm_copy();
    let manifest = keel::inspect(&minilm_dir()).unwrap().manifest;
    let mut escaping = manifest.clone();
    escaping.files[0].path = "../../etc/passwd".into();
    escaping.weights = "../../etc/passwd".into();
    std::fs::write(dir.path().join("keel.toml"), escaping.to_toml()).unwrap();
    assert!(matches!(
        engine().load(dir.path()).unwrap_err(),
        Error::Manifest { .. }
    ));
    std::fs::write(dir.path().join("keel.toml"), "name = 3\n").unwrap();
    assert!(matches!(
        engine().load(dir.path()).unwrap_err(),
        Error::Manifest { .. }
    ));
}

#[test]
fn unknown_architecture() {
    let dir = minilm_copy();
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
    let err = engine().load(dir.path()).unwrap_err();
    assert!(
        matches!(err, Error::Model(ModelError::UnknownArchitecture(ref a)) if a == "gpt2"),
        "{err}"
    );

    // A GGUF of another architecture.
    use keel_kernels::candle_core::quantized::gguf_file::{write, Value};
    let path = dir.path().join("other.gguf");
    let mut file = std::fs::File::create(&path).unwrap();
    write(
        &mut file,
        &[("general.architecture", &Value::String("mamba".into()))],
        &[],
    )
    .unwrap();
    drop(file);
    let err = engine().load(&path).unwrap_err();
    assert!(
        matches!(err, Error::Model(ModelError::UnknownArchitecture(ref a)) if a == "mamba"),
        "{err}"
    );
}

#[test]
fn empty_text_invalid_utf8_and_wrong_model() {
    let engine = engine();
    let minilm = engine.load(minilm_dir()).unwrap().to_string();
    for texts in [&[][..], &[""][..], &["fine", "   "][..]] {
        let err = engine.embed(&minilm, texts).unwrap_err();
        assert!(matches!(err, Error::Model(ModelError::EmptyInput(_))), "{err}");
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }
    let err = engine.embed_bytes(&minilm, &[b"ok", b"caf\xc3"]).unwrap_err();
    assert!(
        matches!(err, Error::Model(ModelError::InvalidUtf8 { valid_up_to: 3 })),
        "{err}"
    );
    assert_eq!(
        engine
            .embed_bytes(&minilm, &[b"caf\xc3\xa9"])
            .unwrap()
            .vectors
            .len(),
        1
    );

    assert!(matches!(
        engine.embed("nope", &["x"]).unwrap_err(),
        Error::UnknownModel(_)
    ));
    let err = engine
        .generate(&minilm, "hi", &GenerateParams::greedy())
        .err()
        .unwrap();
    assert!(matches!(err, Error::WrongTask { .. }), "{err}");
}

#[test]
fn prompts_that_do_not_fit_or_are_empty() {
    let engine = engine();
    let smol = engine.load(smollm2_gguf()).unwrap().to_string();
    let long = "word ".repeat(9000);
    let err = engine
        .generate(&smol, &long, &GenerateParams::greedy())
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            Error::Model(ModelError::ContextOverflow { context: 8192, .. })
        ),
        "{err}"
    );
    let err = engine
        .generate(&smol, "", &GenerateParams::greedy())
        .err()
        .unwrap();
    assert!(matches!(err, Error::Model(ModelError::EmptyInput(_))), "{err}");
    let err = engine
        .generate(&smol, "hi", &GenerateParams::sampled(f32::NAN, 0, 1.0, 1))
        .err()
        .unwrap();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    let minilm = engine.load(minilm_dir()).unwrap();
    assert!(matches!(
        engine.embed(&smol, &["x"]).unwrap_err(),
        Error::WrongTask { .. }
    ));
    // A very long text for the encoder is truncated to its trained length, not refused.
    assert_eq!(engine.embed(minilm.as_str(), &[&long]).unwrap().vectors.len(), 1);
}

#[test]
fn devices_that_are_not_there() {
    // CUDA, where there is none (CI; on a GPU machine tests/gpu.rs's cuda:: tests run instead).
    if let Err(err) = Engine::builder().device(keel::DeviceKind::Cuda).build() {
        assert_eq!(err.kind(), ErrorKind::NoDevice, "{err}");
        assert!(err.to_string().contains("no such device"), "{err}");
    }
    // An adapter by a name no adapter has: the error lists the ones there are.
    let options = keel_kernels::WgpuOptions {
        adapter: Some("no-such-adapter".into()),
        ..Default::default()
    };
    let err = keel::Error::from(keel_kernels::Device::wgpu(&options).unwrap_err());
    assert_eq!(err.kind(), ErrorKind::NoDevice, "{err}");
    assert!(
        err.to_string().contains("no adapter matches 'no-such-adapter'"),
        "{err}"
    );
}

#[test]
fn int8_weights_on_a_gguf_and_an_empty_manifest_say_what_to_do() {
    let options = keel::LoadOptions {
        weights: keel::WeightPath::Int8,
    };
    let e = engine().load_with(smollm2_gguf(), options).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.to_string().contains("use quantized"), "{e}");

    let dir = minilm_copy();
    std::fs::write(dir.path().join("keel.toml"), "").unwrap();
    let e = engine().load(dir.path()).unwrap_err();
    assert!(e.to_string().contains("keel inspect --write-manifest"), "{e}");
    std::fs::write(dir.path().join("keel.toml"), "name = [").unwrap();
    let e = engine().load(dir.path()).unwrap_err();
    assert!(e.to_string().contains("keel inspect --write-manifest"), "{e}");
    assert_eq!(e.to_string().lines().count(), 1, "{e}");
    // What --write-manifest writes (derived, whatever keel.toml holds) loads, as that version.
    let derived = keel::manifest::ModelSource::derive(dir.path()).unwrap();
    std::fs::write(dir.path().join("keel.toml"), derived.manifest.to_toml()).unwrap();
    assert_eq!(engine().load(dir.path()).unwrap(), derived.version_id());
}

#[test]
fn weights_with_a_nan_are_refused_at_load() {
    let dir = minilm_copy();
    let weights = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(minilm_dir().join("model.safetensors")).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    // One f32 of a LayerNorm becomes a quiet NaN.
    let table: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header]).unwrap();
    let start = table["embeddings.LayerNorm.bias"]["data_offsets"][0]
        .as_u64()
        .unwrap() as usize;
    let at = 8 + header + start + 4 * 10;
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::remove_file(&weights).unwrap();
    std::fs::write(&weights, bytes).unwrap();
    let e = engine().load(dir.path()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidModel, "{e}");
    assert!(e.to_string().contains("non-finite"), "{e}");
}
