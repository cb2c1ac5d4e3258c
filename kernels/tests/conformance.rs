//! The backend conformance suite: every op of a GPU backend against the CPU backend on random
//! inputs of several shapes (tile-size multiples and not), each with a stated tolerance. It runs
//! on each GPU backend, as the modules `wgpu::` and `cuda::`.
//!
//! wgpu needs a Vulkan (or Metal/DX12) adapter; on a machine without a GPU, Mesa's lavapipe is
//! one (`scripts/setup-system.sh` installs it), and without any adapter these tests fail and say
//! so. CUDA needs an NVIDIA GPU: where there is none, each `cuda::` test prints why and passes
//! without running (`scripts/gpu-check.sh` runs them where there is one).

use keel_kernels::{
    candle_core, Activation, CudaOptions, Device, DeviceKind, KvCache, Linear, QuantKind, QuantMatrix, Rope,
    Tensor, Weight, WgpuOptions,
};
use std::sync::{Arc, OnceLock};

/// Each test of the suite, run on the backend's device (or skipped where it has none).
macro_rules! suite {
    ($($test:ident),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                if let Some(device) = device() {
                    super::$test(device)
                }
            }
        )*
        #[test]
        fn linear_with_f16_weights() {
            if let Some(half) = f16_device() {
                super::linear_with_f16_weights(&half)
            }
        }
        #[test]
        fn steady_state_allocates_nothing() {
            if let Some(fresh) = fresh_device() {
                super::steady_state_allocates_nothing(&fresh)
            }
        }
    };
}

mod wgpu {
    use super::*;

    fn device() -> Option<&'static Device> {
        static GPU: OnceLock<Device> = OnceLock::new();
        Some(GPU.get_or_init(|| {
            Device::wgpu(&WgpuOptions::default()).unwrap_or_else(|e| {
                panic!("{e}\nThe conformance suite needs a wgpu adapter: install mesa-vulkan-drivers")
            })
        }))
    }

    fn f16_device() -> Option<Device> {
        let half = WgpuOptions {
            f16_weights: true,
            ..WgpuOptions::default()
        };
        Some(Device::wgpu(&half).unwrap())
    }

    /// A device of its own, so that the other tests' buffers are not counted.
    fn fresh_device() -> Option<Device> {
        Some(Device::wgpu(&WgpuOptions::default()).unwrap())
    }

    suite!(
        linear_dense_with_bias_and_activations,
        linear_quantized_matches_the_dequantized_weights,
        norms,
        packed_encoder_attention,
        causal_attention_prompt_then_steps_and_cache_copies,
        elementwise_gather_and_pooling,
        bad_operands_are_errors_not_panics,
    );
}

mod cuda {
    use super::*;

    /// The GPU, or None after saying why there is none (in the test's output); with
    /// `KEEL_REQUIRE_CUDA` set (scripts/gpu-check.sh), no GPU is a failure.
    fn open(options: &CudaOptions) -> Option<Device> {
        match Device::cuda(options) {
            Ok(d) => Some(d),
            Err(e) if std::env::var_os("KEEL_REQUIRE_CUDA").is_some() => panic!("{e}"),
            Err(e) => {
                eprintln!("skipped: {e}");
                None
            }
        }
    }

    fn device() -> Option<&'static Device> {
        static GPU: OnceLock<Option<Device>> = OnceLock::new();
        GPU.get_or_init(|| open(&CudaOptions::default())).as_ref()
    }

    fn f16_device() -> Option<Device> {
        open(&CudaOptions {
            f16_weights: true,
            ..CudaOptions::default()
        })
    }

    fn fresh_device() -> Option<Device> {
        open(&CudaOptions::default())
    }

    suite!(
        linear_dense_with_bias_and_activations,
        linear_quantized_matches_the_dequantized_weights,
        norms,
        packed_encoder_attention,
        causal_attention_prompt_then_steps_and_cache_copies,
        elementwise_gather_and_pooling,
        bad_operands_are_errors_not_panics,
    );
}

/// Deterministic values in [-scale, scale) (xorshift), so that a failure can be replayed.
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn host(data: Vec<f32>, dims: &[usize]) -> Tensor {
    candle_core::Tensor::from_vec(data, dims, &candle_core::Device::Cpu)
        .unwrap()
        .into()
}

/// The same tensor on the CPU and on the GPU.
fn pair(gpu: &Device, dims: &[usize], seed: u64, scale: f32) -> (Tensor, Tensor) {
    let t = host(values(dims.iter().product(), seed, scale), dims);
    let g = gpu.upload(&t).unwrap();
    (t, g)
}

