//! Online drift windows against a [`Profile`]: each value lands in its fixed bin (O(log bins));
//! when a window is full (by count, or by time) every signal is computed, judged against its
//! warn and alarm thresholds, and the window starts again. Memory is bounded by the profile's
//! size and a short history of reports, whatever the traffic.

use super::profile::{confidence, cosine_distance, Categorical, Numeric, Profile, ProjectionMatrices};
use super::stats::{binned_drift, chi_square, chi_square_upper, ks_critical, Binned};
use crate::{Input, Output, Record, Value};
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A signal's (and a window's) judgement.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Within the noise of a window of this size.
    #[default]
    Ok,
    /// Past the warn threshold.
    Warn,
    /// Past the alarm threshold.
    Alarm,
}

impl State {
    /// The state's name.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Ok => "ok",
            State::Warn => "warn",
            State::Alarm => "alarm",
        }
    }
}

/// One signal of a window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Signal {
    /// The statistic.
    pub value: f64,
    /// Its warn threshold.
    pub warn: f64,
    /// Its alarm threshold.
    pub alarm: f64,
    /// The judgement.
    pub state: State,
}

impl Signal {
    fn judge(value: f64, warn: f64, alarm: f64) -> Self {
        let state = if value > alarm {
            State::Alarm
        } else if value > warn {
            State::Warn
        } else {
            State::Ok
        };
        Self {
            value,
            warn,
            alarm,
            state,
        }
    }
}

/// A finished window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WindowReport {
    /// The window's number, from 0.
    pub index: u64,
    /// Values (rows, texts, generations) in it.
    pub count: usize,
    /// The worst of its signals.
    pub state: State,
    /// Every signal by name: `input.<field>.<psi|ks|js|wasserstein>`, `input.<field>.chi2`,
    /// `output.class_mix.chi2`, `output.<max_probability|margin|entropy|length>.<stat>`,
    /// `embedding.centroid_distance.<stat>`, `embedding.mmd`.
    pub signals: BTreeMap<String, Signal>,
}

/// When a window ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowSize {
    /// After this many values.
    Count(usize),
    /// After this much time (judged when the next value comes, if it holds at least 10 values).
    Time(Duration),
}

/// How the monitor judges.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DriftConfig {
    /// When a window ends.
    pub window: WindowSize,
    /// The false-warn rate of a window whose data are drawn like the reference: the thresholds
    /// are set for it (Bonferroni over the signals monitored, the window's and the reference's
    /// sizes both counted).
    pub warn_rate: f64,
    /// The false-alarm rate, likewise.
    pub alarm_rate: f64,
    /// Finished windows kept for [`DriftMonitor::reports`].
    pub history: usize,
}

impl DriftConfig {
    /// Windows of `n` values, a 0.5% false-warn and 0.05% false-alarm rate per window.
    pub fn count(n: usize) -> Self {
        Self {
            window: WindowSize::Count(n.max(1)),
            warn_rate: 0.005,
            alarm_rate: 0.0005,
            history: 256,
        }
    }
}

/// Counts of one window.
#[derive(Debug, Clone)]
struct Counts {
    numeric: Vec<NumericCounts>,
    categorical: Vec<Vec<f64>>,
    classes: Vec<f64>,
    outputs: Vec<NumericCounts>,
    distance: NumericCounts,
    features: Vec<f64>,
    count: usize,
    started: Instant,
}

#[derive(Debug, Clone)]
struct NumericCounts {
    bins: Vec<f64>,
    sums: Vec<f64>,
}

impl NumericCounts {
    fn new(n: usize) -> Self {
        Self {
            bins: vec![0.0; n],
            sums: vec![0.0; n],
        }
    }
    fn add(&mut self, reference: &Numeric, x: f64) {
        if x.is_finite() {
            let i = reference.bins.index(x);
            self.bins[i] += 1.0;
            self.sums[i] += x;
        }
    }
    fn total(&self) -> f64 {
        self.bins.iter().sum()
    }
}

