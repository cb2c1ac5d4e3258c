//! Budgets per routing key, never overspent: a request reserves its worst-case cost before it
//! runs and is charged its actual cost (never more than the reservation) when it is answered.
//!
//! The ledger is this process's (a few additions under one lock), or the store's when processes
//! share one (a fleet's replicas on PostgreSQL): then each reservation is one atomic update of
//! the key's row in the database, and a budget holds across every replica.

#[cfg(feature = "store")]
use crate::store::{BudgetRow, BudgetStore, Reserved, Store};
use crate::{Error, ErrorKind};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Amounts are kept in billionths of a unit, as integers: sums are exact, so a budget of 10
/// calls at 0.1 admits exactly 10.
const SCALE: f64 = 1e9;

fn units(x: f64) -> u64 {
    (x * SCALE).round().clamp(0.0, i64::MAX as f64) as u64
}

fn amount(u: u64) -> f64 {
    u as f64 / SCALE
}

/// What happens to a request its key's budget cannot pay for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exhausted {
    /// Refused with [`ErrorKind::Budget`].
    Reject,
    /// Served by this cheaper model instead (a name the layer below resolves), if the budget
    /// can pay for that; else refused.
    Downgrade(String),
}

/// A key's budget: at most `limit` per `period` (or in all).
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    /// The most the key may spend per period.
    pub limit: f64,
    /// The period, starting when the budget is set; None: one period, forever.
    pub period: Option<Duration>,
    /// What happens at exhaustion.
    pub on_exhausted: Exhausted,
}

/// Where a key's budget stands.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Spend {
    /// The limit.
    pub limit: f64,
    /// Charged in this period.
    pub spent: f64,
    /// Held by requests running now.
    pub reserved: f64,
    /// Left to reserve.
    pub left: f64,
}

/// The key's budget cannot pay for a request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("the budget of key '{key}' cannot pay for this request: it costs up to {needed:.6}, and {left:.6} of {limit} is left this period")]
pub struct BudgetError {
    /// The routing key.
    pub key: String,
    /// The request's worst-case cost.
    pub needed: f64,
    /// What was left to reserve.
    pub left: f64,
    /// The budget's limit.
    pub limit: f64,
    /// What the budget says to do now.
    pub on_exhausted: Exhausted,
}

impl From<BudgetError> for Error {
    fn from(e: BudgetError) -> Self {
        Error::Refused {
            kind: ErrorKind::Budget,
            source: Box::new(e),
        }
    }
}

struct Account {
    budget: Budget,
    period_start: Instant,
    spent: u64,
    reserved: u64,
}

impl Account {
    fn roll(&mut self, now: Instant) {
        if let Some(period) = self.budget.period.filter(|p| !p.is_zero()) {
            while now.duration_since(self.period_start) >= period {
                self.period_start += period;
                self.spent = 0;
            }
        }
    }

    fn left(&self) -> u64 {
        units(self.budget.limit).saturating_sub(self.spent + self.reserved)
    }

    fn spend(&self) -> Spend {
        Spend {
            limit: self.budget.limit,
            spent: amount(self.spent),
            reserved: amount(self.reserved),
            left: amount(self.left()),
        }
    }
}

/// Where the accounts are.
#[derive(Clone)]
enum Ledger {
    /// In this process, behind one lock (a reservation is a few additions under it).
    Local(Arc<Mutex<HashMap<String, Account>>>),
    /// In the store the processes share.
    #[cfg(feature = "store")]
    Stored(Arc<StoredLedger>),
}

/// The store's ledger, and the releases it could not take (the database was unreachable when a
/// request ended): they are sent again before each later call, so that a blip of the database
/// does not leave a reservation held for good.
#[cfg(feature = "store")]
struct StoredLedger {
    store: Arc<dyn BudgetStore>,
    /// (key, held, charged) of each release the store refused.
    unreleased: Mutex<Vec<(String, i64, i64)>>,
}

#[cfg(feature = "store")]
impl StoredLedger {
    fn release(&self, key: &str, held: i64, charged: i64) -> crate::Result<()> {
        self.release_again();
        self.store.release_budget(key, held, charged).map_err(|e| {
            self.unreleased().push((key.to_string(), held, charged));
            e.into()
        })
    }