/// Asserts `|gpu - cpu| <= tol * (1 + |cpu|)` elementwise (NaN fails) and equal shapes.
fn assert_close(what: &str, cpu: &Tensor, gpu: &Tensor, tol: f32) {
    assert_eq!(cpu.dims(), gpu.dims(), "{what}: shapes");
    let c = cpu
        .to_host()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let g = gpu
        .to_host()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut worst = 0f32;
    for (i, (a, b)) in c.iter().zip(&g).enumerate() {
        let err = (a - b).abs() / (1.0 + a.abs());
        assert!(
            err <= tol,
            "{what}: element {i}: cpu {a} gpu {b} (tolerance {tol})"
        );
        worst = worst.max(err);
    }
    eprintln!("{what}: worst relative error {worst:.2e}");
}

fn linear_dense_with_bias_and_activations(gpu: &Device) {
    let cpu = Device::cpu();
    // Tiles are 64x64x16: shapes below, at and above them, odd k (no vec4 loads) included.
    for (i, &(m, n, k)) in [
        (1, 1, 1),
        (3, 5, 7),
        (64, 64, 16),
        (65, 130, 33),
        (100, 70, 384),
        (2, 1152, 384),
    ]
    .iter()
    .enumerate()
    {
        for (j, act) in [Activation::None, Activation::GeluErf, Activation::Silu]
            .into_iter()
            .enumerate()
        {
            let seed = (i * 3 + j) as u64;
            let (x, xg) = pair(gpu, &[m, k], seed, 1.0);
            let w = host(values(n * k, seed + 100, 0.5), &[n, k]);
            let layer = Linear::new(Weight::Dense(w)).with_bias(host(values(n, seed + 200, 1.0), &[n]));
            let layer = layer.with_activation(act);
            let gpu_layer = gpu.upload_linear(&layer).unwrap();
            let want = cpu.linear(&x, &layer).unwrap();
            let got = gpu.linear(&xg, &gpu_layer).unwrap();
            // f32 sums of up to 384 products in another order; erf to 1.5e-7.
            assert_close(&format!("linear {m}x{n}x{k} {act:?}"), &want, &got, 1e-5);
        }
    }
    // Without a bias, and with a leading batch dimension.
    let (x, xg) = pair(gpu, &[2, 5, 40], 9, 1.0);
    let layer = Linear::new(Weight::Dense(host(values(24 * 40, 10, 0.5), &[24, 40])));
    let got = gpu.linear(&xg, &gpu.upload_linear(&layer).unwrap()).unwrap();
    assert_close("linear no bias", &cpu.linear(&x, &layer).unwrap(), &got, 1e-5);
}

fn linear_with_f16_weights(half: &Device) {
    let cpu = Device::cpu();
    for (i, &(m, n, k)) in [(1, 3, 4), (65, 130, 36), (7, 1536, 384)].iter().enumerate() {
        let x = host(values(m * k, i as u64, 1.0), &[m, k]);
        let w = host(values(n * k, i as u64 + 50, 0.5), &[n, k]);
        let layer = Linear::new(Weight::Dense(w.clone())).with_bias(host(values(n, 7, 1.0), &[n]));
        let gpu_layer = half.upload_linear(&layer).unwrap();
        let Weight::Dense(on_gpu) = &gpu_layer.weight else {
            panic!("a dense weight")
        };
        assert_eq!(on_gpu.dtype(), keel_kernels::DType::F16);
        // The reference: the CPU with the same weights rounded to f16 (and on CUDA, whose f16
        // product is cuBLAS's on two f16 operands, the input rounded too).
        let to_f16 = |t: &Tensor| -> Tensor {
            let rounded = t.to_host().unwrap().to_dtype(keel_kernels::DType::F16).unwrap();
            rounded.to_dtype(keel_kernels::DType::F32).unwrap().into()
        };
        let reference = Linear {
            weight: Weight::Dense(to_f16(&w)),
            ..layer.clone()
        };
        let x_ref = match half.caps().kind {
            DeviceKind::Cuda => to_f16(&x),
            _ => x.clone(),
        };
        let want = cpu.linear(&x_ref, &reference).unwrap();
        let got = half.linear(&half.upload(&x).unwrap(), &gpu_layer).unwrap();
        assert_close(&format!("f16 weights {m}x{n}x{k}"), &want, &got, 1e-5);
    }
}

