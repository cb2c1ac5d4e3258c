//! The CUDA execution path: the op set on one NVIDIA GPU.
//!
//! Everything a device does is queued on one stream, in order, so that no op needs a fence of
//! its own; reading a result back waits for it. Memory comes from a stream-ordered pool of the
//! device's own (`cuMemAllocFromPoolAsync`), told to keep what is freed (its release threshold is
//! raised to the maximum), so that a steady state of forwards reuses the same memory without
//! asking the driver for more.
//! Dense products go to cuBLAS (f32, or f16 weights with f32 sums), everything else to our
//! kernels of `kernels/cuda/`, compiled by NVRTC for the device's architecture when it opens.

use super::{cache_dir, compile_cached, unavailable, SOURCES};
use crate::backend::Backend;
use crate::decoder::{causal_head_dim, KvCache, KvStore, Rope};
use crate::linear::{Activation, Linear, Weight};
use crate::shapes::{self, HostValues};
use crate::tensor::{Repr, Tensor};
use crate::{Caps, DType, DeviceKind, DeviceStats, Error, QuantKind, QuantMatrix, Result};
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{result as drv, sys, CudaContext, CudaFunction, CudaStream};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// How to open the CUDA backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CudaOptions {
    /// Which GPU, by the driver's ordinal (0: the first).
    pub ordinal: usize,
    /// Keep dense weights as f16 on the device and multiply them with cuBLAS in f16 with f32
    /// sums (half the memory and bandwidth). Off by default: f32 weights give the CPU's numbers.
    pub f16_weights: bool,
}

impl CudaOptions {
    /// The options the environment sets: `KEEL_CUDA_DEVICE=ordinal`, `KEEL_CUDA_F16_WEIGHTS=1`.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Self {
            ordinal: var("KEEL_CUDA_DEVICE").and_then(|v| v.parse().ok()).unwrap_or(0),
            f16_weights: var("KEEL_CUDA_F16_WEIGHTS").is_some_and(|v| v != "0"),
        }
    }
}

/// Products with more rows than this dequantize a block-quantized weight and go to cuBLAS;
/// fewer (decode) run our kernel, which reads the quantized weight once for all rows.
const QMATMUL_MAX_ROWS: usize = 16;

/// Threads a block for the one-thread-an-element kernels and the row-wise norms.
const THREADS: u32 = 256;

fn driver(what: &str) -> impl Fn(drv::DriverError) -> Error + '_ {
    move |e| Error::Backend {
        kind: DeviceKind::Cuda,
        message: format!("{what}: {e:?}"),
    }
}

fn bad(op: &'static str, reason: String) -> Error {
    Error::BadOperands { op, reason }
}

/// What one device holds for all its tensors: the context, the stream every op is queued on,
/// cuBLAS, and our kernels.
struct Inner {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    functions: HashMap<&'static str, CudaFunction>,
    name: String,
    pool: sys::CUmemoryPool,
    allocations: AtomicU64,
    launches: AtomicU64,
    syncs: AtomicU64,
}

// SAFETY: `pool` is a handle the driver lets any thread use; the rest is Send + Sync.
unsafe impl Send for Inner {}
unsafe impl Sync for Inner {}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last buffer is gone (each holds the device): once its free has run, the pool goes.
        let _ = self.ctx.bind_to_thread();
        let _ = self.stream.synchronize();
        // SAFETY: the pool was created by this device and nothing allocates from it any more.
        let _ = unsafe { sys::cuMemPoolDestroy(self.pool) };
    }
}

/// Device memory that goes back to the device's pool, in stream order, when the last tensor
/// using it drops.
pub(crate) struct CudaBuffer {
    ptr: sys::CUdeviceptr,
    device: Arc<Inner>,
}

impl Drop for CudaBuffer {
    fn drop(&mut self) {
        // A tensor can be dropped on any thread: the free needs the context current there.
        let _ = self.device.ctx.bind_to_thread();
        // SAFETY: `ptr` came from the pool on this stream and is freed once, after every op that
        // used it (they were queued on the same stream before).
        let _ = unsafe { sys::cuMemFreeAsync(self.ptr, self.device.stream.cu_stream()) };
    }
}

/// A tensor in GPU memory: row-major values at `buf`'s start.
#[derive(Clone)]
pub(crate) struct CudaTensor {
    buf: Arc<CudaBuffer>,
    pub(crate) dims: Vec<usize>,
    pub(crate) dtype: DType,
}

impl fmt::Debug for CudaTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CudaTensor({:?}, {:?})", self.dims, self.dtype)
    }
}

fn elem_bytes(dtype: DType) -> usize {
    if dtype == DType::F16 {
        2
    } else {
        4
    }
}