    /// Sends the releases the store refused before; keeps those it refuses again.
    fn release_again(&self) {
        let pending = std::mem::take(&mut *self.unreleased());
        for (key, held, charged) in pending {
            if self.store.release_budget(&key, held, charged).is_err() {
                self.unreleased().push((key, held, charged));
            }
        }
    }

    fn unreleased(&self) -> std::sync::MutexGuard<'_, Vec<(String, i64, i64)>> {
        self.unreleased.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The budgets of every key.
#[derive(Clone)]
pub struct Budgets {
    ledger: Ledger,
}

impl Default for Budgets {
    /// This process's budgets.
    fn default() -> Self {
        Self {
            ledger: Ledger::Local(Arc::default()),
        }
    }
}

/// A worst-case cost held against a key's budget until the request is answered. Dropped
/// without [`Reservation::settle`] (the request failed), it is released and nothing is charged.
pub struct Reservation {
    ledger: Ledger,
    key: String,
    held: u64,
}

#[cfg(feature = "store")]
impl From<&BudgetRow> for Spend {
    fn from(row: &BudgetRow) -> Self {
        let a = |x: i64| amount(x.max(0) as u64);
        Spend {
            limit: a(row.limit),
            spent: a(row.spent),
            reserved: a(row.reserved),
            left: a(row.left()),
        }
    }
}

#[cfg(feature = "store")]
fn budget_of(row: &BudgetRow) -> Budget {
    Budget {
        limit: amount(row.limit.max(0) as u64),
        period: row.period_ms.map(|ms| Duration::from_millis(ms.max(0) as u64)),
        on_exhausted: row
            .downgrade_to
            .clone()
            .map_or(Exhausted::Reject, Exhausted::Downgrade),
    }
}

impl Budgets {
    /// The budgets kept in `store`, shared by every process on it (each reservation is one
    /// update of the key's row).
    #[cfg(feature = "store")]
    pub fn stored(store: Arc<dyn Store>) -> Self {
        Self {
            ledger: Ledger::Stored(Arc::new(StoredLedger {
                store,
                unreleased: Mutex::default(),
            })),
        }
    }

    /// Sets (or replaces) a key's budget; what it spent in its current period is kept.
    ///
    /// # Errors
    /// The store's, for stored budgets.
    pub fn set(&self, key: &str, budget: Budget) -> crate::Result<()> {
        match &self.ledger {
            Ledger::Local(accounts) => {
                let mut accounts = lock(accounts);
                match accounts.get_mut(key) {
                    Some(a) => a.budget = budget,
                    None => {
                        accounts.insert(
                            key.to_string(),
                            Account {
                                budget,
                                period_start: Instant::now(),
                                spent: 0,
                                reserved: 0,
                            },
                        );
                    }
                }
                Ok(())
            }
            #[cfg(feature = "store")]
            Ledger::Stored(ledger) => {
                let store = &ledger.store;
                let period_ms = budget.period.map(|p| p.as_millis().min(i64::MAX as u128) as i64);
                let downgrade_to = match &budget.on_exhausted {
                    Exhausted::Reject => None,
                    Exhausted::Downgrade(model) => Some(model.as_str()),
                };
                let limit = units(budget.limit) as i64;
                let now = crate::store::now_ms();
                Ok(store.set_budget(key, limit, period_ms, downgrade_to, now)?)
            }
        }
    }

    /// Where a key's budget stands (None: it has no budget).
    ///
    /// # Errors
    /// The store's, for stored budgets.
    pub fn spend(&self, key: &str) -> crate::Result<Option<Spend>> {
        Ok(self.all_of(Some(key))?.into_iter().next().map(|(_, s)| s))
    }

    /// Every key's spend, by key.
    ///
    /// # Errors
    /// The store's, for stored budgets.
    pub fn all(&self) -> crate::Result<Vec<(String, Spend)>> {
        self.all_of(None)
    }

