//! Budgets per routing key, never overspent: a request reserves its worst-case cost before it
//! runs and is charged its actual cost (never more than the reservation) when it is answered.

use crate::{Error, ErrorKind};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Amounts are kept in billionths of a unit, as integers: sums are exact, so a budget of 10
/// calls at 0.1 admits exactly 10.
const SCALE: f64 = 1e9;

fn units(x: f64) -> u64 {
    (x * SCALE).round().clamp(0.0, u64::MAX as f64) as u64
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
}

/// The budgets of every key, behind one lock (a reservation is a few additions under it).
#[derive(Default, Clone)]
pub struct Budgets {
    accounts: Arc<Mutex<HashMap<String, Account>>>,
}

/// A worst-case cost held against a key's budget until the request is answered. Dropped
/// without [`Reservation::settle`] (the request failed), it is released and nothing is charged.
pub struct Reservation {
    accounts: Arc<Mutex<HashMap<String, Account>>>,
    key: String,
    held: u64,
}

impl Budgets {
    /// Sets (or replaces) a key's budget; what it spent in its current period is kept.
    pub fn set(&self, key: &str, budget: Budget) {
        let mut accounts = self.lock();
        let now = Instant::now();
        match accounts.get_mut(key) {
            Some(a) => a.budget = budget,
            None => {
                accounts.insert(
                    key.to_string(),
                    Account {
                        budget,
                        period_start: now,
                        spent: 0,
                        reserved: 0,
                    },
                );
            }
        }
    }

    /// A key's budget, if it has one.
    pub fn budget(&self, key: &str) -> Option<Budget> {
        self.lock().get(key).map(|a| a.budget.clone())
    }

    /// Where a key's budget stands (None: it has no budget).
    pub fn spend(&self, key: &str) -> Option<Spend> {
        let mut accounts = self.lock();
        let a = accounts.get_mut(key)?;
        a.roll(Instant::now());
        Some(Spend {
            limit: a.budget.limit,
            spent: amount(a.spent),
            reserved: amount(a.reserved),
            left: amount(a.left()),
        })
    }

    /// Every key's spend, by key.
    pub fn all(&self) -> Vec<(String, Spend)> {
        let keys: Vec<String> = self.lock().keys().cloned().collect();
        let mut out: Vec<(String, Spend)> = keys
            .into_iter()
            .filter_map(|k| self.spend(&k).map(|s| (k, s)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Holds `worst_case` against the key's budget; a key without a budget always gets a
    /// reservation (of nothing).
    ///
    /// # Errors
    /// [`BudgetError`] if what is left this period is less than `worst_case`.
    pub fn reserve(&self, key: &str, worst_case: f64) -> Result<Reservation, BudgetError> {
        let mut accounts = self.lock();
        let Some(a) = accounts.get_mut(key) else {
            return Ok(self.reservation(key, 0));
        };
        a.roll(Instant::now());
        let needed = units(worst_case);
        if needed > a.left() {
            return Err(BudgetError {
                key: key.to_string(),
                needed: worst_case,
                left: amount(a.left()),
                limit: a.budget.limit,
            });
        }
        a.reserved += needed;
        Ok(self.reservation(key, needed))
    }

    /// A reservation of nothing, charged to no budget.
    pub(crate) fn unpaid(&self) -> Reservation {
        self.reservation("", 0)
    }

    fn reservation(&self, key: &str, held: u64) -> Reservation {
        Reservation {
            accounts: self.accounts.clone(),
            key: key.to_string(),
            held,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Account>> {
        self.accounts.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Reservation {
    /// Charges the actual cost (at most what was reserved) and releases the rest.
    pub fn settle(mut self, actual: f64) {
        let charged = units(actual).min(self.held);
        self.release(charged);
    }

    fn release(&mut self, charged: u64) {
        let held = std::mem::take(&mut self.held);
        if held == 0 {
            return;
        }
        let mut accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = accounts.get_mut(&self.key) {
            a.reserved = a.reserved.saturating_sub(held);
            a.spent += charged;
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.release(0);
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
        budgets.set("t", budget);
        for i in 0..10 {
            budgets
                .reserve("t", 0.1)
                .unwrap_or_else(|e| panic!("call {i}: {e}"))
                .settle(0.1);
        }
        let e = budgets.reserve("t", 0.1).err().unwrap();
        assert_eq!(e.left, 0.0);
        assert_eq!(budgets.spend("t").unwrap().spent, 1.0);
        // A failed request (a dropped reservation) is charged nothing.
        std::thread::sleep(Duration::from_millis(210));
        drop(budgets.reserve("t", 0.5).unwrap());
        let r = budgets.reserve("t", 0.6).unwrap();
        assert!(budgets.reserve("t", 0.5).is_err(), "0.6 of 1.0 is held");
        r.settle(0.2);
        assert_eq!(budgets.spend("t").unwrap().left, 0.8);
        // A key without a budget is never refused.
        assert!(budgets.reserve("other", 1e9).is_ok());
    }
}