impl CudaTensor {
    fn len(&self) -> usize {
        self.dims.iter().product()
    }

    fn bytes(&self) -> usize {
        self.len() * elem_bytes(self.dtype)
    }

    fn ptr(&self) -> u64 {
        self.buf.ptr
    }

    pub(crate) fn to_host(&self) -> Result<candle_core::Tensor> {
        let stream = &self.buf.device.stream;
        let mut bytes = vec![0u8; self.bytes()];
        if !bytes.is_empty() {
            stream
                .context()
                .bind_to_thread()
                .map_err(driver("binding the context"))?;
            // SAFETY: the buffer holds at least `bytes.len()` bytes; the copy is waited for below,
            // before `bytes` is read or dropped.
            unsafe { drv::memcpy_dtoh_async(&mut bytes, self.ptr(), stream.cu_stream()) }
                .and_then(|()| stream.synchronize())
                .map_err(driver("reading a result back"))?;
        }
        let host = candle_core::Device::Cpu;
        let dims = self.dims.as_slice();
        Ok(match self.dtype {
            DType::F16 => candle_core::Tensor::from_vec(
                bytemuck::pod_collect_to_vec::<u8, half::f16>(&bytes),
                dims,
                &host,
            )?,
            DType::U32 => {
                candle_core::Tensor::from_vec(bytemuck::pod_collect_to_vec::<u8, u32>(&bytes), dims, &host)?
            }
            _ => candle_core::Tensor::from_vec(bytemuck::pod_collect_to_vec::<u8, f32>(&bytes), dims, &host)?,
        })
    }
}

/// A Q4_1 or Q8_0 weight matrix on a CUDA device, in the layout of the wgpu backend's (per block,
/// the scale and minimum as two f32, and the values as 4 or 8 little-endian words).
pub struct CudaQuantMatrix {
    rows: usize,
    cols: usize,
    kind: QuantKind,
    scales: CudaTensor,
    quants: CudaTensor,
}

impl fmt::Debug for CudaQuantMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CudaQuantMatrix({:?}, {}x{})", self.kind, self.rows, self.cols)
    }
}

impl CudaQuantMatrix {
    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
}

/// One sequence's keys and values on the device: per layer, a key and a value buffer of
/// `capacity` rows, grown by doubling (a copy) when a step needs more.
pub(crate) struct CudaKv {
    cuda: Cuda,
    layers: Vec<(CudaTensor, CudaTensor)>,
    capacity: usize,
}

impl fmt::Debug for CudaKv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CudaKv({} layers, {} rows)", self.layers.len(), self.capacity)
    }
}

impl CudaKv {
    pub(crate) fn layers(&self) -> usize {
        self.layers.len()
    }

    pub(crate) fn bytes(&self) -> usize {
        self.layers.iter().map(|(k, v)| k.bytes() + v.bytes()).sum()
    }

    /// A copy holding the first `values` floats of every layer.
    pub(crate) fn duplicate(&self, values: usize) -> Result<CudaKv> {
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| {
                let copy = |t: &CudaTensor| -> Result<CudaTensor> {
                    let new = self.cuda.alloc(&t.dims, DType::F32)?;
                    self.cuda.copy(t, 0, &new, 0, values * 4)?;
                    Ok(new)
                };
                Ok((copy(k)?, copy(v)?))
            })
            .collect::<Result<_>>()?;
        Ok(CudaKv {
            cuda: self.cuda.clone(),
            layers,
            capacity: self.capacity,
        })
    }
}

/// A kernel argument: a device pointer, an unsigned or a float, as the kernel declares it.
#[derive(Clone, Copy)]
enum Arg {
    Ptr(u64),
    U32(u32),
    F32(f32),
}

fn ptr(t: &CudaTensor) -> Arg {
    Arg::Ptr(t.ptr())
}

fn u(v: usize) -> Arg {
    Arg::U32(v as u32)
}

fn act_code(a: Activation) -> u32 {
    match a {
        Activation::None => 0,
        Activation::GeluErf => 1,
        Activation::Silu => 2,
    }
}

/// The CUDA backend on one GPU. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Cuda {
    inner: Arc<Inner>,
    f16_weights: bool,
}

impl fmt::Debug for Cuda {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cuda({})", self.inner.name)
    }
}

fn wrap(t: CudaTensor) -> Tensor {
    Tensor(Repr::Cuda(t))
}