    fn all_of(&self, key: Option<&str>) -> crate::Result<Vec<(String, Spend)>> {
        let mut out: Vec<(String, Spend)> = match &self.ledger {
            Ledger::Local(accounts) => {
                let now = Instant::now();
                lock(accounts)
                    .iter_mut()
                    .filter(|(k, _)| key.is_none_or(|key| key == k.as_str()))
                    .map(|(k, a)| {
                        a.roll(now);
                        (k.clone(), a.spend())
                    })
                    .collect()
            }
            #[cfg(feature = "store")]
            Ledger::Stored(ledger) => {
                let now = crate::store::now_ms();
                ledger
                    .store
                    .budget_rows(key)?
                    .into_iter()
                    .map(|row| {
                        let row = row.rolled(now);
                        (row.key.clone(), Spend::from(&row))
                    })
                    .collect()
            }
        };
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Holds `worst_case` against the key's budget; a key without a budget always gets a
    /// reservation (of nothing). The inner error: what is left this period is less than
    /// `worst_case` (nothing is held).
    ///
    /// # Errors
    /// The store's, for stored budgets (nothing is held).
    pub fn reserve(&self, key: &str, worst_case: f64) -> crate::Result<Result<Reservation, BudgetError>> {
        let needed = units(worst_case);
        let refusal = |left: u64, budget: &Budget| BudgetError {
            key: key.to_string(),
            needed: worst_case,
            left: amount(left),
            limit: budget.limit,
            on_exhausted: budget.on_exhausted.clone(),
        };
        match &self.ledger {
            Ledger::Local(accounts) => {
                let mut accounts = lock(accounts);
                let Some(a) = accounts.get_mut(key) else {
                    return Ok(Ok(self.reservation(key, 0)));
                };
                a.roll(Instant::now());
                if needed > a.left() {
                    return Ok(Err(refusal(a.left(), &a.budget)));
                }
                a.reserved += needed;
                Ok(Ok(self.reservation(key, needed)))
            }
            #[cfg(feature = "store")]
            Ledger::Stored(ledger) => {
                ledger.release_again();
                match ledger
                    .store
                    .reserve_budget(key, needed as i64, crate::store::now_ms())?
                {
                    Reserved::NoBudget => Ok(Ok(self.reservation(key, 0))),
                    Reserved::Held => Ok(Ok(self.reservation(key, needed))),
                    Reserved::Short(row) => Ok(Err(refusal(row.left() as u64, &budget_of(&row)))),
                }
            }
        }
    }

    /// A reservation of nothing, charged to no budget.
    pub(crate) fn unpaid(&self) -> Reservation {
        self.reservation("", 0)
    }

    fn reservation(&self, key: &str, held: u64) -> Reservation {
        Reservation {
            ledger: self.ledger.clone(),
            key: key.to_string(),
            held,
        }
    }
}

fn lock(accounts: &Mutex<HashMap<String, Account>>) -> std::sync::MutexGuard<'_, HashMap<String, Account>> {
    accounts.lock().unwrap_or_else(|p| p.into_inner())
}

impl Reservation {
    /// Charges the actual cost (at most what was reserved) and releases the rest.
    ///
    /// # Errors
    /// The store's, for stored budgets: then the whole reservation stays held until the store
    /// takes the release, sent again before each later reservation (the budget is never
    /// overspent; it admits less meanwhile).
    pub fn settle(mut self, actual: f64) -> crate::Result<()> {
        let charged = units(actual).min(self.held);
        self.release(charged)
    }

