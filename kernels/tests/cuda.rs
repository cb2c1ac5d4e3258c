//! The CUDA backend where there is no GPU (CI): asking for it is a clear `NoSuchDevice` naming
//! what is missing, never a panic; and every kernel of `kernels/cuda/` compiles under NVRTC to
//! PTX for sm_80 and sm_90 with no diagnostic at all (NVRTC needs no GPU).

use keel_kernels::cuda::{self, SOURCES};
use keel_kernels::{Device, DeviceKind, Error};
use std::path::PathBuf;

/// NVRTC from PyPI's nvidia-cuda-nvrtc-cu12, which scripts/setup-models.sh installs.
fn pip_nvrtc() -> PathBuf {
    std::env::var_os("KEEL_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.models/site"))
        .join("nvidia/cuda_nvrtc/lib")
}

#[test]
fn asking_for_cuda_is_no_such_device_naming_what_is_missing() {
    let probe = cuda::probe();
    // A GPU ordinal the driver does not have is the same error, whatever else is missing.
    let options = keel_kernels::CudaOptions {
        ordinal: 99,
        ..Default::default()
    };
    assert!(matches!(Device::cuda(&options), Err(Error::NoSuchDevice { .. })));
    if probe.missing().is_empty() && probe.devices.is_ok() {
        // A GPU machine: the device opens (the conformance suite and tests/gpu.rs use it).
        let device = Device::new(DeviceKind::Cuda).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("CUDA device: {}", device.caps().name);
        return;
    }
    let Err(Error::NoSuchDevice { kind, reason }) = Device::new(DeviceKind::Cuda) else {
        panic!("without a GPU, Device::new(Cuda) must be NoSuchDevice");
    };
    assert_eq!(kind, DeviceKind::Cuda);
    for lib in probe.libraries.iter().filter(|l| !l.found) {
        assert!(
            reason.contains(&lib.file),
            "{reason:?} does not name {}",
            lib.file
        );
    }
    if !probe.libraries[0].found {
        assert!(probe.devices.is_err());
        assert!(probe.driver_version.is_none());
    }
    // Without NVRTC on the loader's path, compiling is the same clear error, not cudarc's panic.
    if !probe.libraries[1].found {
        let e = cuda::compile_ptx("norm.cu", SOURCES[2].1, "compute_80").unwrap_err();
        assert!(matches!(e, Error::NoSuchDevice { .. }), "{e}");
    }
}

#[test]
fn every_kernel_compiles_under_nvrtc_for_sm80_and_sm90() {
    // The loader reads LD_LIBRARY_PATH when the process starts: the test runs itself again with
    // the pip package's folder on it.
    if std::env::var_os("KEEL_NVRTC_CHILD").is_none() {
        let lib = pip_nvrtc();
        assert!(
            lib.join("libnvrtc.so.12").is_file(),
            "NVRTC missing in {}: run scripts/setup-models.sh",
            lib.display()
        );
        let path = match std::env::var_os("LD_LIBRARY_PATH") {
            Some(p) => format!("{}:{}", lib.display(), p.to_string_lossy()),
            None => lib.display().to_string(),
        };
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "every_kernel_compiles_under_nvrtc_for_sm80_and_sm90",
                "--nocapture",
            ])
            .env("KEEL_NVRTC_CHILD", "1")
            .env("LD_LIBRARY_PATH", path)
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        println!("{stdout}");
        assert!(out.status.success(), "{stdout}\n{stderr}");
        assert!(stdout.contains("NVRTC"), "the child did not compile: {stdout}");
        return;
    }
    let probe = cuda::probe();
    let version = probe
        .nvrtc_version
        .clone()
        .expect("NVRTC on LD_LIBRARY_PATH answers its version");
    for (name, source) in SOURCES {
        // Every kernel the file defines, by its extern "C" name, must be an entry of the PTX.
        let entries: Vec<&str> = cuda::entries(source).collect();
        assert!(!entries.is_empty(), "{name} defines no kernel");
        for arch in ["compute_80", "compute_90"] {
            let compiled = cuda::compile_ptx(name, source, arch).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                compiled.log.is_empty(),
                "NVRTC {version} on {name} for {arch} said:\n{}",
                compiled.log
            );
            let target = format!(".target sm_{}", &arch["compute_".len()..]);
            assert!(compiled.ptx.contains(&target), "{name}: no {target}");
            for entry in &entries {
                assert!(
                    compiled.ptx.contains(&format!(".entry {entry}(")),
                    "{name} for {arch}: no entry {entry}"
                );
            }
        }
        println!(
            "NVRTC {version}: {name} ({}) compiled for sm_80 and sm_90",
            entries.join(", ")
        );
    }
    // The disk cache: the second compile of a source is read back, byte for byte.
    let dir = std::env::temp_dir().join(format!("keel-cuda-cache-{}", std::process::id()));
    let first = cuda::compile_cached(&dir, SOURCES[0].0, SOURCES[0].1, "compute_80").unwrap();
    let files = std::fs::read_dir(&dir).unwrap().count();
    let again = cuda::compile_cached(&dir, SOURCES[0].0, SOURCES[0].1, "compute_80").unwrap();
    assert_eq!((files, first == again), (1, true));
    std::fs::remove_dir_all(&dir).unwrap();
    // A broken source is an error with NVRTC's log, not a panic.
    let e = cuda::compile_ptx(
        "broken.cu",
        "extern \"C\" __global__ void f() { undefined_thing(); }",
        "compute_80",
    )
    .unwrap_err();
    assert!(e.to_string().contains("undefined_thing"), "{e}");
}