/// GGML bytes of a random `rows x cols` matrix of `kind`.
fn quant_matrix(kind: QuantKind, rows: usize, cols: usize, seed: u64) -> QuantMatrix {
    let blocks = rows * cols / 32;
    let v = values(blocks * 40, seed, 1.0);
    let mut bytes = Vec::new();
    for b in 0..blocks {
        let r = &v[b * 40..];
        let d = half::f16::from_f32(0.02 + 0.05 * r[0].abs());
        bytes.extend(d.to_le_bytes());
        match kind {
            QuantKind::Q4_1 => {
                bytes.extend(half::f16::from_f32(r[1] * 0.5).to_le_bytes());
                bytes.extend((0..16).map(|i| ((r[2 + i] + 1.0) * 127.9) as u8));
            }
            QuantKind::Q8_0 => bytes.extend((0..32).map(|i| (r[2 + i] * 127.0) as i8 as u8)),
        }
    }
    QuantMatrix::from_ggml(kind, rows, cols, &bytes).unwrap()
}

fn linear_quantized_matches_the_dequantized_weights(gpu: &Device) {
    let cpu = Device::cpu();
    for kind in [QuantKind::Q4_1, QuantKind::Q8_0] {
        // Rows of x: one (decode), under, at and over the shader's 8-token tile.
        // More than 32768 rows spill into a second slab of the dispatch grid (a vocabulary).
        let shapes = [
            (1, 64, 96),
            (7, 33, 64),
            (8, 100, 256),
            (21, 576, 576),
            (3, 40000, 32),
        ];
        for (i, &(m, n, k)) in shapes.iter().enumerate() {
            let q = quant_matrix(kind, n, k, i as u64 + 7);
            let (x, xg) = pair(gpu, &[m, k], i as u64, 1.0);
            let layer = Linear::new(Weight::Quantized(Arc::new(q))).with_activation(Activation::Silu);
            let gpu_layer = gpu.upload_linear(&layer).unwrap();
            assert!(matches!(
                gpu_layer.weight,
                Weight::GpuQuantized(_) | Weight::CudaQuantized(_)
            ));
            // The CPU reference multiplies the dequantized weights in f32 (its own quantized
            // kernel also rounds the activations to 8 bits, which the shader does not).
            let reference = Linear {
                weight: layer.weight.dequantized().unwrap(),
                ..layer.clone()
            };
            let want = cpu.linear(&x, &reference).unwrap();
            let got = gpu.linear(&xg, &gpu_layer).unwrap();
            assert_close(&format!("{kind:?} linear {m}x{n}x{k}"), &want, &got, 1e-4);
        }
    }
}

fn norms(gpu: &Device) {
    let cpu = Device::cpu();
    for (i, &(rows, width)) in [(1, 1), (5, 7), (300, 384), (3, 1000)].iter().enumerate() {
        let seed = i as u64 * 10;
        let (x, xg) = pair(gpu, &[rows, width], seed, 2.0);
        let (r, rg) = pair(gpu, &[rows, width], seed + 1, 2.0);
        let (gamma, gammag) = pair(gpu, &[width], seed + 2, 1.0);
        let (beta, betag) = pair(gpu, &[width], seed + 3, 1.0);
        for residual in [false, true] {
            let (rc, rgpu) = if residual {
                (Some(&r), Some(&rg))
            } else {
                (None, None)
            };
            let want = cpu.add_layer_norm(&x, rc, &gamma, &beta, 1e-12).unwrap();
            let got = gpu.add_layer_norm(&xg, rgpu, &gammag, &betag, 1e-12).unwrap();
            assert_close(
                &format!("layer_norm {rows}x{width} residual={residual}"),
                &want,
                &got,
                1e-4,
            );
            let (want_sum, want) = cpu.add_rms_norm(&x, rc, &gamma, 1e-5).unwrap();
            let (got_sum, got) = gpu.add_rms_norm(&xg, rgpu, &gammag, 1e-5).unwrap();
            assert_close(
                &format!("rms_norm {rows}x{width} residual={residual}"),
                &want,
                &got,
                1e-4,
            );
            assert_close("rms_norm sum", &want_sum, &got_sum, 1e-6);
        }
        let want = cpu.l2_normalize(&x).unwrap();
        assert_close(
            &format!("l2_normalize {rows}x{width}"),
            &want,
            &gpu.l2_normalize(&xg).unwrap(),
            1e-5,
        );
    }
}

