//! One wgpu device and what Keel keeps beside it: compiled pipelines, a pool of buffers, and the
//! commands recorded since the last submit.
//!
//! Ops do not submit: each records a dispatch (or a copy) into the pending list, with its
//! parameters in a host-side arena that is written to one uniform buffer right before the submit.
//! A submit happens when a result is read back (or on [`Context::flush`]), so a forward pass is
//! one submission. Buffers come from a pool keyed by size class and go back to it when their
//! tensor drops, so that steady-state inference creates no new buffer; reuse is safe because
//! every command runs in the order it was recorded.

use crate::{DeviceKind, Error, Result};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// A WGSL compute shader: one entry point `main` whose binding 0 is a uniform of parameters and
/// bindings 1.. are storage buffers, in the order [`Context::dispatch`] gets them.
pub(crate) struct Shader {
    pub name: &'static str,
    pub source: &'static str,
}

/// Counters of the device's resources, to check that the steady state allocates nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// GPU buffers created since the device was opened (weights, pool growth, staging; CUDA:
    /// allocations, which its memory pool serves without the driver once it holds enough).
    pub buffers_created: u64,
    /// Command submissions (CUDA: synchronizations).
    pub submits: u64,
    /// Compute dispatches recorded (CUDA: kernel launches and cuBLAS products).
    pub dispatches: u64,
    /// Bytes the device's memory pool holds (CUDA; zero on wgpu, which counts buffers instead).
    pub reserved_bytes: u64,
}

enum Command {
    Dispatch {
        pipeline: Arc<wgpu::ComputePipeline>,
        bind_group: wgpu::BindGroup,
        groups: [u32; 3],
    },
    Copy {
        src: wgpu::Buffer,
        src_offset: u64,
        dst: wgpu::Buffer,
        dst_offset: u64,
        size: u64,
    },
}

struct Pending {
    commands: Vec<Command>,
    /// Parameters and small uploads of the pending commands, written to `arena_buf` at submit.
    arena: Vec<u8>,
    arena_buf: wgpu::Buffer,
}

/// What a pooled buffer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Usage {
    /// Storage for tensors: bound to shaders, copied to and from.
    Storage,
    /// Host-visible staging for reading results back.
    Readback,
}

pub(crate) struct Context {
    pub device: wgpu::Device,
    queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pipelines: Mutex<HashMap<&'static str, Arc<wgpu::ComputePipeline>>>,
    pool: Mutex<HashMap<(u64, Usage), Vec<wgpu::Buffer>>>,
    pending: Mutex<Pending>,
    /// The first validation or out-of-memory error wgpu reported, taken by the next check.
    error: Arc<Mutex<Option<String>>>,
    created: AtomicU64,
    submits: AtomicU64,
    dispatches: AtomicU64,
    /// With `KEEL_WGPU_PROFILE` set: each dispatch runs alone and its time is added up here per
    /// shader, printed when the device closes (a developer's tool; it serializes everything).
    profile: Option<Mutex<HashMap<&'static str, (u64, std::time::Duration)>>>,
}

const ARENA_START: u64 = 1 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind, still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn no_device(reason: impl Into<String>) -> Error {
    Error::NoSuchDevice {
        kind: DeviceKind::Wgpu,
        reason: reason.into(),
    }
}

/// Order of preference among adapter types: discrete first, CPU last.
fn rank(kind: wgpu::DeviceType) -> u8 {
    match kind {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

/// Every Vulkan, Metal or DX12 adapter of this machine, the preferred first.
fn sorted_adapters() -> Vec<wgpu::Adapter> {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = wgpu::Backends::PRIMARY;
    let instance = wgpu::Instance::new(desc);
    let mut adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY));
    adapters.sort_by_key(|a| rank(a.get_info().device_type));
    adapters
}

/// The adapters in the order [`Context::open`] prefers them: "name (backend, device type,
/// driver)".
pub fn adapters() -> Vec<String> {
    sorted_adapters()
        .iter()
        .map(|a| {
            let i = a.get_info();
            format!(
                "{} ({:?}, {:?}, {} {})",
                i.name, i.backend, i.device_type, i.driver, i.driver_info
            )
            .trim_end()
            .to_string()
        })
        .collect()
}

