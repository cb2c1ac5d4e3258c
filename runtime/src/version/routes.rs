//! Routing and refresh: the routes of each name (its aliases and canary) with their versions
//! loaded, where each request goes and why, and how route changes made by other processes are
//! picked up.

use super::guard::GuardState;
use super::slots::Slot;
use super::{Error, Result, Shared, CANARY, PRODUCTION};
use crate::store::{Routes, VersionRecord};
use crate::VersionId;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The routes of one name, with their versions loaded.
pub(super) struct Live {
    routes: Routes,
    /// Production and canary, loaded with the routes (any request may need them).
    slots: BTreeMap<String, Arc<Slot>>,
    /// Other aliases, loaded when a request first addresses them.
    others: Mutex<BTreeMap<String, Arc<Slot>>>,
    pub(super) guard: Option<Arc<GuardState>>,
}

/// Where a request goes.
pub(super) struct Decision {
    pub(super) slot: Arc<Slot>,
    pub(super) route: String,
    pub(super) reason: String,
    /// Shadow mode: the canary runs on a copy.
    pub(super) shadow: Option<Arc<Slot>>,
    /// Split mode with a divergence guard: production runs on a copy for comparison.
    pub(super) compare: Option<Arc<Slot>>,
    pub(super) guard: Option<Arc<GuardState>>,
    pub(super) name: String,
}

