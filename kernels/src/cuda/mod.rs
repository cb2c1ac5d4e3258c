//! The CUDA backend: finding the NVIDIA libraries at run time, our kernels (`kernels/cuda/*.cu`)
//! compiled by NVRTC and cached on disk, and the execution path on a GPU ([`backend`]).
//!
//! cudarc loads `libcuda`, `libnvrtc` and `libcublas` with `dlopen` when first used (its
//! `dynamic-loading` feature), so a build needs no CUDA toolkit and a machine without a driver
//! runs everything else. cudarc panics when a library it reaches for is missing: every path
//! here checks presence first ([`probe`]) and turns absence into [`Error::NoSuchDevice`] naming
//! the library.

mod backend;

pub(crate) use backend::{Cuda, CudaKv, CudaTensor};
pub use backend::{CudaOptions, CudaQuantMatrix};

use crate::{DeviceKind, Error, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Our kernels, by file name: compiled at run time for the device's architecture.
pub const SOURCES: [(&str, &str); 5] = [
    ("attention.cu", include_str!("../../cuda/attention.cu")),
    ("elementwise.cu", include_str!("../../cuda/elementwise.cu")),
    ("norm.cu", include_str!("../../cuda/norm.cu")),
    ("qmatmul.cu", include_str!("../../cuda/qmatmul.cu")),
    ("rope.cu", include_str!("../../cuda/rope.cu")),
];

/// The kernels a source defines, by their `extern "C"` names.
pub fn entries(source: &str) -> impl Iterator<Item = &str> {
    source
        .split("extern \"C\" __global__ void ")
        .skip(1)
        .filter_map(|rest| rest.split('(').next())
}

/// One of the NVIDIA libraries the backend loads, and whether this machine has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Library {
    /// What it is for: "driver", "nvrtc", "cublas".
    pub role: &'static str,
    /// The file looked for (the first of the names the loader tries).
    pub file: String,
    /// Whether the dynamic loader found it.
    pub found: bool,
}

/// What [`probe`] found: the libraries, their versions, and the GPUs the driver sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// The driver, NVRTC and cuBLAS, found or not.
    pub libraries: Vec<Library>,
    /// The driver's CUDA version ("12.4"), where the driver was found and answers.
    pub driver_version: Option<String>,
    /// NVRTC's version ("12.9"), where it was found.
    pub nvrtc_version: Option<String>,
    /// The GPUs by name, or why there are none (no driver, `cuInit` failed, zero devices).
    pub devices: std::result::Result<Vec<String>, String>,
}

impl Probe {
    /// The libraries not found, by file name.
    pub fn missing(&self) -> Vec<&str> {
        self.libraries
            .iter()
            .filter(|l| !l.found)
            .map(|l| l.file.as_str())
            .collect()
    }
}

/// Looks for the NVIDIA libraries and, if the driver is there, for GPUs. Never panics: nothing
/// of cudarc is called before its library is known to load.
pub fn probe() -> Probe {
    // SAFETY: the is_culib_present functions only try to dlopen the library by its names.
    let (driver, nvrtc, cublas) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
            cudarc::cublas::sys::is_culib_present(),
        )
    };
    let library = |role, name: &str, found| Library {
        role,
        file: cudarc::get_lib_name_candidates(name)
            .into_iter()
            .next()
            .unwrap_or_else(|| name.to_string()),
        found,
    };
    let devices = if driver {
        gpus()
    } else {
        Err("no CUDA driver (libcuda) on this machine".into())
    };
    Probe {
        libraries: vec![
            library("driver", "cuda", driver),
            library("nvrtc", "nvrtc", nvrtc),
            library("cublas", "cublas", cublas),
        ],
        driver_version: driver.then(driver_version).flatten(),
        nvrtc_version: nvrtc.then(nvrtc_version).flatten(),
        devices,
    }
}

/// The GPUs the driver sees. Only called with the driver present.
fn gpus() -> std::result::Result<Vec<String>, String> {
    use cudarc::driver::result;
    result::init().map_err(|e| format!("cuInit failed: {e:?}"))?;
    let count = result::device::get_count().map_err(|e| format!("cuDeviceGetCount failed: {e:?}"))?;
    if count == 0 {
        return Err("the CUDA driver sees no GPU".into());
    }
    (0..count)
        .map(|i| {
            let dev = result::device::get(i).map_err(|e| format!("cuDeviceGet({i}) failed: {e:?}"))?;
            result::device::get_name(dev).map_err(|e| format!("cuDeviceGetName failed: {e:?}"))
        })
        .collect()
}

fn driver_version() -> Option<String> {
    let mut v = 0;
    // SAFETY: the driver library is present (checked by the caller); v is a valid out-pointer.
    let ok = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    (ok == cudarc::driver::sys::CUresult::CUDA_SUCCESS).then(|| format!("{}.{}", v / 1000, v % 1000 / 10))
}

