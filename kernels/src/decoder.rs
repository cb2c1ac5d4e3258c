//! State a decoder keeps between steps: rotary tables and the KV cache.

use crate::cuda::{CudaKv, CudaTensor};
use crate::wgpu::{GpuKv, GpuTensor};
use crate::{Error, Result};
use std::sync::OnceLock;

/// cos and sin of every position's rotation angles, `[positions][head_dim / 2]`, computed in f32
/// the way transformers computes them, so that both round alike.
#[derive(Debug, Clone)]
pub struct Rope {
    pub(crate) half: usize,
    pub(crate) cos: Vec<f32>,
    pub(crate) sin: Vec<f32>,
    /// The tables uploaded to a wgpu device, on first use there.
    pub(crate) gpu: OnceLock<(GpuTensor, GpuTensor)>,
    /// The tables uploaded to a CUDA device, on first use there.
    pub(crate) cuda: OnceLock<(CudaTensor, CudaTensor)>,
}

impl Rope {
    /// Tables for heads of `head_dim` (even), base `theta`, positions `0..max_positions`.
    pub fn new(head_dim: usize, theta: f32, max_positions: usize) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self {
            half,
            cos,
            sin,
            gpu: OnceLock::new(),
            cuda: OnceLock::new(),
        }
    }

    /// Positions covered.
    pub fn max_positions(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }

    /// Rotates interleaved pairs `(x[2i], x[2i+1])` of one head at position `pos` (GGML's
    /// "normal" rope, the layout llama.cpp's converter writes Q and K weights for).
    pub(crate) fn rotate(&self, head: &mut [f32], pos: usize) {
        let (cos, sin) = (
            &self.cos[pos * self.half..][..self.half],
            &self.sin[pos * self.half..][..self.half],
        );
        for ((pair, c), s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * c - b * s;
            pair[1] = a * s + b * c;
        }
    }
}

/// The keys and values a sequence has seen, per layer, stored token-major
/// (`[token][kv_heads * head_dim]`) so that a step appends in place, on the device that runs the
/// model ([`crate::Device::new_kv_cache`]). Each sequence owns one; dropping it frees its memory.
#[derive(Debug)]
pub struct KvCache {
    pub(crate) store: KvStore,
    pub(crate) width: usize,
    len: usize,
}

#[derive(Debug)]
pub(crate) enum KvStore {
    Host {
        keys: Vec<Vec<f32>>,
        values: Vec<Vec<f32>>,
    },
    Wgpu(GpuKv),
    Cuda(CudaKv),
}

impl Clone for KvCache {
    /// [`KvCache::try_clone`], for host caches and tests: panics where a GPU has no memory left
    /// for the copy.
    fn clone(&self) -> Self {
        self.try_clone().expect("device memory for a copy of a KV cache")
    }
}

impl KvCache {
    /// A copy of the committed tokens (on a GPU, a copy made on the device), or the device's
    /// error when it has no memory left for it.
    pub fn try_clone(&self) -> Result<Self> {
        let values = self.len * self.width;
        let store = match &self.store {
            KvStore::Host { keys, values } => KvStore::Host {
                keys: keys.clone(),
                values: values.clone(),
            },
            KvStore::Wgpu(kv) => KvStore::Wgpu(kv.duplicate(values)?),
            KvStore::Cuda(kv) => KvStore::Cuda(kv.duplicate(values)?),
        };
        Ok(Self {
            store,
            width: self.width,
            len: self.len,
        })
    }

    /// An empty cache in host memory (the CPU's) for `layers` layers of `kv_heads * head_dim`
    /// values per token.
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize) -> Self {
        Self::on_device(
            KvStore::Host {
                keys: vec![Vec::new(); layers],
                values: vec![Vec::new(); layers],
            },
            kv_heads * head_dim,
        )
    }

    pub(crate) fn on_device(store: KvStore, width: usize) -> Self {
        Self { store, width, len: 0 }
    }

    /// Layers held.
    pub fn layers(&self) -> usize {
        match &self.store {
            KvStore::Host { keys, .. } => keys.len(),
            KvStore::Wgpu(kv) => kv.layers(),
            KvStore::Cuda(kv) => kv.layers(),
        }
    }

    /// Tokens held (committed by [`KvCache::commit`]).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held, allocated capacity included.
    pub fn bytes(&self) -> usize {
        match &self.store {
            KvStore::Host { keys, values } => keys.iter().chain(values).map(|v| v.capacity() * 4).sum(),
            KvStore::Wgpu(kv) => kv.bytes(),
            KvStore::Cuda(kv) => kv.bytes(),
        }
    }

    /// Drops whatever a step appended past the committed length (after a failed step).
    pub fn rollback(&mut self) {
        let keep = self.len * self.width;
        if let KvStore::Host { keys, values } = &mut self.store {
            keys.iter_mut()
                .chain(values.iter_mut())
                .for_each(|v| v.truncate(keep));
        }
        // On a device, rows past the committed length are simply overwritten by the next step.
    }

    /// Marks `tokens` more tokens as held, once every layer has appended them.
    pub fn commit(&mut self, tokens: usize) {
        self.len += tokens;
    }
}

/// The head width of a decoder attention step, once `qkv` (`[t, (heads + 2 * kv_heads) *
/// head_dim]`), the head counts, the rotary tables and layer `layer` of `cache` are checked to
/// fit together (every backend's `causal_attention` starts here).
pub(crate) fn causal_head_dim(
    qkv: &[usize],
    heads: usize,
    kv_heads: usize,
    rope: &Rope,
    cache: &KvCache,
    layer: usize,
) -> Result<usize> {
    let parts = heads + 2 * kv_heads;
    let fits = |t: usize, width: usize| {
        let head_dim = width / parts.max(1);
        kv_heads > 0
            && heads.is_multiple_of(kv_heads)
            && width.is_multiple_of(parts)
            && cache.width == kv_heads * head_dim
            && layer < cache.layers()
            && cache.len() + t <= rope.max_positions()
            && head_dim == 2 * rope.half
    };
    match *qkv {
        [t, width] if fits(t, width) => Ok(width / parts),
        _ => Err(Error::BadOperands {
            op: "attention",
            reason: format!(
                "qkv {qkv:?}, {heads}/{kv_heads} heads, cache width {} ({} layers, {} tokens)",
                cache.width,
                cache.layers(),
                cache.len()
            ),
        }),
    }
}
