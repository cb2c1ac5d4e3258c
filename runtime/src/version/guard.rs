//! The canary guard: the canary's error rate, latency against production's, and divergence from
//! production, over a minimum number of requests; crossing a threshold rolls the canary back.

use crate::store::Guard;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Latencies kept per side for the p99 (the most recent ones).
const WINDOW: usize = 2048;

/// The guard's figures for a canary.
#[derive(Debug, Clone, PartialEq)]
pub struct GuardReport {
    /// Canary requests seen (split traffic or shadow copies).
    pub canary_requests: u64,
    /// Share of them that failed.
    pub error_rate: f64,
    /// The canary's p99 latency over production's (None: too few of either).
    pub p99_ratio: Option<f64>,
    /// Mean divergence from production over the compared requests (None: none compared).
    pub divergence: Option<f64>,
    /// Requests compared with production.
    pub compared: u64,
    /// Why the guard tripped, if it has.
    pub tripped: Option<String>,
}

#[derive(Default)]
struct Figures {
    canary: u64,
    errors: u64,
    canary_latency: VecDeque<f64>,
    production_latency: VecDeque<f64>,
    divergence_sum: f64,
    compared: u64,
    tripped: Option<String>,
}

pub(crate) struct GuardState {
    config: Guard,
    figures: Mutex<Figures>,
    /// Set once the rollback has been asked for, so that it is asked for once.
    acted: AtomicBool,
}

fn push(window: &mut VecDeque<f64>, value: f64) {
    if window.len() == WINDOW {
        window.pop_front();
    }
    window.push_back(value);
}

fn p99(window: &VecDeque<f64>) -> Option<f64> {
    if window.len() < 20 {
        return None;
    }
    let mut v: Vec<f64> = window.iter().copied().collect();
    let last = v.len() - 1;
    let k = (((v.len() as f64) * 0.99).ceil() as usize - 1).min(last);
    let (_, x, _) = v.select_nth_unstable_by(k, f64::total_cmp);
    Some(*x)
}

impl GuardState {
    pub fn new(config: Guard) -> Self {
        Self {
            config,
            figures: Mutex::default(),
            acted: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Figures> {
        self.figures.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn wants_divergence(&self) -> bool {
        self.config.max_divergence.is_some()
    }

    /// A request answered (or failed) by the canary or by production.
    pub fn observe(&self, canary: bool, ok: bool, latency: Duration) {
        let mut f = self.lock();
        let ms = latency.as_secs_f64() * 1e3;
        if canary {
            f.canary += 1;
            f.errors += u64::from(!ok);
            if ok {
                push(&mut f.canary_latency, ms);
            }
        } else if ok {
            push(&mut f.production_latency, ms);
        }
        self.judge(&mut f);
    }

    /// A request both versions ran, and how far apart their outputs were.
    pub fn observe_divergence(&self, divergence: f64) {
        let mut f = self.lock();
        f.divergence_sum += divergence;
        f.compared += 1;
        self.judge(&mut f);
    }

    fn judge(&self, f: &mut Figures) {
        if f.tripped.is_some() {
            return;
        }
        let g = &self.config;
        let min = g.min_requests.max(1);
        if f.canary >= min {
            let rate = f.errors as f64 / f.canary as f64;
            if let Some(max) = g.max_error_rate.filter(|&m| rate > m) {
                f.tripped = Some(format!(
                    "error rate {rate:.3} > {max} over {} canary requests",
                    f.canary
                ));
                return;
            }
            if let (Some(max), Some(c), Some(p)) = (
                g.max_p99_ratio,
                p99(&f.canary_latency),
                p99(&f.production_latency),
            ) {
                let ratio = c / p.max(1e-6);
                if ratio > max {
                    f.tripped = Some(format!(
                        "p99 latency {c:.1} ms is {ratio:.2}x production's {p:.1} ms (> {max}x) over {} canary requests",
                        f.canary
                    ));
                    return;
                }
            }
        }
        if let Some(max) = g.max_divergence {
            if f.compared >= min {
                let mean = f.divergence_sum / f.compared as f64;
                if mean > max {
                    f.tripped = Some(format!(
                        "divergence from production {mean:.6} > {max} over {} compared requests",
                        f.compared
                    ));
                }
            }
        }
    }

    /// Why the guard tripped, the first time this is asked after it did (None otherwise).
    pub fn tripped(&self) -> Option<String> {
        let why = self.lock().tripped.clone()?;
        (!self.acted.swap(true, Ordering::SeqCst)).then_some(why)
    }

    pub fn report(&self) -> GuardReport {
        let f = self.lock();
        GuardReport {
            canary_requests: f.canary,
            error_rate: if f.canary == 0 {
                0.0
            } else {
                f.errors as f64 / f.canary as f64
            },
            p99_ratio: match (p99(&f.canary_latency), p99(&f.production_latency)) {
                (Some(c), Some(p)) => Some(c / p.max(1e-6)),
                _ => None,
            },
            divergence: (f.compared > 0).then(|| f.divergence_sum / f.compared as f64),
            compared: f.compared,
            tripped: f.tripped.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> Guard {
        Guard {
            min_requests: 10,
            max_error_rate: Some(0.2),
            max_p99_ratio: Some(3.0),
            max_divergence: Some(0.01),
        }
    }

    #[test]
    fn trips_on_each_threshold_only_after_the_minimum_and_once() {
        let g = GuardState::new(guard());
        for _ in 0..5 {
            g.observe(true, false, Duration::from_millis(1));
        }
        assert!(g.tripped().is_none(), "judged before min_requests");
        for _ in 0..5 {
            g.observe(true, false, Duration::from_millis(1));
        }
        assert!(g.tripped().unwrap().contains("error rate"));
        assert!(g.tripped().is_none(), "asked to act twice");

        let slow = GuardState::new(guard());
        for _ in 0..30 {
            slow.observe(false, true, Duration::from_millis(2));
            slow.observe(true, true, Duration::from_millis(10));
        }
        assert!(slow.tripped().unwrap().contains("p99"));

        let far = GuardState::new(guard());
        let near = GuardState::new(guard());
        for _ in 0..10 {
            far.observe_divergence(0.05);
            near.observe_divergence(0.001);
            near.observe(true, true, Duration::from_millis(2));
            near.observe(false, true, Duration::from_millis(2));
        }
        assert!(far.tripped().unwrap().contains("divergence"));
        assert!(near.tripped().is_none());
        assert_eq!(near.report().compared, 10);
    }
}