impl Cuda {
    /// Opens GPU `options.ordinal`: the libraries are checked first (cudarc panics on a missing
    /// one), then the context, stream, pool and cuBLAS are made and our kernels compiled.
    pub(crate) fn open(options: &CudaOptions) -> Result<Self> {
        let probe = super::probe();
        let gpus = match (&probe.devices, probe.missing().is_empty()) {
            (Ok(gpus), true) => gpus.len(),
            _ => return Err(unavailable()),
        };
        if options.ordinal >= gpus {
            return Err(Error::NoSuchDevice {
                kind: DeviceKind::Cuda,
                reason: format!("GPU {} asked for, the driver sees {gpus}", options.ordinal),
            });
        }
        let no_device = |what: &str| {
            let what = what.to_string();
            move |e: drv::DriverError| Error::NoSuchDevice {
                kind: DeviceKind::Cuda,
                reason: format!("{what}: {e:?}"),
            }
        };
        let ctx = CudaContext::new(options.ordinal).map_err(no_device("creating a context"))?;
        // One stream per device, and buffers of our own (not cudarc's slices): cudarc's event
        // tracking, for slices shared between streams, would only synchronize needlessly.
        // SAFETY: no cudarc slice is made; every buffer of this device is used on its one stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(driver("creating a stream"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(driver("reading the compute capability"))?;
        let name = ctx.name().map_err(driver("reading the device name"))?;
        let memory = ctx.total_mem().map_err(driver("reading the memory size"))?;
        let pool = create_pool(options.ordinal)?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| Error::Backend {
            kind: DeviceKind::Cuda,
            message: format!("creating a cuBLAS handle: {e:?}"),
        })?;
        let arch = format!("compute_{major}{minor}");
        let mut functions = HashMap::new();
        for (file, source) in SOURCES {
            let ptx = compile_cached(&cache_dir(), file, source, &arch)?;
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                .map_err(driver("loading a compiled kernel"))?;
            for entry in super::entries(source) {
                let f = module.load_function(entry).map_err(driver("finding a kernel"))?;
                functions.insert(entry, f);
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                ctx,
                stream,
                blas,
                functions,
                name: format!("{name} (sm_{major}{minor}, {} GiB)", memory >> 30),
                pool,
                allocations: AtomicU64::new(0),
                launches: AtomicU64::new(0),
                syncs: AtomicU64::new(0),
            }),
            f16_weights: options.f16_weights,
        })
    }

    fn bind(&self) -> Result<()> {
        self.inner
            .ctx
            .bind_to_thread()
            .map_err(driver("binding the context"))
    }

    fn alloc(&self, dims: &[usize], dtype: DType) -> Result<CudaTensor> {
        let len: usize = dims.iter().product();
        if len > u32::MAX as usize {
            return Err(bad("tensor", format!("{dims:?} holds more than 2^32 values")));
        }
        self.bind()?;
        let mut ptr = 0;
        // SAFETY: a valid out-pointer, the device's pool and stream; every kernel writes its
        // output before anything reads it.
        unsafe {
            sys::cuMemAllocFromPoolAsync(
                &mut ptr,
                len.max(1) * elem_bytes(dtype),
                self.inner.pool,
                self.inner.stream.cu_stream(),
            )
        }
        .result()
        .map_err(driver("allocating device memory"))?;
        self.inner.allocations.fetch_add(1, Ordering::Relaxed);
        Ok(CudaTensor {
            buf: Arc::new(CudaBuffer {
                ptr,
                device: self.inner.clone(),
            }),
            dims: dims.to_vec(),
            dtype,
        })
    }

    fn upload_bytes(&self, bytes: &[u8], dims: &[usize], dtype: DType) -> Result<CudaTensor> {
        let t = self.alloc(dims, dtype)?;
        if bytes.is_empty() {
            return Ok(t);
        }
        self.bind()?;
        // SAFETY: `t` holds `bytes.len()` bytes; a copy from pageable memory returns once the
        // bytes are staged, so `bytes` may be dropped after.
        unsafe { drv::memcpy_htod_async(t.ptr(), bytes, self.inner.stream.cu_stream()) }
            .map_err(driver("uploading"))?;
        Ok(t)
    }

    /// Copies `bytes` bytes from `src` at `src_at` to `dst` at `dst_at`, in stream order.
    fn copy(
        &self,
        src: &CudaTensor,
        src_at: usize,
        dst: &CudaTensor,
        dst_at: usize,
        bytes: usize,
    ) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: callers keep both ranges inside their buffers.
        unsafe {
            drv::memcpy_dtod_async(
                dst.ptr() + dst_at as u64,
                src.ptr() + src_at as u64,
                bytes,
                self.inner.stream.cu_stream(),
            )
        }
        .map_err(driver("copying on the device"))
    }

    /// Launches kernel `name` on `grid` blocks of `block` threads.
    fn launch(&self, name: &str, grid: (u32, u32, u32), block: u32, args: &[Arg]) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(()); // nothing to compute (an empty batch)
        }
        let f = self.inner.functions.get(name).ok_or_else(|| Error::Backend {
            kind: DeviceKind::Cuda,
            message: format!("no kernel {name}"),
        })?;
        let mut launch = self.inner.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::Ptr(p) => launch.arg(p),
                Arg::U32(v) => launch.arg(v),
                Arg::F32(v) => launch.arg(v),
            };
        }
        let config = LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        self.inner.launches.fetch_add(1, Ordering::Relaxed);
        // SAFETY: every kernel of kernels/cuda/ is called with the arguments its signature
        // declares (pointers as u64, unsigned as u32, float as f32), over buffers its callers
        // sized, and bounds-checks its own grid.
        unsafe { launch.launch(config) }
            .map(|_| ())
            .map_err(driver("launching a kernel"))
    }

    /// A one-thread-an-element kernel over `n` elements.
    fn launch_elements(&self, name: &str, n: usize, args: &[Arg]) -> Result<()> {
        self.launch(
            name,
            (n.div_ceil(THREADS as usize).max(1) as u32, 1, 1),
            THREADS,
            args,
        )
    }

    /// A dense weight in f32, or in f16 with the f16 option.
    fn upload_dense(&self, t: &Tensor) -> Result<Tensor> {
        let host = match &t.0 {
            Repr::Cpu(h) if self.f16_weights => h,
            _ => return self.upload(t),
        };
        let halves = host.flatten_all()?.to_dtype(DType::F16)?.to_vec1::<half::f16>()?;
        Ok(wrap(self.upload_bytes(
            bytemuck::cast_slice(&halves),
            host.dims(),
            DType::F16,
        )?))
    }

    fn upload_quant(&self, q: &QuantMatrix) -> Result<CudaQuantMatrix> {
        let (scales, quants) = q.gpu_layout();
        let (rows, cols) = q.dims();
        let blocks = rows * cols / crate::cpu::quant::BLOCK;
        Ok(CudaQuantMatrix {
            rows,
            cols,
            kind: q.kind(),
            scales: self.upload_bytes(bytemuck::cast_slice(&scales), &[blocks, 2], DType::F32)?,
            quants: self.upload_bytes(bytemuck::cast_slice(&quants), &[quants.len()], DType::U32)?,
        })
    }

    /// `y[m, n] = x[m, k] w[n, k]^T` by cuBLAS: column-major, that is `y^T = w x^T`, with `w`
    /// read transposed. An f16 `w` multiplies an f16 copy of `x`, adding in f32.
    fn gemm(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        y: &CudaTensor,
        (m, n, k): (usize, usize, usize),
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let dims = [n, m, k].map(|d| d as std::ffi::c_int);
        let (one, zero) = (1.0f32, 0.0f32);
        let t = blas_sys::cublasOperation_t::CUBLAS_OP_T;
        let no = blas_sys::cublasOperation_t::CUBLAS_OP_N;
        let handle = *self.inner.blas.handle();
        let x16 = match w.dtype {
            DType::F16 => {
                let x16 = self.alloc(&x.dims, DType::F16)?;
                self.launch_elements("to_f16", x.len(), &[ptr(x), ptr(&x16), u(x.len())])?;
                Some(x16)
            }
            _ => None,
        };
        self.bind()?;
        self.inner.launches.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the pointers are buffers of the sizes the dimensions say, on the handle's
        // stream; alpha and beta are host values that outlive the call.
        let done = unsafe {
            match &x16 {
                None => blas::sgemm(
                    handle,
                    t,
                    no,
                    dims[0],
                    dims[1],
                    dims[2],
                    &one,
                    w.ptr() as *const f32,
                    dims[2],
                    x.ptr() as *const f32,
                    dims[2],
                    &zero,
                    y.ptr() as *mut f32,
                    dims[0],
                ),
                Some(x16) => blas::gemm_ex(
                    handle,
                    t,
                    no,
                    dims[0],
                    dims[1],
                    dims[2],
                    (&one as *const f32).cast(),
                    w.ptr() as *const _,
                    blas_sys::cudaDataType::CUDA_R_16F,
                    dims[2],
                    x16.ptr() as *const _,
                    blas_sys::cudaDataType::CUDA_R_16F,
                    dims[2],
                    (&zero as *const f32).cast(),
                    y.ptr() as *mut _,
                    blas_sys::cudaDataType::CUDA_R_32F,
                    dims[0],
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                ),
            }
        };
        done.map_err(|e| Error::Backend {
            kind: DeviceKind::Cuda,
            message: format!("cuBLAS product {m}x{k} by {n}x{k}: {e:?}"),
        })
    }

    fn norm_operands<'a>(
        op: &'static str,
        x: &'a Tensor,
        residual: Option<&'a Tensor>,
        gamma: &'a Tensor,
    ) -> Result<(&'a CudaTensor, Option<&'a CudaTensor>, &'a CudaTensor, usize)> {
        let (x, gamma) = (x.cuda(op)?, gamma.cuda(op)?);
        let residual = residual.map(|r| r.cuda(op)).transpose()?;
        let width = shapes::norm(op, &x.dims, residual.map(|r| r.dims.as_slice()), &gamma.dims)?;
        Ok((x, residual, gamma, width))
    }

    /// Where each sequence of a packed batch starts, and where the last one ends.
    fn starts(&self, lengths: &[usize]) -> Result<CudaTensor> {
        let starts = shapes::starts(lengths);
        self.upload_bytes(bytemuck::cast_slice(&starts), &[starts.len()], DType::U32)
    }

    fn rope_tables(&self, rope: &Rope) -> Result<(CudaTensor, CudaTensor)> {
        if let Some(tables) = rope.cuda.get() {
            return Ok(tables.clone());
        }
        let upload = |v: &[f32]| self.upload_bytes(bytemuck::cast_slice(v), &[v.len()], DType::F32);
        let tables = (upload(&rope.cos)?, upload(&rope.sin)?);
        Ok(rope.cuda.get_or_init(|| tables).clone())
    }

    /// Makes room in every layer of `kv` for `rows` rows of `width` values, keeping `keep` rows.
    fn reserve(&self, kv: &mut CudaKv, rows: usize, keep: usize, width: usize) -> Result<()> {
        if rows <= kv.capacity {
            return Ok(());
        }
        let capacity = rows.max(2 * kv.capacity).max(16);
        for (k, v) in kv.layers.iter_mut() {
            for t in [k, v] {
                let grown = self.alloc(&[capacity, width], DType::F32)?;
                self.copy(t, 0, &grown, 0, keep * width * 4)?;
                *t = grown;
            }
        }
        kv.capacity = capacity;
        Ok(())
    }
}