struct Inner {
    counts: Counts,
    index: u64,
    last: Option<WindowReport>,
    history: VecDeque<WindowReport>,
}

/// A state-change callback: the report of the window whose state differs from the one before.
pub type OnChange = Box<dyn Fn(&WindowReport) + Send + Sync>;

/// The drift monitor of one model version.
pub struct DriftMonitor {
    profile: Arc<Profile>,
    config: DriftConfig,
    numeric: Vec<(String, Numeric)>,
    categorical: Vec<(String, Categorical)>,
    outputs: Vec<(String, Numeric)>,
    matrices: Option<ProjectionMatrices>,
    inner: Mutex<Inner>,
    on_change: Option<OnChange>,
}

impl DriftMonitor {
    /// A monitor of windows against `profile`.
    pub fn new(profile: Arc<Profile>, config: DriftConfig) -> Self {
        let numeric: Vec<_> = profile
            .numeric
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let categorical: Vec<_> = profile
            .categorical
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let outputs: Vec<_> = profile
            .outputs
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let matrices = profile.embedding.as_ref().map(|e| e.projection.matrices());
        let mut monitor = Self {
            profile,
            config,
            numeric,
            categorical,
            outputs,
            matrices,
            inner: Mutex::new(Inner {
                counts: Counts {
                    numeric: Vec::new(),
                    categorical: Vec::new(),
                    classes: Vec::new(),
                    outputs: Vec::new(),
                    distance: NumericCounts::new(0),
                    features: Vec::new(),
                    count: 0,
                    started: Instant::now(),
                },
                index: 0,
                last: None,
                history: VecDeque::new(),
            }),
            on_change: None,
        };
        let fresh = monitor.fresh_counts();
        monitor.inner.get_mut().unwrap_or_else(|p| p.into_inner()).counts = fresh;
        monitor
    }

    /// Calls `f` with the report of every window whose state differs from the window's before
    /// (the first window: when it is not ok).
    pub fn on_change(mut self, f: impl Fn(&WindowReport) + Send + Sync + 'static) -> Self {
        self.on_change = Some(Box::new(f));
        self
    }