impl Shared {
    pub(super) fn read_live(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Live>>> {
        self.live.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn write_live(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<Live>>> {
        self.live.write().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn find_version(&self, name: &str, version: &str) -> Result<VersionRecord> {
        let all: Vec<VersionRecord> = self
            .store
            .versions()?
            .into_iter()
            .filter(|v| v.name == name)
            .collect();
        if all.is_empty() {
            return Err(Error::UnknownName(name.to_string()));
        }
        let unknown = || Error::UnknownVersion {
            name: name.to_string(),
            version: version.to_string(),
        };
        if version.len() < 8 {
            return Err(unknown());
        }
        let mut matches = all
            .into_iter()
            .filter(|v| v.id.as_str().starts_with(&version.to_ascii_lowercase()));
        match (matches.next(), matches.next()) {
            (Some(v), None) => Ok(v),
            _ => Err(unknown()),
        }
    }

    /// Loads every version the routes name.
    pub(super) fn build_live(self: &Arc<Self>, routes: Routes) -> Result<Arc<Live>> {
        let mut slots = BTreeMap::new();
        let served = routes
            .aliases
            .iter()
            .filter(|(a, _)| *a == PRODUCTION || *a == CANARY);
        for (alias, id) in served {
            let record = self
                .store
                .version(&routes.name, id)?
                .ok_or_else(|| Error::UnknownVersion {
                    name: routes.name.clone(),
                    version: id.to_string(),
                })?;
            slots.insert(alias.clone(), self.slot(&record)?);
        }
        let guard = routes
            .canary
            .as_ref()
            .and_then(|c| c.guard.clone())
            .map(|g| Arc::new(GuardState::new(g)));
        Ok(Arc::new(Live {
            routes,
            slots,
            others: Mutex::default(),
            guard,
        }))
    }

    /// The routes of `name` in this process, loading them from the store at first use.
    fn live(self: &Arc<Self>, name: &str) -> Result<Arc<Live>> {
        if let Some(live) = self.read_live().get(name) {
            return Ok(live.clone());
        }
        let _serial = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(live) = self.read_live().get(name) {
            return Ok(live.clone());
        }
        let routes = self.store.routes(name)?;
        if routes.aliases.is_empty() {
            let registered = self.store.versions()?.iter().any(|v| v.name == name);
            return Err(if registered {
                Error::UnknownAlias {
                    name: name.to_string(),
                    alias: PRODUCTION.into(),
                }
            } else {
                Error::UnknownName(name.to_string())
            });
        }
        let live = self.build_live(routes)?;
        self.write_live().insert(name.to_string(), live.clone());
        Ok(live)
    }

    /// Starts the thread that serves the routes other processes set: it waits for the store to
    /// announce a change (PostgreSQL's NOTIFY, on whichever host made it) or for `every` to
    /// pass (the poll, for a store that does not announce or a missed announcement), then
    /// reloads the names whose routes moved. Requests keep the old routes until the new
    /// versions are loaded, so no request waits for a load. The thread ends once the layer is
    /// dropped (within `every`).
    pub(super) fn watch_routes(self: &Arc<Self>, every: Duration) -> Result<()> {
        let (weak, store) = (Arc::downgrade(self), self.store.clone());
        let mut seen = self.store.routes_version()?;
        std::thread::Builder::new()
            .name("keel-routes".into())
            .spawn(move || loop {
                if store.wait_routes_change(every).is_err() {
                    // The store is unreachable: try again after a poll period, not in a spin.
                    std::thread::sleep(every);
                }
                let Some(shared) = weak.upgrade() else { return };
                if let Ok(version) = store.routes_version() {
                    if version != seen {
                        seen = version;
                        shared.reload_changed();
                    }
                }
            })
            .map(|_| ())
            .map_err(|e| {
                Error::Engine(crate::Error::Internal(format!(
                    "cannot start the routes watcher: {e}"
                )))
            })
    }

    /// Rebuilds the routes of every served name whose stored routes differ from this process's.
    fn reload_changed(self: &Arc<Self>) {
        let _serial = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        // Names only: holding a name's old routes here would keep their versions loaded.
        let names: Vec<String> = self.read_live().keys().cloned().collect();
        for name in names {
            let Ok(routes) = self.store.routes(&name) else {
                continue;
            };
            let same = self
                .read_live()
                .get(&name)
                .is_some_and(|live| live.routes == routes);
            if same {
                continue;
            }
            // A version that cannot be loaded (files gone or changed) keeps the old routes.
            if let Ok(new) = self.build_live(routes) {
                let old = self.write_live().insert(name, new);
                drop(old);
            }
        }
    }

    /// The registered version of an id. A version is immutable once registered, so each is read
    /// from the store once (on a fleet's store, a round trip per request saved).
    fn registered(&self, id: &VersionId) -> Result<Option<Arc<VersionRecord>>> {
        if let Some(record) = self.by_id.read().unwrap_or_else(|p| p.into_inner()).get(id) {
            return Ok(Some(record.clone()));
        }
        let Some(record) = self.store.versions()?.into_iter().find(|v| v.id == *id) else {
            return Ok(None);
        };
        let record = Arc::new(record);
        let mut by_id = self.by_id.write().unwrap_or_else(|p| p.into_inner());
        Ok(Some(by_id.entry(id.clone()).or_insert(record).clone()))
    }

    /// Where a request for `addressed` (with routing key `key`) goes, and why.
    pub(super) fn decide(self: &Arc<Self>, addressed: &str, key: Option<&str>) -> Result<Decision> {
        let direct = |slot: Arc<Slot>, reason: &str| Decision {
            name: slot.record.name.clone(),
            slot,
            route: "direct".into(),
            reason: reason.into(),
            shadow: None,
            compare: None,
            guard: None,
        };
        if let Some(id) = VersionId::parse(addressed) {
            // A version id: registered under some name, served as is.
            return match self.registered(&id)? {
                Some(record) => Ok(direct(self.slot(&record)?, "addressed by version id")),
                None => match self.below.target(addressed) {
                    Ok(t) => Ok(direct(
                        Arc::new(self.hosted(t)),
                        "loaded by the host, unregistered",
                    )),
                    Err(_) => Err(Error::Unregistered(addressed.to_string())),
                },
            };
        }
        let (name, alias) = match addressed.split_once('@') {
            Some((name, alias)) => (name, Some(alias)),
            None => (addressed, None),
        };
        let live = match self.live(name) {
            Ok(live) => live,
            // Not a registered name: an alias the host set on the engine itself.
            Err(Error::UnknownName(unknown)) if alias.is_none() => {
                return match self.below.target(addressed) {
                    Ok(t) => Ok(direct(
                        Arc::new(self.hosted(t)),
                        "an alias of the engine, unregistered",
                    )),
                    Err(_) => Err(Error::UnknownName(unknown)),
                }
            }
            Err(e) => return Err(e),
        };
        let slot_of = |alias: &str| -> Result<Arc<Slot>> {
            if let Some(slot) = live.slots.get(alias) {
                return Ok(slot.clone());
            }
            let unknown = || Error::UnknownAlias {
                name: name.to_string(),
                alias: alias.to_string(),
            };
            let id = live.routes.aliases.get(alias).ok_or_else(unknown)?;
            let mut others = live.others.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(slot) = others.get(alias) {
                return Ok(slot.clone());
            }
            let record = self.store.version(name, id)?.ok_or_else(unknown)?;
            let slot = self.slot(&record)?;
            others.insert(alias.to_string(), slot.clone());
            Ok(slot)
        };
        let decision = |slot, route: &str, reason: String| Decision {
            slot,
            route: route.to_string(),
            reason,
            shadow: None,
            compare: None,
            guard: None,
            name: name.to_string(),
        };
        if let Some(alias) = alias {
            return Ok(decision(slot_of(alias)?, alias, format!("addressed {addressed}")));
        }
        let production = slot_of(PRODUCTION)?;
        let (Some(canary), Some(config)) = (live.slots.get(CANARY), &live.routes.canary) else {
            return Ok(decision(production, PRODUCTION, "no canary".into()));
        };
        let (bucket, by) = match key {
            Some(key) => (bucket_of(name, key), "key"),
            None => (rand::random::<u32>() % BUCKETS, "random draw"),
        };
        let chosen = f64::from(bucket) < config.percent * f64::from(BUCKETS) / 100.0;
        let guard = live.guard.clone();
        Ok(match (chosen, config.shadow) {
            (true, false) => Decision {
                reason: format!(
                    "canary {}% split: {by} bucket {bucket} of {BUCKETS}",
                    config.percent
                ),
                compare: guard
                    .as_ref()
                    .filter(|g| g.wants_divergence())
                    .map(|_| production.clone()),
                guard,
                ..decision(canary.clone(), CANARY, String::new())
            },
            (true, true) => Decision {
                reason: format!(
                    "production; shadow copy to the canary ({}%, {by} bucket {bucket})",
                    config.percent
                ),
                shadow: Some(canary.clone()),
                guard,
                ..decision(production, PRODUCTION, String::new())
            },
            (false, _) => Decision {
                guard,
                ..decision(
                    production,
                    PRODUCTION,
                    format!(
                        "canary {}%: {by} bucket {bucket} of {BUCKETS} stays on production",
                        config.percent
                    ),
                )
            },
        })
    }
}

/// Sticky buckets: a key's bucket is the same in every process and after restarts.
const BUCKETS: u32 = 10_000;

/// The bucket (0-9999) of a routing key for a model name: a hash of both, so that one key is
/// not always the canary for every model.
pub fn bucket_of(name: &str, key: &str) -> u32 {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    let d = h.finalize();
    let n = u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
    (n % u64::from(BUCKETS)) as u32
}