impl Backend for Cuda {
    fn caps(&self) -> Caps {
        Caps {
            kind: DeviceKind::Cuda,
            name: self.inner.name.clone(),
            quantized_matmul: true,
            emulated: false,
        }
    }

    fn stats(&self) -> DeviceStats {
        let reserved = pool_attribute(
            self.inner.pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
        );
        DeviceStats {
            buffers_created: self.inner.allocations.load(Ordering::Relaxed),
            submits: self.inner.syncs.load(Ordering::Relaxed),
            dispatches: self.inner.launches.load(Ordering::Relaxed),
            reserved_bytes: reserved,
        }
    }

    fn synchronize(&self) -> Result<()> {
        self.inner.syncs.fetch_add(1, Ordering::Relaxed);
        self.inner.stream.synchronize().map_err(driver("synchronizing"))
    }

    fn upload(&self, t: &Tensor) -> Result<Tensor> {
        let host = match &t.0 {
            Repr::Cuda(_) => return Ok(t.clone()),
            Repr::Wgpu(_) => return Err(bad("upload", "the tensor lives on a wgpu device".into())),
            Repr::Cpu(h) => h,
        };
        let values = HostValues::of(host)?;
        Ok(wrap(self.upload_bytes(
            values.bytes(),
            host.dims(),
            values.dtype(),
        )?))
    }