    fn release(&mut self, charged: u64) -> crate::Result<()> {
        let held = std::mem::take(&mut self.held);
        if held == 0 {
            return Ok(());
        }
        match &self.ledger {
            Ledger::Local(accounts) => {
                if let Some(a) = lock(accounts).get_mut(&self.key) {
                    a.reserved = a.reserved.saturating_sub(held);
                    a.spent += charged;
                }
                Ok(())
            }
            #[cfg(feature = "store")]
            Ledger::Stored(ledger) => ledger.release(&self.key, held as i64, charged as i64),
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // A release the store refuses now is sent again later (`StoredLedger`).
        let _ = self.release(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_admits_exactly_what_it_can_pay_for_and_renews_each_period() {
        let budgets = Budgets::default();
        let budget = Budget {
            limit: 1.0,
            period: Some(Duration::from_millis(200)),
            on_exhausted: Exhausted::Reject,
        };
        budgets.set("t", budget).unwrap();
        let reserve = |x: f64| budgets.reserve("t", x).unwrap();
        for i in 0..10 {
            reserve(0.1)
                .unwrap_or_else(|e| panic!("call {i}: {e}"))
                .settle(0.1)
                .unwrap();
        }
        let e = reserve(0.1).err().unwrap();
        assert_eq!(e.left, 0.0);
        assert_eq!(budgets.spend("t").unwrap().unwrap().spent, 1.0);
        // A failed request (a dropped reservation) is charged nothing.
        std::thread::sleep(Duration::from_millis(210));
        drop(reserve(0.5).unwrap());
        let r = reserve(0.6).unwrap();
        assert!(reserve(0.5).is_err(), "0.6 of 1.0 is held");
        r.settle(0.2).unwrap();
        assert_eq!(budgets.spend("t").unwrap().unwrap().left, 0.8);
        // A key without a budget is never refused.
        assert!(budgets.reserve("other", 1e9).unwrap().is_ok());
    }

    #[cfg(feature = "store")]
    #[test]
    fn a_release_the_store_refused_is_sent_again_once_it_is_back() {
        use crate::store::{BudgetRow, Error as StoreError, Reserved, Result as StoreResult};
        use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
        /// One budget of 10, in a store that can be down.
        struct Flaky {
            row: Mutex<BudgetRow>,
            down: AtomicBool,
        }
        impl Flaky {
            fn up(&self) -> StoreResult<std::sync::MutexGuard<'_, BudgetRow>> {
                match self.down.load(Relaxed) {
                    true => Err(StoreError::Database {
                        path: "flaky".into(),
                        reason: "the server is gone".into(),
                    }),
                    false => Ok(self.row.lock().unwrap()),
                }
            }
        }
        impl BudgetStore for Flaky {
            fn set_budget(
                &self,
                _: &str,
                _: i64,
                _: Option<i64>,
                _: Option<&str>,
                _: i64,
            ) -> StoreResult<()> {
                Ok(())
            }
            fn budget_rows(&self, _: Option<&str>) -> StoreResult<Vec<BudgetRow>> {
                Ok(vec![self.up()?.clone()])
            }
            fn reserve_budget(&self, _: &str, amount: i64, _: i64) -> StoreResult<Reserved> {
                let mut row = self.up()?;
                if row.left() < amount {
                    return Ok(Reserved::Short(row.clone()));
                }
                row.reserved += amount;
                Ok(Reserved::Held)
            }
            fn release_budget(&self, _: &str, held: i64, charged: i64) -> StoreResult<()> {
                let mut row = self.up()?;
                row.reserved -= held;
                row.spent += charged;
                Ok(())
            }
        }
        let store = Arc::new(Flaky {
            row: Mutex::new(BudgetRow {
                key: "k".into(),
                limit: units(10.0) as i64,
                period_ms: None,
                downgrade_to: None,
                period_start_ms: 0,
                spent: 0,
                reserved: 0,
            }),
            down: AtomicBool::new(false),
        });
        let budgets = Budgets {
            ledger: Ledger::Stored(Arc::new(StoredLedger {
                store: store.clone(),
                unreleased: Mutex::default(),
            })),
        };
        let held = budgets.reserve("k", 6.0).unwrap().unwrap();
        store.down.store(true, Relaxed);
        assert!(held.settle(2.0).is_err(), "the store is down");
        assert!(budgets.reserve("k", 1.0).is_err(), "a store error, not a refusal");
        assert_eq!(
            store.row.lock().unwrap().reserved,
            units(6.0) as i64,
            "still held"
        );
        store.down.store(false, Relaxed);
        // The next reservation sends the release first: 2 charged, the rest free again.
        let r = budgets.reserve("k", 1.0).unwrap().unwrap();
        let row = store.row.lock().unwrap().clone();
        assert_eq!((row.spent, row.reserved), (units(2.0) as i64, units(1.0) as i64));
        assert!(budgets.reserve("k", 7.5).unwrap().is_err(), "7 is left");
        drop(r);
        assert_eq!(store.row.lock().unwrap().reserved, 0);
    }
}