    /// The profile it judges against.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    fn fresh_counts(&self) -> Counts {
        let e = self.profile.embedding.as_ref();
        Counts {
            numeric: self
                .numeric
                .iter()
                .map(|(_, n)| NumericCounts::new(n.bins.len()))
                .collect(),
            categorical: self
                .categorical
                .iter()
                .map(|(_, c)| vec![0.0; c.reference.len()])
                .collect(),
            classes: self
                .profile
                .classes
                .as_ref()
                .map_or(Vec::new(), |c| vec![0.0; c.reference.len()]),
            outputs: self
                .outputs
                .iter()
                .map(|(_, n)| NumericCounts::new(n.bins.len()))
                .collect(),
            distance: NumericCounts::new(e.map_or(0, |e| e.distance.bins.len())),
            features: vec![0.0; e.map_or(0, |e| e.mean_features.len())],
            count: 0,
            started: Instant::now(),
        }
    }

    /// Counts a request's inputs as they came (before any contract repaired them): a tabular
    /// row's fields, a text's length. The window's size counts answers
    /// ([`DriftMonitor::observe_output`]), so a refused input is seen here and not counted there.
    pub fn observe_input(&self, input: &Input) {
        let mut inner = self.lock();
        let c = &mut inner.counts;
        match input {
            Input::Classify(rows) => rows.iter().for_each(|row| self.add_row(c, row)),
            Input::Embed(texts) => texts.iter().for_each(|t| self.add_text(c, t)),
            Input::Generate { prompt, .. } => self.add_text(c, prompt),
        }
    }

    /// Counts a request's answers: classes and their confidence, embeddings, generation
    /// lengths; each answer is one value of the window.
    pub fn observe_output(&self, output: &Output) {
        let mut inner = self.lock();
        let items = match output {
            Output::Classes(classes) => {
                for answer in classes {
                    let c = &mut inner.counts;
                    if let Some(n) = c.classes.get_mut(answer.class) {
                        *n += 1.0;
                    }
                    for (name, value) in confidence(answer) {
                        self.add_output(c, name, value);
                    }
                }
                classes.len()
            }
            Output::Embeddings(vectors) => {
                if let (Some(e), Some(m)) = (&self.profile.embedding, &self.matrices) {
                    for v in vectors.iter().filter(|v| v.len() == e.centroid.len()) {
                        let c = &mut inner.counts;
                        c.distance.add(&e.distance, cosine_distance(v, &e.centroid));
                        let f = e.projection.features(v, m);
                        c.features.iter_mut().zip(f).for_each(|(s, x)| *s += x);
                    }
                }
                vectors.len()
            }
            Output::Completion(done) => {
                self.add_output(&mut inner.counts, "length", done.token_ids.len() as f64);
                1
            }
        };
        for _ in 0..items {
            inner = self.count_one(inner);
        }
    }

    fn add_row(&self, c: &mut Counts, row: &Record) {
        for ((name, reference), counts) in self.numeric.iter().zip(&mut c.numeric) {
            match row.get(name) {
                Some(Value::Number(x)) => counts.add(reference, *x),
                Some(Value::Text(t)) => {
                    if let Ok(x) = t.trim().parse::<f64>() {
                        counts.add(reference, x)
                    }
                }
                _ => {}
            }
        }
        for ((name, reference), counts) in self.categorical.iter().zip(&mut c.categorical) {
            if let Some(Value::Text(t)) = row.get(name) {
                counts[reference.index(t)] += 1.0;
            }
        }
    }

    fn add_text(&self, c: &mut Counts, text: &str) {
        if let Some(i) = self.numeric.iter().position(|(n, _)| n == "text_length") {
            c.numeric[i].add(&self.numeric[i].1, text.chars().count() as f64);
        }
    }

    fn add_output(&self, c: &mut Counts, name: &str, value: f64) {
        if let Some(i) = self.outputs.iter().position(|(n, _)| n == name) {
            c.outputs[i].add(&self.outputs[i].1, value);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one answer; a full window is judged, and the callback (if its state changed) is
    /// called outside the lock.
    fn count_one<'a>(
        &'a self,
        mut inner: std::sync::MutexGuard<'a, Inner>,
    ) -> std::sync::MutexGuard<'a, Inner> {
        inner.counts.count += 1;
        let full = match self.config.window {
            WindowSize::Count(n) => inner.counts.count >= n,
            WindowSize::Time(d) => inner.counts.count >= 10 && inner.counts.started.elapsed() >= d,
        };
        if !full {
            return inner;
        }
        let before = inner.last.as_ref().map(|l| l.state);
        let report = self.end_window(&mut inner);
        let changed = before.map_or(report.state != State::Ok, |b| b != report.state);
        if let (true, Some(f)) = (changed, &self.on_change) {
            drop(inner);
            f(&report);
            return self.lock();
        }
        inner
    }

    fn end_window(&self, inner: &mut Inner) -> WindowReport {
        let counts = std::mem::replace(&mut inner.counts, self.fresh_counts());
        let report = self.judge(inner.index, &counts);
        inner.index += 1;
        inner.history.push_back(report.clone());
        while inner.history.len() > self.config.history {
            inner.history.pop_front();
        }
        inner.last = Some(report.clone());
        report
    }

    /// Ends the window now (if it holds anything) and gives its report.
    pub fn close_window(&self) -> Option<WindowReport> {
        let mut inner = self.lock();
        (inner.counts.count > 0).then(|| self.end_window(&mut inner))
    }

    /// How many windows have finished (cheap: no report is copied).
    pub fn windows(&self) -> u64 {
        self.lock().index
    }

    /// The last finished window's report (None before the first window ends).
    pub fn last(&self) -> Option<WindowReport> {
        self.lock().last.clone()
    }

    /// The state now: the last finished window's.
    pub fn state(&self) -> State {
        self.lock().last.as_ref().map_or(State::Ok, |r| r.state)
    }

    /// The finished windows kept (the newest last).
    pub fn reports(&self) -> Vec<WindowReport> {
        self.lock().history.iter().cloned().collect()
    }

    /// Judges one window's counts.
    fn judge(&self, index: u64, c: &Counts) -> WindowReport {
        let m = self.profile.count as f64;
        // Bonferroni over the variables watched: their statistics are correlated, so the
        // variable (not the statistic) is the unit.
        let watched = (self.numeric.len()
            + self.categorical.len()
            + usize::from(self.profile.classes.is_some())
            + self.outputs.len()
            + 2 * usize::from(self.profile.embedding.is_some()))
        .max(1) as f64;
        let (warn_p, alarm_p) = (self.config.warn_rate / watched, self.config.alarm_rate / watched);
        let mut signals = BTreeMap::new();
        let mut numeric = |prefix: &str, reference: &Numeric, counts: &NumericCounts| {
            let n = counts.total();
            if n < 1.0 {
                return;
            }
            let reference_counts: Vec<f64> = reference.reference.iter().map(|p| p * m).collect();
            let means: Vec<f64> = counts
                .sums
                .iter()
                .zip(&counts.bins)
                .map(|(s, c)| if *c > 0.0 { s / c } else { 0.0 })
                .collect();
            let d = binned_drift(
                &reference.bins,
                Binned {
                    counts: &reference_counts,
                    means: &reference.means,
                },
                Binned {
                    counts: &counts.bins,
                    means: &means,
                },
            );
            let n_eff = n * m / (n + m);
            let dof = reference.bins.len().saturating_sub(1).max(1);
            let chi = |p: f64| chi_square_upper(p, dof) / n_eff;
            let ks = |p: f64| ks_critical(p, n as usize, self.profile.count);
            let std = if reference.std > 0.0 { reference.std } else { 1.0 };
            let stats = [
                ("psi", d.psi, chi(warn_p), chi(alarm_p)),
                ("ks", d.ks, ks(warn_p), ks(alarm_p)),
                (
                    "js",
                    d.js,
                    (chi(warn_p) / 8.0).sqrt(),
                    (chi(alarm_p) / 8.0).sqrt(),
                ),
                // W1 in units of the reference's spread; a CDF gap at the KS threshold held
                // over two standard deviations.
                (
                    "wasserstein",
                    d.wasserstein / std,
                    2.0 * ks(warn_p),
                    2.0 * ks(alarm_p),
                ),
            ];
            for (stat, value, warn, alarm) in stats {
                signals.insert(format!("{prefix}.{stat}"), Signal::judge(value, warn, alarm));
            }
        };
        for ((name, reference), counts) in self.numeric.iter().zip(&c.numeric) {
            numeric(&format!("input.{name}"), reference, counts);
        }
        for ((name, reference), counts) in self.outputs.iter().zip(&c.outputs) {
            numeric(&format!("output.{name}"), reference, counts);
        }
        if let Some(e) = &self.profile.embedding {
            numeric("embedding.centroid_distance", &e.distance, &c.distance);
        }
        let mut categorical = |name: String, reference: &[f64], counts: &[f64]| {
            let n: f64 = counts.iter().sum();
            if n < 1.0 {
                return;
            }
            let seen = reference.iter().filter(|p| **p > 0.0).count().max(2);
            // The reference is a sample too: its noise adds n/m of the window's.
            let scale = 1.0 + n / m;
            let threshold = |p: f64| chi_square_upper(p, seen - 1) * scale;
            let value = chi_square(counts, reference);
            signals.insert(name, Signal::judge(value, threshold(warn_p), threshold(alarm_p)));
        };
        for ((name, reference), counts) in self.categorical.iter().zip(&c.categorical) {
            categorical(format!("input.{name}.chi2"), &reference.reference, counts);
        }
        if let Some(classes) = &self.profile.classes {
            categorical("output.class_mix.chi2".into(), &classes.reference, &c.classes);
        }
        if let Some(e) = &self.profile.embedding {
            let n = c.distance.total();
            if n >= 1.0 && e.spread > 0.0 {
                // ||mean features - reference mean||^2 over its expected value under no drift:
                // about 1 when nothing changed.
                let gap: f64 = c
                    .features
                    .iter()
                    .zip(&e.mean_features)
                    .map(|(s, r)| (s / n - r).powi(2))
                    .sum();
                let noise = e.spread * (1.0 / n + 1.0 / m);
                let dof = (e.mmd_dof.floor() as usize).max(1);
                let threshold = |p: f64| chi_square_upper(p, dof) / dof as f64;
                let (warn, alarm) = (threshold(warn_p), threshold(alarm_p));
                signals.insert("embedding.mmd".into(), Signal::judge(gap / noise, warn, alarm));
            }
        }
        let state = signals.values().map(|s| s.state).max().unwrap_or_default();
        WindowReport {
            index,
            count: c.count,
            state,
            signals,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::ProfileBuilder;
    use crate::{Classification, Input, Output};

    fn row(site: &str, x: f64) -> Input {
        Input::Classify(vec![[
            ("site".to_string(), Value::Text(site.into())),
            ("x".to_string(), Value::Number(x)),
        ]
        .into()])
    }

    fn answer() -> Output {
        Output::Classes(vec![Classification {
            class: 0,
            label: "a".into(),
            probabilities: vec![0.9, 0.1],
        }])
    }

    #[test]
    fn a_changed_category_mix_alarms_and_the_same_mix_does_not() {
        let mut b = ProfileBuilder::new();
        let sites = ["north", "south", "east", "west"];
        for i in 0..400 {
            b.add(
                &row(sites[i % 4], (i % 17) as f64),
                &answer(),
                &["a".into(), "b".into()],
            );
        }
        let profile = Arc::new(b.finish("m", 100).unwrap());
        assert_eq!(profile.categorical["site"].categories.len(), 4);
        let judge = |site: &dyn Fn(usize) -> &'static str| {
            let m = DriftMonitor::new(profile.clone(), DriftConfig::count(100));
            for i in 0..100 {
                m.observe_input(&row(site(i), (i % 17) as f64));
                m.observe_output(&answer());
            }
            m.last().unwrap().signals["input.site.chi2"]
        };
        assert_eq!(judge(&|i| sites[i % 4]).state, State::Ok);
        // Half the rows from one site, and a site never seen.
        let shifted = judge(&|i| {
            if i % 2 == 0 {
                "north"
            } else if i % 3 == 0 {
                "mars"
            } else {
                "south"
            }
        });
        assert_eq!(shifted.state, State::Alarm, "{shifted:?}");
    }

    #[test]
    fn generation_lengths_drift() {
        let completion = |n: usize| {
            Output::Completion(crate::Completion {
                prompt_ids: vec![1, 2, 3],
                token_ids: vec![7; n],
                text: String::new(),
                finish: crate::FinishReason::Stop,
                logprobs: Vec::new(),
            })
        };
        let prompt = |i: usize| Input::Generate {
            prompt: format!("question {i}"),
            params: crate::GenerateParams::greedy(),
        };
        let mut b = ProfileBuilder::new();
        for i in 0..200 {
            b.add(&prompt(i), &completion(15 + i % 10), &[]);
        }
        let profile = Arc::new(b.finish("m", 40).unwrap());
        let judge = |lengths: &dyn Fn(usize) -> usize| {
            let m = DriftMonitor::new(profile.clone(), DriftConfig::count(40));
            for i in 0..40 {
                m.observe_input(&prompt(i));
                m.observe_output(&completion(lengths(i)));
            }
            m.last().unwrap().signals["output.length.ks"].state
        };
        assert_eq!(judge(&|i| 15 + (i * 7) % 10), State::Ok);
        // Replies twice as long.
        assert_eq!(judge(&|i| 30 + i % 20), State::Alarm);
    }
}