    fn upload_linear(&self, layer: &Linear) -> Result<Linear> {
        let weight = match &layer.weight {
            Weight::Dense(t) => Weight::Dense(self.upload_dense(t)?),
            Weight::Quantized(q) => Weight::CudaQuantized(Arc::new(self.upload_quant(q)?)),
            Weight::CudaQuantized(q) => Weight::CudaQuantized(q.clone()),
            Weight::GpuQuantized(_) => {
                return Err(bad("upload_linear", "the weight lives on a wgpu device".into()))
            }
            // No int8 or other GGML kernels here: their values, dequantized, run as f32 (or f16).
            other @ (Weight::Int8(_) | Weight::Ggml(_)) => match other.dequantized()? {
                Weight::Dense(t) => Weight::Dense(self.upload_dense(&t)?),
                _ => unreachable!("dequantized() returns a dense weight"),
            },
        };
        Ok(Linear {
            weight,
            bias: layer.bias.as_ref().map(|b| self.upload(b)).transpose()?,
            activation: layer.activation,
            packed: Default::default(),
        })
    }

    fn tensor_f32(&self, data: &[f32], dims: &[usize]) -> Result<Tensor> {
        Ok(wrap(self.upload_bytes(
            bytemuck::cast_slice(data),
            dims,
            DType::F32,
        )?))
    }