fn nvrtc_version() -> Option<String> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the NVRTC library is present (checked by the caller); valid out-pointers.
    let ok = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    (ok == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS).then(|| format!("{major}.{minor}"))
}

/// Why [`crate::Device::new`] has no CUDA device here, in words a user can act on.
pub(crate) fn unavailable() -> Error {
    let p = probe();
    let missing = p.missing();
    let reason = if !missing.is_empty() {
        format!(
            "{} not found by the dynamic loader (install the NVIDIA driver, and NVRTC and cuBLAS of CUDA 12.4 or later, or put their folder on LD_LIBRARY_PATH)",
            missing.join(", ")
        )
    } else {
        match &p.devices {
            Err(why) => why.clone(),
            Ok(gpus) => format!("the driver sees {} GPU(s) but none opened", gpus.len()),
        }
    };
    Error::NoSuchDevice {
        kind: DeviceKind::Cuda,
        reason,
    }
}

/// A kernel source compiled to PTX, with what NVRTC said about it (empty: nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    /// The PTX text.
    pub ptx: String,
    /// NVRTC's log: warnings of a successful compile.
    pub log: String,
}

/// Compiles `source` (named `name` in diagnostics) to PTX for `arch` (a virtual architecture
/// such as "compute_80"), or says why not: NVRTC missing (`NoSuchDevice`), or the compile
/// error with its log (`Backend`).
pub fn compile_ptx(name: &str, source: &str, arch: &str) -> Result<Compiled> {
    use cudarc::nvrtc::result;
    use std::ffi::{CStr, CString};
    // SAFETY: only tries to dlopen the library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(unavailable());
    }
    let failed = |what: &str, e: result::NvrtcError| Error::Backend {
        kind: DeviceKind::Cuda,
        message: format!("NVRTC {what} of {name}: {e:?}"),
    };
    let text = |raw: Vec<std::ffi::c_char>| {
        // SAFETY: NVRTC writes a NUL-terminated string into the buffer it sized.
        unsafe { CStr::from_ptr(raw.as_ptr()) }
            .to_string_lossy()
            .trim()
            .to_string()
    };
    let src = CString::new(source).map_err(|_| Error::BadOperands {
        op: "compile_ptx",
        reason: format!("{name} holds a NUL byte"),
    })?;
    let c_name = CString::new(name).unwrap_or_default();
    let prog = result::create_program(&src, Some(&c_name)).map_err(|e| failed("create", e))?;
    let options = [format!("--gpu-architecture={arch}"), "--std=c++17".to_string()];
    // SAFETY: prog was created above and is destroyed once, at the end.
    let outcome = unsafe {
        let compiled = result::compile_program(prog, &options);
        let log = result::get_program_log(prog).map(text).unwrap_or_default();
        let ptx = compiled.and_then(|()| result::get_ptx(prog).map(text));
        let _ = result::destroy_program(prog);
        ptx.map(|ptx| Compiled {
            ptx,
            log: log.clone(),
        })
        .map_err(|e| (e, log))
    };
    outcome.map_err(|(e, log)| Error::Backend {
        kind: DeviceKind::Cuda,
        message: format!("NVRTC could not compile {name} for {arch} ({e:?}): {log}"),
    })
}

/// [`compile_ptx`] through a disk cache keyed by the sha256 of the source, the architecture and
/// NVRTC's version: `dir/<hash>.ptx`, written atomically (a temporary file renamed), so that
/// processes sharing the folder never read half a file. A compile with warnings is not cached.
pub fn compile_cached(dir: &Path, name: &str, source: &str, arch: &str) -> Result<String> {
    let key = {
        let mut h = Sha256::new();
        for part in [source, arch, &nvrtc_version().unwrap_or_default()] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        h.finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let path = dir.join(format!("{key}.ptx"));
    if let Ok(ptx) = std::fs::read_to_string(&path) {
        return Ok(ptx);
    }
    let compiled = compile_ptx(name, source, arch)?;
    if compiled.log.is_empty() {
        let io = |e: std::io::Error| Error::Backend {
            kind: DeviceKind::Cuda,
            message: format!("kernel cache {}: {e}", dir.display()),
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let tmp = dir.join(format!("{key}.{}.tmp", std::process::id()));
        std::fs::write(&tmp, &compiled.ptx).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
    }
    Ok(compiled.ptx)
}

/// Where compiled kernels are kept: `$KEEL_CUDA_CACHE`, else `$XDG_CACHE_HOME/keel/cuda`, else
/// `~/.cache/keel/cuda`, else the system's temporary folder.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KEEL_CUDA_CACHE") {
        return dir.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("keel").join("cuda")
}
