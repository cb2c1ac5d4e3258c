//! The table of live objects that every handle is looked up in.
//!
//! A handle given to C is not the address of the object: it is a number, never reused in the
//! life of the process, that names an entry of this table (cast to the opaque pointer type so
//! that C sees distinct types). Every call looks its handles up, so a handle that was freed, was
//! never created, or names another kind of object is refused with an error instead of being
//! dereferenced; and since the table holds an `Arc`, a call that is running when another thread
//! frees the handle finishes on a live object.
//!
//! The cost is one read lock and a hash lookup per handle per call: nothing next to inference.
//! The limit: pointers *into* an object (an error message, an embedding buffer) dangle once the
//! object is freed, and that is not detectable.

use crate::status::Failure;
use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// An object that C holds through a handle of type `*mut Self::C`.
pub(crate) trait Handle: Any + Send + Sync {
    /// The opaque C type of its handles.
    type C;
    /// The C name of that type, for error messages.
    const NAME: &'static str;
}

type Table = HashMap<u64, Arc<dyn Any + Send + Sync>>;

static TABLE: LazyLock<RwLock<Table>> = LazyLock::new(Default::default);

/// The next handle number. Starts above the first page so that a small integer passed by mistake
/// is never a live handle; a 64-bit counter does not wrap in the life of a process.
static NEXT: AtomicU64 = AtomicU64::new(0x1000);

fn read() -> RwLockReadGuard<'static, Table> {
    // Every write is one insert or remove: a panic cannot leave the table half-written.
    TABLE.read().unwrap_or_else(|p| p.into_inner())
}

fn write() -> RwLockWriteGuard<'static, Table> {
    TABLE.write().unwrap_or_else(|p| p.into_inner())
}

/// Puts `object` in the table and returns its new handle.
pub(crate) fn insert<T: Handle>(object: T) -> *mut T::C {
    insert_arc(Arc::new(object))
}

/// [`insert`] for an object already shared.
pub(crate) fn insert_arc<T: Handle>(object: Arc<T>) -> *mut T::C {
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    write().insert(id, object);
    id as usize as *mut T::C
}

/// The object behind a live handle of type `T`.
///
/// # Errors
/// `KEEL_ERR_INVALID_ARGUMENT` naming `what` if the handle is NULL, not live, or of another type.
pub(crate) fn get<T: Handle>(handle: *const T::C, what: &str) -> Result<Arc<T>, Failure> {
    if handle.is_null() {
        return Err(Failure::invalid(format!("{what} is NULL")));
    }
    let object = read().get(&id_of(handle)).cloned();
    object.and_then(|o| o.downcast::<T>().ok()).ok_or_else(|| {
        Failure::invalid(format!(
            "{what} ({handle:p}) is not a live {}: it was freed, never created, or is another kind \
             of handle",
            T::NAME
        ))
    })
}

/// Takes the object behind a live handle of type `T` out of the table: the handle is dead from
/// now on. `None` (and the table untouched) for NULL, stale and wrong-type handles.
pub(crate) fn remove<T: Handle>(handle: *const T::C) -> Option<Arc<T>> {
    if handle.is_null() {
        return None;
    }
    remove_id::<T>(id_of(handle))
}

/// [`remove`] by handle number.
pub(crate) fn remove_id<T: Handle>(id: u64) -> Option<Arc<T>> {
    let mut table = write();
    if !table.get(&id)?.is::<T>() {
        return None;
    }
    table.remove(&id)?.downcast::<T>().ok()
}

/// The handle number behind a handle.
pub(crate) fn id_of<C>(handle: *const C) -> u64 {
    handle as usize as u64
}

/// How many handles of any type are live.
pub(crate) fn live() -> usize {
    read().len()
}
