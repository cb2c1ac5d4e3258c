//! Slots and hot swap: a version the layer serves is loaded into the engine once and held by
//! the routes and by every request in flight on it; it is unloaded when the last of them lets
//! go, so that an alias move never fails or re-routes a request.

use super::{lineage, weight_path, weights_name, Error, Result, Shared};
use crate::manifest::ModelSource;
use crate::store::VersionRecord;
use crate::{Engine, Infer, LoadOptions, ModelVersion, Target, VersionId};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};

/// A loaded version as the layer holds it. The engine unloads it when the last holder (a route
/// or a request in flight) lets go.
pub(super) struct Slot {
    pub(super) record: VersionRecord,
    /// What every lineage record names it by.
    pub(super) identity: Arc<Identity>,
    /// The version as the layers below see it.
    pub(super) card: Arc<ModelVersion>,
    engine: Engine,
    pool: Weak<SlotPool>,
    /// The host had loaded this version itself: not the layer's to unload.
    borrowed: bool,
}

#[derive(Default)]
pub(super) struct SlotPool {
    /// Held while loading or unloading, so that a version is never unloaded under a new holder.
    slots: Mutex<HashMap<VersionId, PoolEntry>>,
}

/// A version the layer holds, for as long as a slot of it lives or is being dropped.
struct PoolEntry {
    slot: Weak<Slot>,
    /// Whether the host had loaded it (see [`Slot::borrowed`]), decided when the layer first
    /// loaded it. A slot made while the last one is still being dropped takes this over: asked
    /// again, the engine would say "loaded" (the dropping slot has not unloaded it yet), and
    /// neither slot would ever unload the version.
    borrowed: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(pool) = self.pool.upgrade() else {
            if !self.borrowed {
                let _ = self.engine.unload(self.record.id.as_str());
            }
            return;
        };
        let mut slots = pool.slots.lock().unwrap_or_else(|p| p.into_inner());
        // A new holder may have taken the version meanwhile (under this lock): leave it loaded.
        if slots
            .get(&self.record.id)
            .is_some_and(|e| e.slot.strong_count() > 0)
        {
            return;
        }
        slots.remove(&self.record.id);
        if !self.borrowed {
            let _ = self.engine.unload(self.record.id.as_str());
        }
    }
}

/// The sha256 of a version's manifest and its files' sha256, computed once per version.
pub(super) struct Identity {
    pub(super) manifest_hash: String,
    pub(super) files: BTreeMap<String, String>,
}

impl Identity {
    fn of(manifest: &crate::Manifest) -> Self {
        Self {
            manifest_hash: lineage::hex(&Sha256::digest(manifest.to_toml().as_bytes())),
            files: manifest
                .files
                .iter()
                .map(|f| (f.path.clone(), f.sha256.clone()))
                .collect(),
        }
    }
}

impl Slot {
    /// Where a request routed to this slot goes.
    pub(super) fn target(&self) -> Target {
        Target {
            name: self.record.name.clone(),
            version: self.card.clone(),
        }
    }
}

impl Shared {
    /// A version the host loaded into the engine itself and never registered (a `keel_model_load`
    /// of the C ABI): served as it is, recorded in lineage under its manifest's name, never
    /// unloaded by the layer.
    pub(super) fn hosted(&self, target: Target) -> Slot {
        let info = target.version.info();
        Slot {
            record: VersionRecord {
                name: target.name.clone(),
                id: info.id.clone(),
                path: info.folder.clone(),
                weights: weights_name(info.weights).into(),
                retain_input: false,
                manifest: info.manifest.clone(),
                registered_ms: 0,
            },
            identity: identity_of(&target.version),
            card: target.version,
            engine: self.engine.clone(),
            pool: Weak::new(),
            borrowed: true,
        }
    }

    /// The loaded version of a record, loading it if no one holds it. The files are read and
    /// hashed again: a version whose files changed since registration is refused.
    pub(super) fn slot(self: &Arc<Self>, record: &VersionRecord) -> Result<Arc<Slot>> {
        let mut slots = self.pool.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = slots.get(&record.id).and_then(|e| e.slot.upgrade()) {
            return Ok(slot);
        }
        // An entry without a live slot: its last slot is being dropped, waiting for this lock.
        let dropping = slots.get(&record.id).map(|e| e.borrowed);
        let source = ModelSource::open(&record.path).map_err(|e| match e {
            crate::Error::ChecksumMismatch {
                path,
                expected,
                actual,
            } => Error::Tampered {
                version: record.id.to_string(),
                file: path.display().to_string(),
                registered: expected,
                actual,
            },
            other => Error::Engine(other),
        })?;
        for registered in &record.manifest.files {
            let now = source.manifest.files.iter().find(|f| f.path == registered.path);
            if now.map(|f| &f.sha256) != Some(&registered.sha256) {
                return Err(Error::Tampered {
                    version: record.id.to_string(),
                    file: record.path.join(&registered.path).display().to_string(),
                    registered: registered.sha256.clone(),
                    actual: now.map_or_else(|| "missing".into(), |f| f.sha256.clone()),
                });
            }
        }
        let weights = weight_path(&record.weights);
        // A version the host loaded into the engine itself stays loaded after the layer is done.
        let borrowed = dropping.unwrap_or_else(|| self.engine.info(record.id.as_str()).is_ok());
        let id = self.engine.load_with(&record.path, LoadOptions { weights })?;
        if id != record.id {
            return Err(Error::Tampered {
                version: record.id.to_string(),
                file: record.path.display().to_string(),
                registered: record.id.to_string(),
                actual: id.to_string(),
            });
        }
        let card = self.engine.target(id.as_str())?.version;
        let slot = Arc::new(Slot {
            identity: identity_of(&card),
            card,
            record: record.clone(),
            engine: self.engine.clone(),
            pool: Arc::downgrade(&self.pool),
            borrowed,
        });
        slots.insert(
            record.id.clone(),
            PoolEntry {
                slot: Arc::downgrade(&slot),
                borrowed,
            },
        );
        Ok(slot)
    }
}

/// A version's identity, kept with the version (computed once, whoever asks first).
fn identity_of(version: &ModelVersion) -> Arc<Identity> {
    version
        .derived(|info| Ok::<_, std::convert::Infallible>(Identity::of(&info.manifest)))
        .unwrap_or_else(|never| match never {})
}
