//! Keeps freed activation buffers in the heap for the next forward (glibc only).
//!
//! Every CPU op returns a fresh buffer, up to tens of MB for a batch. By default glibc's malloc
//! gives buffers that large their own mapping, or trims them back to the OS once freed, so each
//! forward faults the same pages in again, zero-filled by the kernel. Measured on MiniLM, batch 8
//! of 128 tokens, run from a thread other than the main one (the scheduler's worker): ~2,000
//! page faults and 8-10% of the forward's time. Raising both thresholds once (buffers up to
//! 32 MiB come from the heap, which is trimmed only past 256 MiB free at its top) makes the steady
//! state fault-free while a forward's working set fits one 64 MiB heap of a thread arena (a
//! MiniLM batch of 32 x 128 tokens does not: glibc unmaps its second heap whenever it empties,
//! ~5% of that batch). The cost: after a burst, up to its working set stays mapped for reuse.
//! `KEEL_MALLOC_TUNING=0` leaves malloc as the host set it.

/// Applies the thresholds once per process (later calls do nothing).
pub(crate) fn keep_buffers_for_reuse() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            if std::env::var("KEEL_MALLOC_TUNING").is_ok_and(|v| v == "0") {
                return;
            }
            // SAFETY: mallopt only sets malloc's parameters; it is safe to call at any time,
            // from any thread.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
            }
        });
    }
}

/// Returns the heap's free memory to the OS (after a model is unloaded: the raised trim
/// threshold would otherwise keep up to 256 MiB of its freed buffers mapped).
pub(crate) fn return_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free pages of malloc's own heaps; it is safe to call at
    // any time, from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A long-lived, zeroed buffer of `T` in its own anonymous mapping, outside malloc's heaps.
///
/// For weights packed on the first product, which happens on whatever thread runs the model
/// (the scheduler's worker): in malloc's heap they would fill the first heap of that thread's
/// arena, pushing each forward's activations into further heaps that glibc unmaps whenever they
/// empty (measured: ~4,600 page faults, 8-10% of a MiniLM batch of 8).
pub(crate) struct Pages<T> {
    map: memmap2::MmapMut,
    len: usize,
    _values: std::marker::PhantomData<T>,
}

impl<T: bytemuck::Pod> Pages<T> {
    /// `len` zeros (page-aligned, so aligned for any `T`).
    pub(crate) fn zeroed(len: usize) -> crate::Result<Self> {
        let out_of_memory = |why: String| crate::Error::Backend {
            kind: crate::DeviceKind::Cpu,
            message: format!("cannot map {len} values of packed weights: {why}"),
        };
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| out_of_memory("too many".into()))?;
        // A mapping cannot be empty; one byte stands for an empty buffer.
        let map = memmap2::MmapMut::map_anon(bytes.max(1)).map_err(|e| out_of_memory(e.to_string()))?;
        Ok(Self {
            map,
            len,
            _values: std::marker::PhantomData,
        })
    }
}

impl<T: bytemuck::Pod> std::ops::Deref for Pages<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        bytemuck::cast_slice(&self.map[..self.len * std::mem::size_of::<T>()])
    }
}

impl<T: bytemuck::Pod> std::ops::DerefMut for Pages<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        bytemuck::cast_slice_mut(&mut self.map[..self.len * std::mem::size_of::<T>()])
    }
}