impl Context {
    /// Opens the preferred adapter, or the first whose name contains `wanted` (case-insensitive).
    pub fn open(wanted: Option<&str>) -> Result<Self> {
        let mut adapters = sorted_adapters();
        if adapters.is_empty() {
            return Err(no_device(
                "no Vulkan, Metal or DX12 adapter found (on Linux without a GPU, install Mesa's \
                 lavapipe: apt install mesa-vulkan-drivers libvulkan1)",
            ));
        }
        let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
        let adapter = match wanted {
            None => adapters.remove(0),
            Some(w) => {
                let w = w.to_lowercase();
                let at = names
                    .iter()
                    .position(|n| n.to_lowercase().contains(&w))
                    .ok_or_else(|| no_device(format!("no adapter matches '{w}' (found: {names:?})")))?;
                adapters.remove(at)
            }
        };
        let info = adapter.get_info();
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("keel"),
            required_features: wgpu::Features::empty(),
            // Large weight matrices need the adapter's own limits, not WebGPU's defaults.
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| no_device(format!("adapter '{}' refused a device: {e}", info.name)))?;
        let error = Arc::new(Mutex::new(None));
        let sink = error.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            lock(&sink).get_or_insert_with(|| e.to_string());
        }));
        let arena_buf = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("keel arena"),
            size: ARENA_START,
            usage: wgpu::BufferUsages::UNIFORM
                | wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(Self {
            device,
            queue,
            info,
            limits,
            pipelines: Mutex::new(HashMap::new()),
            pool: Mutex::new(HashMap::new()),
            pending: Mutex::new(Pending {
                commands: Vec::new(),
                arena: Vec::new(),
                arena_buf,
            }),
            error,
            created: AtomicU64::new(1),
            submits: AtomicU64::new(0),
            dispatches: AtomicU64::new(0),
            profile: std::env::var_os("KEEL_WGPU_PROFILE").map(|_| Mutex::default()),
        })
    }

    pub fn stats(&self) -> DeviceStats {
        DeviceStats {
            buffers_created: self.created.load(Ordering::Relaxed),
            submits: self.submits.load(Ordering::Relaxed),
            dispatches: self.dispatches.load(Ordering::Relaxed),
            reserved_bytes: 0,
        }
    }

    /// The error wgpu reported since the last check, if any.
    pub fn check(&self) -> Result<()> {
        match lock(&self.error).take() {
            None => Ok(()),
            Some(message) => Err(Error::Backend {
                kind: DeviceKind::Wgpu,
                message,
            }),
        }
    }

    fn create(&self, size: u64, usage: Usage) -> wgpu::Buffer {
        self.created.fetch_add(1, Ordering::Relaxed);
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage: match usage {
                Usage::Storage => {
                    wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST
                }
                Usage::Readback => wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            },
            mapped_at_creation: false,
        })
    }

    /// A buffer of at least `bytes` from the pool (size classes are powers of two from 256 B).
    pub fn take(&self, bytes: u64, usage: Usage) -> Result<wgpu::Buffer> {
        let class = bytes.max(256).next_power_of_two();
        let limit = self
            .limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size);
        if class > limit {
            // A tensor just below the limit gets a buffer of its own size instead of its class.
            if bytes > limit {
                return Err(Error::BadOperands {
                    op: "wgpu",
                    reason: format!(
                        "a tensor of {bytes} bytes exceeds the adapter's buffer limit of {limit}"
                    ),
                });
            }
            return Ok(self.create(bytes.div_ceil(4) * 4, usage));
        }
        if let Some(buffer) = lock(&self.pool).get_mut(&(class, usage)).and_then(Vec::pop) {
            return Ok(buffer);
        }
        Ok(self.create(class, usage))
    }

    /// Returns a buffer to the pool.
    pub fn give(&self, buffer: wgpu::Buffer, usage: Usage) {
        let size = buffer.size();
        if size.is_power_of_two() {
            lock(&self.pool).entry((size, usage)).or_default().push(buffer);
        }
    }

    /// A buffer of exactly `data`'s bytes that lives as long as its owner (weights).
    pub fn create_with(&self, data: &[u8]) -> wgpu::Buffer {
        // At least one vec4, whole words: shaders may read a weight as vec4s.
        let buffer = self.create((data.len() as u64).max(16).div_ceil(4) * 4, Usage::Storage);
        // A fresh buffer is used by nothing yet, so a queue write cannot race a pending command.
        self.queue.write_buffer(&buffer, 0, data);
        buffer
    }

    fn pipeline(&self, shader: &Shader) -> Arc<wgpu::ComputePipeline> {
        let mut pipelines = lock(&self.pipelines);
        pipelines
            .entry(shader.name)
            .or_insert_with(|| {
                let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(shader.name),
                    source: wgpu::ShaderSource::Wgsl(shader.source.into()),
                });
                Arc::new(
                    self.device
                        .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                            label: Some(shader.name),
                            layout: None,
                            module: &module,
                            entry_point: Some("main"),
                            compilation_options: Default::default(),
                            cache: None,
                        }),
                )
            })
            .clone()
    }

    /// Appends `bytes` to the arena at an aligned offset, submitting first if it is full.
    fn stage(&self, pending: &mut Pending, bytes: &[u8]) -> u64 {
        let align = self.limits.min_uniform_buffer_offset_alignment.max(256) as usize;
        let at = pending.arena.len().div_ceil(align) * align;
        let need = (at + bytes.len()) as u64;
        if need > pending.arena_buf.size() {
            self.submit(pending);
            if bytes.len() as u64 > pending.arena_buf.size() {
                pending.arena_buf = self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("keel arena"),
                    size: (bytes.len() as u64).next_power_of_two(),
                    usage: pending.arena_buf.usage(),
                    mapped_at_creation: false,
                });
                self.created.fetch_add(1, Ordering::Relaxed);
            }
            return self.stage(pending, bytes);
        }
        pending.arena.resize(at, 0);
        pending.arena.extend_from_slice(bytes);
        at as u64
    }

    /// Records one dispatch of `shader` over `groups` workgroups with `params` in binding 0 and
    /// `buffers` in bindings 1.. (whole buffers; the parameters say which part to use).
    pub fn dispatch(&self, shader: &Shader, params: &[u32], buffers: &[&wgpu::Buffer], groups: [u32; 3]) {
        let max = self.limits.max_compute_workgroups_per_dimension;
        debug_assert!(
            groups.iter().all(|&g| g <= max),
            "{} dispatch {groups:?} > {max}",
            shader.name
        );
        if groups.contains(&0) {
            return;
        }
        let pipeline = self.pipeline(shader);
        let mut pending = lock(&self.pending);
        // Uniforms are read in 16-byte units.
        let mut bytes: Vec<u8> = bytemuck::cast_slice(params).to_vec();
        bytes.resize(bytes.len().max(16).div_ceil(16) * 16, 0);
        let offset = self.stage(&mut pending, &bytes);
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &pending.arena_buf,
                offset,
                size: std::num::NonZeroU64::new(bytes.len() as u64),
            }),
        }];
        entries.extend(buffers.iter().enumerate().map(|(i, b)| wgpu::BindGroupEntry {
            binding: i as u32 + 1,
            resource: b.as_entire_binding(),
        }));
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        self.dispatches.fetch_add(1, Ordering::Relaxed);
        pending.commands.push(Command::Dispatch {
            pipeline,
            bind_group,
            groups,
        });
        if let Some(profile) = &self.profile {
            self.submit(&mut pending);
            let start = std::time::Instant::now();
            let _ = self.device.poll(wgpu::PollType::wait_indefinitely());
            let mut profile = lock(profile);
            let entry = profile.entry(shader.name).or_default();
            entry.0 += 1;
            entry.1 += start.elapsed();
        }
    }

    /// Records a copy of `size` bytes between buffers (offsets and size multiples of 4).
    pub fn copy(&self, src: &wgpu::Buffer, src_offset: u64, dst: &wgpu::Buffer, dst_offset: u64, size: u64) {
        if size == 0 {
            return;
        }
        lock(&self.pending).commands.push(Command::Copy {
            src: src.clone(),
            src_offset,
            dst: dst.clone(),
            dst_offset,
            size,
        });
    }

    /// Records a copy of `data` into `dst` at `offset`, in order with the other commands.
    pub fn upload(&self, data: &[u8], dst: &wgpu::Buffer, dst_offset: u64) {
        if data.is_empty() {
            return;
        }
        let mut pending = lock(&self.pending);
        let mut bytes = data.to_vec();
        bytes.resize(bytes.len().div_ceil(4) * 4, 0);
        let at = self.stage(&mut pending, &bytes);
        let src = pending.arena_buf.clone();
        pending.commands.push(Command::Copy {
            src,
            src_offset: at,
            dst: dst.clone(),
            dst_offset,
            size: bytes.len() as u64,
        });
    }

    fn submit(&self, pending: &mut Pending) {
        if pending.commands.is_empty() {
            return;
        }
        self.queue.write_buffer(&pending.arena_buf, 0, &pending.arena);
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("keel") });
        let mut commands = pending.commands.drain(..).peekable();
        while let Some(command) = commands.next() {
            match command {
                Command::Copy {
                    src,
                    src_offset,
                    dst,
                    dst_offset,
                    size,
                } => encoder.copy_buffer_to_buffer(&src, src_offset, &dst, dst_offset, size),
                Command::Dispatch {
                    pipeline,
                    bind_group,
                    groups,
                } => {
                    // Consecutive dispatches share one pass; wgpu orders their reads and writes.
                    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
                    let mut next = Some((pipeline, bind_group, groups));
                    while let Some((pipeline, bind_group, [x, y, z])) = next.take() {
                        pass.set_pipeline(&pipeline);
                        pass.set_bind_group(0, &bind_group, &[]);
                        pass.dispatch_workgroups(x, y, z);
                        if let Some(Command::Dispatch { .. }) = commands.peek() {
                            if let Some(Command::Dispatch {
                                pipeline,
                                bind_group,
                                groups,
                            }) = commands.next()
                            {
                                next = Some((pipeline, bind_group, groups));
                            }
                        }
                    }
                }
            }
        }
        self.queue.submit([encoder.finish()]);
        self.submits.fetch_add(1, Ordering::Relaxed);
        pending.arena.clear();
    }

    /// Submits everything recorded so far.
    pub fn flush(&self) -> Result<()> {
        self.submit(&mut lock(&self.pending));
        self.check()
    }

    /// Waits until every submitted command has finished.
    pub fn wait(&self) -> Result<()> {
        self.flush()?;
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Backend {
                kind: DeviceKind::Wgpu,
                message: e.to_string(),
            })?;
        self.check()
    }

    /// The first `bytes` of `buffer` (from `offset`), once the commands that write them have run.
    pub fn read(&self, buffer: &wgpu::Buffer, offset: u64, bytes: u64) -> Result<Vec<u8>> {
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let staging = self.take(bytes, Usage::Readback)?;
        self.copy(buffer, offset, &staging, 0, bytes);
        self.flush()?;
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, 0..bytes, move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        let mapped = rx.recv().map_err(|_| Error::Backend {
            kind: DeviceKind::Wgpu,
            message: "the device was lost while reading a result back".into(),
        })?;
        mapped.map_err(|e| Error::Backend {
            kind: DeviceKind::Wgpu,
            message: format!("reading a result back: {e}"),
        })?;
        let data = staging
            .get_mapped_range(0..bytes)
            .map_err(|e| Error::Backend {
                kind: DeviceKind::Wgpu,
                message: format!("reading a result back: {e:?}"),
            })?
            .to_vec();
        staging.unmap();
        self.give(staging, Usage::Readback);
        Ok(data)
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        if let Some(profile) = &self.profile {
            let mut rows: Vec<_> = lock(profile).iter().map(|(k, v)| (*k, *v)).collect();
            rows.sort_by_key(|(_, (_, time))| std::cmp::Reverse(*time));
            for (shader, (count, time)) in rows {
                eprintln!("keel wgpu profile: {shader:>14} {count:>7} dispatches {time:>12.3?}");
            }
        }
    }
}