    fn tensor_u32(&self, data: &[u32], dims: &[usize]) -> Result<Tensor> {
        Ok(wrap(self.upload_bytes(
            bytemuck::cast_slice(data),
            dims,
            DType::U32,
        )?))
    }

    fn linear(&self, x: &Tensor, layer: &Linear) -> Result<Tensor> {
        let x = x.cuda("linear")?;
        let (n, k) = layer.weight.dims();
        if x.dims.last() != Some(&k) || k == 0 {
            return Err(bad("linear", format!("input {:?} does not end in {k}", x.dims)));
        }
        let m = x.len() / k;
        let mut dims = x.dims.clone();
        *dims.last_mut().expect("checked above") = n;
        let y = self.alloc(&dims, DType::F32)?;
        let bias = layer.bias.as_ref().map(|b| b.cuda("linear")).transpose()?;
        if bias.is_some_and(|b| b.len() != n) {
            return Err(bad(
                "linear",
                format!("a bias of {:?} for {n} outputs", bias.map(|b| &b.dims)),
            ));
        }
        let act = act_code(layer.activation);
        let has_bias = bias.is_some() as u32;
        let epilogue = |y: &CudaTensor| -> Result<()> {
            if has_bias == 0 && act == 0 {
                return Ok(());
            }
            self.launch_elements(
                "bias_activation",
                y.len(),
                &[
                    ptr(y),
                    Arg::Ptr(bias.map_or(y.ptr(), CudaTensor::ptr)),
                    u(y.len()),
                    u(n),
                    Arg::U32(has_bias),
                    Arg::U32(act),
                ],
            )
        };
        match &layer.weight {
            Weight::Dense(w) => {
                self.gemm(x, w.cuda("linear")?, &y, (m, n, k))?;
                epilogue(&y)?;
            }
            Weight::CudaQuantized(q) if m > QMATMUL_MAX_ROWS => {
                let w = self.alloc(&[n, k], DType::F32)?;
                let blocks = n * k / crate::cpu::quant::BLOCK;
                self.launch_elements(
                    "dequantize",
                    blocks,
                    &[
                        ptr(&q.scales),
                        ptr(&q.quants),
                        ptr(&w),
                        u(blocks),
                        Arg::U32(quant_code(q.kind)),
                    ],
                )?;
                self.gemm(x, &w, &y, (m, n, k))?;
                epilogue(&y)?;
            }
            Weight::CudaQuantized(q) => {
                // 8 warps a block, a row of w each, by 4 rows of x (blockIdx.y).
                self.launch(
                    "qmatmul",
                    (n.div_ceil(8) as u32, m.div_ceil(4) as u32, 1),
                    THREADS,
                    &[
                        ptr(x),
                        ptr(&q.scales),
                        ptr(&q.quants),
                        Arg::Ptr(bias.map_or(x.ptr(), CudaTensor::ptr)),
                        ptr(&y),
                        u(m),
                        u(n),
                        u(k / crate::cpu::quant::BLOCK),
                        Arg::U32(quant_code(q.kind)),
                        Arg::U32(has_bias),
                        Arg::U32(act),
                    ],
                )?;
            }
            _ => {
                return Err(bad(
                    "linear",
                    "the weight is not on the CUDA device (Device::upload_linear)".into(),
                ))
            }
        }
        Ok(wrap(y))
    }

    fn add_layer_norm(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
    ) -> Result<Tensor> {
        let (x, residual, gamma, width) = Self::norm_operands("add_layer_norm", x, residual, gamma)?;
        let beta = beta.cuda("add_layer_norm")?;
        if beta.dims != [width] {
            return Err(bad("add_layer_norm", format!("beta {:?}", beta.dims)));
        }
        let out = self.alloc(&x.dims, DType::F32)?;
        let rows = x.len() / width;
        self.launch(
            "add_layer_norm",
            (rows as u32, 1, 1),
            THREADS,
            &[
                ptr(x),
                ptr(residual.unwrap_or(x)),
                ptr(gamma),
                ptr(beta),
                ptr(&out),
                u(width),
                Arg::U32(residual.is_some() as u32),
                Arg::F32(eps),
            ],
        )?;
        Ok(wrap(out))
    }