fn packed_encoder_attention(gpu: &Device) {
    let cpu = Device::cpu();
    // 70 keys cross the shader's 64-key chunks; MiniLM's shape (12 heads of 32) included.
    for &(heads, head_dim, ref lengths) in &[
        (1, 4, vec![1]),
        (2, 8, vec![5, 3]),
        (3, 16, vec![70, 1, 65]),
        (12, 32, vec![128, 40]),
    ] {
        let tokens: usize = lengths.iter().sum();
        let (qkv, qkvg) = pair(gpu, &[tokens, 3 * heads * head_dim], tokens as u64, 1.0);
        let want = cpu.encoder_attention(&qkv, lengths, heads).unwrap();
        let got = gpu.encoder_attention(&qkvg, lengths, heads).unwrap();
        assert_close(
            &format!("encoder attention {lengths:?} {heads}x{head_dim}"),
            &want,
            &got,
            1e-5,
        );
    }
}

fn causal_attention_prompt_then_steps_and_cache_copies(gpu: &Device) {
    let cpu = Device::cpu();
    // 9 query heads over 3 KV heads of 64, as SmolLM2; the prompt crosses a 64-key chunk.
    for &(heads, kv_heads, head_dim) in &[(6, 2, 8), (9, 3, 64)] {
        let rope = Rope::new(head_dim, 10000.0, 256);
        let width = (heads + 2 * kv_heads) * head_dim;
        let mut cpu_cache = KvCache::new(2, kv_heads, head_dim);
        let mut gpu_cache = gpu.new_kv_cache(2, kv_heads, head_dim).unwrap();
        let mut seed = 0;
        for t in [70, 1, 1, 3, 1] {
            seed += 1;
            for layer in 0..2 {
                let (qkv, qkvg) = pair(gpu, &[t, width], seed * 10 + layer as u64, 1.0);
                let want = cpu
                    .causal_attention(&qkv, heads, kv_heads, &rope, &mut cpu_cache, layer)
                    .unwrap();
                let got = gpu
                    .causal_attention(&qkvg, heads, kv_heads, &rope, &mut gpu_cache, layer)
                    .unwrap();
                let at = cpu_cache.len();
                assert_close(
                    &format!("causal attention {heads}/{kv_heads}x{head_dim} at {at}+{t}"),
                    &want,
                    &got,
                    1e-4,
                );
            }
            cpu_cache.commit(t);
            gpu_cache.commit(t);
        }
        // A copy of the cache (the prefix cache's) continues exactly as the original.
        let mut copy = gpu_cache.clone();
        let (qkv, qkvg) = pair(gpu, &[1, width], 999, 1.0);
        let want = gpu
            .causal_attention(&qkvg, heads, kv_heads, &rope, &mut gpu_cache, 0)
            .unwrap();
        let got = gpu
            .causal_attention(&qkvg, heads, kv_heads, &rope, &mut copy, 0)
            .unwrap();
        assert_close("cache copy", &want, &got, 0.0);
        let reference = cpu
            .causal_attention(&qkv, heads, kv_heads, &rope, &mut cpu_cache, 0)
            .unwrap();
        assert_close("cache copy vs cpu", &reference, &got, 1e-4);
    }
}

fn elementwise_gather_and_pooling(gpu: &Device) {
    let cpu = Device::cpu();
    for &(rows, width) in &[(1, 2), (7, 33), (300, 1536)] {
        let (x, xg) = pair(gpu, &[rows, 2 * width], rows as u64, 4.0);
        assert_close(
            &format!("swiglu {rows}x{width}"),
            &cpu.swiglu(&x).unwrap(),
            &gpu.swiglu(&xg).unwrap(),
            1e-5,
        );
        // Broadcasts: a row over a batch, a matrix over a batch of matrices.
        let (a, ag) = pair(gpu, &[3, rows, width], 1, 1.0);
        let (b, bg) = pair(gpu, &[1, width], 2, 1.0);
        assert_close(
            "add row",
            &cpu.add(&a, &b).unwrap(),
            &gpu.add(&ag, &bg).unwrap(),
            0.0,
        );
        let (b, bg) = pair(gpu, &[rows, width], 3, 1.0);
        assert_close(
            "add matrix",
            &cpu.add(&a, &b).unwrap(),
            &gpu.add(&ag, &bg).unwrap(),
            0.0,
        );
        // Row slices and concatenation are copies: exact.
        let start = rows / 2;
        let want = cpu.rows(&x, start, rows - start).unwrap();
        assert_close("rows", &want, &gpu.rows(&xg, start, rows - start).unwrap(), 0.0);
        let want = cpu.concat_rows(&[x.clone(), want]).unwrap();
        let got = gpu
            .concat_rows(&[xg.clone(), gpu.rows(&xg, start, rows - start).unwrap()])
            .unwrap();
        assert_close("concat_rows", &want, &got, 0.0);
    }
    let (table, tableg) = pair(gpu, &[50, 24], 4, 1.0);
    let ids: Vec<u32> = vec![0, 49, 7, 7, 13, 2];
    let want = cpu
        .embedding(&table, &cpu.tensor_u32(&ids, &[2, 3]).unwrap())
        .unwrap();
    let got = gpu
        .embedding(&tableg, &gpu.tensor_u32(&ids, &[2, 3]).unwrap())
        .unwrap();
    assert_close("embedding", &want, &got, 0.0);
    let (hidden, hiddeng) = pair(gpu, &[14, 40], 5, 1.0);
    let lengths = [9, 4, 1];
    let want = cpu.mean_pool(&hidden, &lengths).unwrap();
    let got = gpu.mean_pool(&hiddeng, &lengths).unwrap();
    assert_close("mean_pool", &want, &got, 1e-6);
}

