//! `keel devices`: what this build and machine offer, and why a device is missing.

use keel::{Device, DeviceKind};

/// Prints the CPU's features, the wgpu adapters and what CUDA found (text, or one JSON object).
pub(crate) fn devices(json: bool) -> Result<(), Box<dyn std::error::Error>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let features = Device::cpu_features();
    let adapters = Device::wgpu_adapters();
    let wgpu = Device::new(DeviceKind::Wgpu).map(|d| d.caps());
    let cuda = keel::cuda::probe();
    // Opening compiles the kernels (from the disk cache after the first time).
    let cuda_open = Device::new(DeviceKind::Cuda).map(|d| d.caps().name);
    let cuda_error = cuda_open.as_ref().err().map(|e| e.to_string());
    if json {
        let out = serde_json::json!({
            "cpu": {"arch": std::env::consts::ARCH, "threads": threads, "features": features},
            "wgpu": {
                "adapters": adapters,
                "opens": wgpu.as_ref().ok().map(|c| serde_json::json!({"name": c.name, "emulated": c.emulated})),
                "error": wgpu.as_ref().err().map(|e| e.to_string()),
            },
            "cuda": {
                "available": cuda_error.is_none(),
                "opens": cuda_open.as_ref().ok(),
                "error": cuda_error,
                "libraries": cuda.libraries.iter().map(|l| serde_json::json!({"role": l.role, "file": l.file, "found": l.found})).collect::<Vec<_>>(),
                "driver_version": cuda.driver_version,
                "nvrtc_version": cuda.nvrtc_version,
                "devices": cuda.devices.as_ref().ok(),
                "devices_error": cuda.devices.as_ref().err(),
            },
        });
        println!("{out}");
        return Ok(());
    }
    println!(
        "cpu: {}, {threads} threads; {}",
        std::env::consts::ARCH,
        features.join(" ")
    );
    match &wgpu {
        Ok(c) => println!(
            "wgpu: opens {}{}",
            c.name,
            if c.emulated {
                " (a software driver: no faster than the cpu backend)"
            } else {
                ""
            }
        ),
        Err(e) => println!("wgpu: {e}"),
    }
    for a in &adapters {
        println!("  adapter: {a}");
    }
    match &cuda_error {
        None => println!("cuda: opens {}", cuda_open.as_deref().unwrap_or_default()),
        Some(e) => println!("cuda: {e}"),
    }
    for l in &cuda.libraries {
        let version = match l.role {
            "driver" => cuda.driver_version.as_deref(),
            "nvrtc" => cuda.nvrtc_version.as_deref(),
            _ => None,
        };
        let found = if l.found { "found" } else { "not found" };
        println!(
            "  {} ({}): {found}{}",
            l.role,
            l.file,
            version.map(|v| format!(", CUDA {v}")).unwrap_or_default()
        );
    }
    match &cuda.devices {
        Ok(gpus) => gpus
            .iter()
            .enumerate()
            .for_each(|(i, g)| println!("  gpu {i}: {g}")),
        Err(why) => println!("  gpus: none ({why})"),
    }
    Ok(())
}