    fn add_rms_norm(
        &self,
        x_t: &Tensor,
        residual: Option<&Tensor>,
        gamma: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor)> {
        let (x, residual, gamma, width) = Self::norm_operands("rms_norm", x_t, residual, gamma)?;
        let out = self.alloc(&x.dims, DType::F32)?;
        // Without a residual the sum is x itself; the kernel then writes nothing to `sum`.
        let sum = residual.map(|_| self.alloc(&x.dims, DType::F32)).transpose()?;
        let rows = x.len() / width;
        self.launch(
            "add_rms_norm",
            (rows as u32, 1, 1),
            THREADS,
            &[
                ptr(x),
                ptr(residual.unwrap_or(x)),
                ptr(gamma),
                ptr(sum.as_ref().unwrap_or(&out)),
                ptr(&out),
                u(width),
                Arg::U32(residual.is_some() as u32),
                Arg::F32(eps),
            ],
        )?;
        let sum = sum.map_or_else(|| x_t.clone(), wrap);
        Ok((sum, wrap(out)))
    }

    fn encoder_attention(&self, qkv: &Tensor, lengths: &[usize], heads: usize) -> Result<Tensor> {
        let qkv = qkv.cuda("attention")?;
        let (tokens, width, head_dim) = shapes::encoder_attention(&qkv.dims, lengths, heads)?;
        let width3 = 3 * width;
        let starts = self.starts(lengths)?;
        let out = self.alloc(&[tokens, width], DType::F32)?;
        let longest = lengths.iter().max().copied().unwrap_or(0);
        let b = ptr(qkv);
        self.launch(
            "attention",
            (longest as u32, heads as u32, lengths.len() as u32),
            64,
            &[
                b,
                b,
                b,
                ptr(&starts),
                ptr(&out),
                u(1),
                u(head_dim),
                u(0),
                u(width3),
                u(width3),
                u(width3),
                u(width),
                u(0),
                u(width),
                u(2 * width),
                u(0),
                Arg::F32(1.0 / (head_dim as f32).sqrt()),
            ],
        )?;
        Ok(wrap(out))
    }