fn bad_operands_are_errors_not_panics(gpu: &Device) {
    let (x, _) = pair(gpu, &[2, 3], 1, 1.0);
    // A CPU tensor given to the GPU, and a wrong shape.
    assert!(gpu.l2_normalize(&x).is_err());
    let (_, xg) = pair(gpu, &[2, 3], 1, 1.0);
    let layer = gpu
        .upload_linear(&Linear::new(Weight::Dense(host(values(8, 1, 1.0), &[2, 4]))))
        .unwrap();
    let err = gpu.linear(&xg, &layer).unwrap_err().to_string();
    assert!(err.contains("does not end in 4"), "{err}");
    // A padded [batch, len, width] batch is not the packed layout.
    let (_, padded) = pair(gpu, &[1, 2, 3], 1, 1.0);
    assert!(gpu.encoder_attention(&padded, &[2], 1).is_err());
    // Lengths that do not split the rows: too few, too many, an empty sequence.
    for lengths in [&[1][..], &[1, 2], &[2, 0]] {
        assert!(gpu.encoder_attention(&xg, lengths, 1).is_err());
        assert!(gpu.mean_pool(&xg, lengths).is_err());
        assert!(Device::cpu().mean_pool(&x, lengths).is_err());
    }
    assert!(gpu.tensor_f32(&[1.0, 2.0], &[3]).is_err());
}

/// After a first run, the same work again takes no new memory: wgpu creates no buffer, and
/// CUDA's pool reserves no more (its allocations are served from what it kept).
fn steady_state_allocates_nothing(dev: &Device) {
    let xg = dev.upload(&host(values(33 * 64, 1, 1.0), &[33, 64])).unwrap();
    let layer = Linear::new(Weight::Dense(host(values(64 * 64, 2, 0.5), &[64, 64])));
    let layer = dev.upload_linear(&layer).unwrap();
    let run = || {
        let y = dev.linear(&xg, &layer).unwrap();
        let y = dev.swiglu(&y).unwrap();
        dev.l2_normalize(&y).unwrap().to_vec2().unwrap()
    };
    let first = run();
    let before = dev.stats();
    for _ in 0..5 {
        assert_eq!(run(), first);
    }
    let after = dev.stats();
    match dev.caps().kind {
        DeviceKind::Cuda => assert_eq!(
            after.reserved_bytes, before.reserved_bytes,
            "{before:?} -> {after:?}"
        ),
        _ => assert_eq!(
            after.buffers_created, before.buffers_created,
            "{before:?} -> {after:?}"
        ),
    }
    assert!(after.dispatches > before.dispatches);
}

#[test]
fn best_device_prefers_cuda_and_skips_a_software_adapter() {
    // A software adapter (lavapipe) is preferred only where no GPU exists: then the CPU backend
    // is faster, and `best` picks it.
    let best = Device::best().caps().kind;
    if Device::new(DeviceKind::Cuda).is_ok() {
        assert_eq!(best, DeviceKind::Cuda);
        return;
    }
    let caps = Device::wgpu(&WgpuOptions::default()).unwrap().caps();
    eprintln!("adapter: {}", caps.name);
    let want = if caps.emulated {
        DeviceKind::Cpu
    } else {
        DeviceKind::Wgpu
    };
    assert_eq!(best, want);
}
