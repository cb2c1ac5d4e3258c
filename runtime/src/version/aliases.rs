//! Alias administration: aliases move in single atomic steps (set, canary, promote, rollback,
//! abort), each recorded in the store with its time and reason; the target version is loaded
//! (and checked) before an alias moves.

use super::{check_name, Error, Result, Versioned, CANARY, PRODUCTION};
use crate::store::{AliasEvent, CanaryConfig, VersionRecord};
use crate::VersionId;

impl Versioned {
    /// Points `alias` of `name` at `version` (a registered id or a unique prefix of one).
    ///
    /// # Errors
    /// An unknown name or version; a version whose files changed since registration.
    pub fn set_alias(&self, name: &str, alias: &str, version: &str, reason: &str) -> Result<Vec<AliasEvent>> {
        check_name(alias)?;
        let target = self.find_version(name, version)?;
        let id = target.id.clone();
        let alias = alias.to_string();
        self.change(name, Some(target), &mut |routes, _| {
            routes.aliases.insert(alias.clone(), id.clone());
            if alias == CANARY && routes.canary.is_none() {
                // A canary alias set by hand gets no traffic until a split is given.
                routes.canary = Some(CanaryConfig {
                    percent: 0.0,
                    shadow: false,
                    guard: None,
                });
            }
            Ok(format!("alias: {reason}"))
        })
    }

    /// Makes `version` the canary of `name` with `config` (its share of traffic, shadow mode,
    /// guard). Production must be set.
    ///
    /// # Errors
    /// A percent outside 0-100, an unknown name or version, no production alias.
    pub fn canary(
        &self,
        name: &str,
        version: &str,
        config: CanaryConfig,
        reason: &str,
    ) -> Result<Vec<AliasEvent>> {
        if !(0.0..=100.0).contains(&config.percent) {
            return Err(Error::InvalidArgument(format!(
                "a canary percent must be within 0-100, not {}",
                config.percent
            )));
        }
        let target = self.find_version(name, version)?;
        let id = target.id.clone();
        self.change(name, Some(target), &mut |routes, _| {
            if !routes.aliases.contains_key(PRODUCTION) {
                return Err(format!(
                    "model '{name}' has no production version to canary against"
                ));
            }
            routes.aliases.insert(CANARY.into(), id.clone());
            routes.canary = Some(config.clone());
            let mode = if config.shadow { "shadow" } else { "split" };
            Ok(format!("canary {}% {mode}: {reason}", config.percent))
        })
    }

    /// Makes the canary the production version, in one step (the canary alias is cleared).
    ///
    /// # Errors
    /// No canary.
    pub fn promote(&self, name: &str, reason: &str) -> Result<Vec<AliasEvent>> {
        self.change(name, None, &mut |routes, _| {
            let Some(canary) = routes.aliases.remove(CANARY) else {
                return Err(format!("model '{name}' has no canary to promote"));
            };
            routes.aliases.insert(PRODUCTION.into(), canary);
            routes.canary = None;
            Ok(format!("promote: {reason}"))
        })
    }

    /// Returns production to the version it replaced, in one step. Successive rollbacks walk
    /// back through production's history.
    ///
    /// # Errors
    /// No earlier production version.
    pub fn rollback(&self, name: &str, reason: &str) -> Result<Vec<AliasEvent>> {
        let routes = self.shared.store.routes(name)?;
        let history = self.shared.store.history(name)?;
        let target = routes
            .aliases
            .get(PRODUCTION)
            .and_then(|now| replaced(&history, now))
            .and_then(|id| self.shared.store.version(name, &id).ok().flatten());
        self.change(name, target, &mut |routes, history| {
            let now = routes.aliases.get(PRODUCTION).cloned();
            let Some(before) = now.as_ref().and_then(|now| replaced(history, now)) else {
                return Err(format!(
                    "model '{name}' has no earlier production version to roll back to"
                ));
            };
            routes.aliases.insert(PRODUCTION.into(), before);
            Ok(format!("rollback: {reason}"))
        })
    }

    /// Ends the canary of `name` (its alias is cleared, production takes all traffic).
    ///
    /// # Errors
    /// No canary.
    pub fn abort_canary(&self, name: &str, reason: &str) -> Result<Vec<AliasEvent>> {
        self.change(name, None, &mut |routes, _| {
            if routes.aliases.remove(CANARY).is_none() {
                return Err(format!("model '{name}' has no canary"));
            }
            routes.canary = None;
            Ok(format!("canary rolled back: {reason}"))
        })
    }

    /// Drops this process's loaded versions of `name` (they are unloaded once their requests
    /// are answered); the next request loads what the routes say. Also the way to pick up
    /// route changes made by another process.
    pub fn release(&self, name: &str) {
        let old = self.shared.write_live().remove(name);
        drop(old);
    }

    fn find_version(&self, name: &str, version: &str) -> Result<VersionRecord> {
        self.shared.find_version(name, version)
    }

    /// A route change: the target version is loaded (and checked) first, then the store changes
    /// the routes atomically, then this process serves the new routes.
    fn change(
        &self,
        name: &str,
        target: Option<VersionRecord>,
        change: &mut crate::store::RouteChange<'_>,
    ) -> Result<Vec<AliasEvent>> {
        check_name(name)?;
        let s = &self.shared;
        let _serial = s.changing.lock().unwrap_or_else(|p| p.into_inner());
        let any = s.store.versions()?.iter().any(|v| v.name == name);
        if !any {
            return Err(Error::UnknownName(name.to_string()));
        }
        // Loaded before the switch: no request waits for a load, and a tampered version is
        // refused before any alias moves.
        let _preloaded = target.as_ref().map(|t| s.slot(t)).transpose()?;
        let (routes, events) = s
            .store
            .update_routes(name, change)?
            .map_err(Error::InvalidArgument)?;
        let live = s.build_live(routes)?;
        let old = s.write_live().insert(name.to_string(), live);
        // The old versions are let go outside the lock; requests in flight keep theirs.
        drop(old);
        Ok(events)
    }
}

/// The version production had before its latest move to `now` that was not a rollback.
fn replaced(history: &[AliasEvent], now: &VersionId) -> Option<VersionId> {
    history
        .iter()
        .rev()
        .filter(|e| e.alias == PRODUCTION && e.to.as_ref() == Some(now))
        .find(|e| !e.reason.starts_with("rollback"))
        .and_then(|e| e.from.clone())
}