    fn new_kv_cache(&self, layers: usize, kv_heads: usize, head_dim: usize) -> Result<KvCache> {
        let width = kv_heads * head_dim;
        let empty = || self.alloc(&[0, width], DType::F32);
        let layers = (0..layers)
            .map(|_| Ok((empty()?, empty()?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache::on_device(
            KvStore::Cuda(CudaKv {
                cuda: self.clone(),
                layers,
                capacity: 0,
            }),
            width,
        ))
    }

    fn causal_attention(
        &self,
        qkv: &Tensor,
        heads: usize,
        kv_heads: usize,
        rope: &Rope,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let qkv = qkv.cuda("attention")?;
        let head_dim = causal_head_dim(&qkv.dims, heads, kv_heads, rope, cache, layer)?;
        let (t, width, pos0, kv_width) = (qkv.dims[0], qkv.dims[1], cache.len(), cache.width);
        let KvStore::Cuda(kv) = &mut cache.store else {
            return Err(bad("attention", "the KV cache is not on the CUDA device".into()));
        };
        if head_dim > 256 {
            return Err(bad(
                "attention",
                format!("heads of {head_dim} (the kernel holds 256)"),
            ));
        }
        // Every layer grows together, on the first layer of the step.
        self.reserve(kv, pos0 + t, pos0, kv_width)?;
        let (keys, values) = &kv.layers[layer];
        let (cos, sin) = self.rope_tables(rope)?;
        let q_width = heads * head_dim;
        let q = self.alloc(&[t, q_width], DType::F32)?;
        self.launch_elements(
            "rope_append",
            t * width / 2,
            &[
                ptr(qkv),
                ptr(&cos),
                ptr(&sin),
                ptr(&q),
                ptr(keys),
                ptr(values),
                u(t),
                u(pos0),
                u(heads),
                u(kv_heads),
                u(head_dim),
            ],
        )?;
        let out = self.alloc(&[t, q_width], DType::F32)?;
        self.launch(
            "attention",
            (t as u32, heads as u32, 1),
            64,
            &[
                ptr(&q),
                ptr(keys),
                ptr(values),
                ptr(&q),
                ptr(&out),
                u(heads / kv_heads),
                u(head_dim),
                u(1),
                u(q_width),
                u(kv_width),
                u(kv_width),
                u(q_width),
                u(0),
                u(0),
                u(0),
                u(pos0),
                Arg::F32(1.0 / (head_dim as f32).sqrt()),
            ],
        )?;
        Ok(wrap(out))
    }

    fn swiglu(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.cuda("swiglu")?;
        let dims = shapes::swiglu(&x.dims)?;
        let width = 2 * dims.last().expect("swiglu keeps the rank");
        let out = self.alloc(&dims, DType::F32)?;
        self.launch_elements(
            "swiglu",
            out.len(),
            &[ptr(x), ptr(&out), u(out.len()), u(width / 2)],
        )?;
        Ok(wrap(out))
    }

    fn embedding(&self, table: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let (table, ids) = (table.cuda("embedding")?, ids.cuda("embedding")?);
        let (rows, width, dims) = shapes::embedding(&table.dims, &ids.dims, ids.dtype)?;
        let out = self.alloc(&dims, DType::F32)?;
        self.launch_elements(
            "embedding",
            out.len(),
            &[ptr(table), ptr(ids), ptr(&out), u(out.len()), u(width), u(rows)],
        )?;
        Ok(wrap(out))
    }

    fn mean_pool(&self, hidden: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let hidden = hidden.cuda("mean_pool")?;
        let width = shapes::mean_pool(&hidden.dims, lengths)?;
        let batch = lengths.len();
        let starts = self.starts(lengths)?;
        let out = self.alloc(&[batch, width], DType::F32)?;
        self.launch_elements(
            "mean_pool",
            batch * width,
            &[ptr(hidden), ptr(&starts), ptr(&out), u(batch), u(width)],
        )?;
        Ok(wrap(out))
    }

    fn l2_normalize(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.cuda("l2_normalize")?;
        let width = shapes::l2_normalize(&x.dims)?;
        let out = self.alloc(&x.dims, DType::F32)?;
        let rows = x.len() / width;
        self.launch(
            "l2_normalize",
            (rows as u32, 1, 1),
            THREADS,
            &[ptr(x), ptr(&out), u(width)],
        )?;
        Ok(wrap(out))
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (a, b) = (a.cuda("add")?, b.cuda("add")?);
        shapes::broadcast(&a.dims, &b.dims)?;
        let out = self.alloc(&a.dims, DType::F32)?;
        self.launch_elements(
            "add",
            a.len(),
            &[ptr(a), ptr(b), ptr(&out), u(a.len()), u(b.len())],
        )?;
        Ok(wrap(out))
    }

    fn rows(&self, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        let x = x.cuda("rows")?;
        let dims = shapes::rows(&x.dims, start, len)?;
        let row = x.dims[1..].iter().product::<usize>() * elem_bytes(x.dtype);
        let out = self.alloc(&dims, x.dtype)?;
        self.copy(x, start * row, &out, 0, len * row)?;
        Ok(wrap(out))
    }

    fn concat_rows(&self, parts: &[Tensor]) -> Result<Tensor> {
        let parts = parts
            .iter()
            .map(|p| p.cuda("concat_rows"))
            .collect::<Result<Vec<_>>>()?;
        let shapes: Vec<_> = parts.iter().map(|p| (p.dims.as_slice(), p.dtype)).collect();
        let dims = shapes::concat_rows(&shapes)?;
        let out = self.alloc(&dims, parts[0].dtype)?;
        let mut at = 0;
        for p in &parts {
            self.copy(p, 0, &out, at, p.bytes())?;
            at += p.bytes();
        }
        Ok(wrap(out))
    }
}

fn quant_code(kind: QuantKind) -> u32 {
    match kind {
        QuantKind::Q4_1 => 0,
        QuantKind::Q8_0 => 1,
    }
}

/// A stream-ordered memory pool on GPU `ordinal`, the device's own (so that its counters are
/// this device's), set to keep freed memory for the next allocation instead of returning it to
/// the driver at each synchronization (the default).
fn create_pool(ordinal: usize) -> Result<sys::CUmemoryPool> {
    let mut pool = std::ptr::null_mut();
    let mut keep = u64::MAX;
    // SAFETY: zeroed props are valid (no handle types, no Win32 attributes, no size limit); valid
    // out-pointer and attribute value of the type the attribute takes (u64).
    unsafe {
        let mut props: sys::CUmemPoolProps = std::mem::zeroed();
        props.allocType = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        props.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        props.location.id = ordinal as i32;
        sys::cuMemPoolCreate(&mut pool, &props).result().and_then(|()| {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut keep as *mut u64).cast(),
            )
            .result()
        })
    }
    .map_err(driver("creating the memory pool"))?;
    Ok(pool)
}

fn pool_attribute(pool: sys::CUmemoryPool, attribute: sys::CUmemPool_attribute) -> u64 {
    let mut value = 0u64;
    // SAFETY: valid out-pointer of the type these attributes take (u64).
    let _ = unsafe { sys::cuMemPoolGetAttribute(pool, attribute, (&mut value as *mut u64).cast()) };
    value
}
