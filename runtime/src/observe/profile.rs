//! The reference profile: what a model's inputs and outputs looked like on a calibration set,
//! in the fixed bins that online windows count into. Written next to the manifest as
//! `profile.json` (`keel profile`); read by the drift monitor.

use super::stats::Bins;
use crate::{Classification, Input, Output, Record, Value};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The file name of a profile inside a model folder.
pub const PROFILE_FILE: &str = "profile.json";

/// Bins per numeric signal: fine enough that binned KS is within a few hundredths of the exact
/// one, coarse enough that a window of 50 fills them.
pub const BINS: usize = 16;

/// The dimensions of the fixed random projection embeddings are reduced to for the MMD.
const PROJECTED: usize = 16;
/// Random Fourier features of the projected embeddings: MMD becomes a distance of means, which
/// a window updates in O(1) per vector.
const FOURIER: usize = 64;

/// One numeric signal's reference: its bins and the share of the calibration set in each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Numeric {
    /// The fixed bins (edges at the reference's quantiles).
    pub bins: Bins,
    /// The reference's share in each bin.
    pub reference: Vec<f64>,
    /// The mean of the reference's values in each bin.
    pub means: Vec<f64>,
    /// The reference's mean.
    pub mean: f64,
    /// The reference's standard deviation (W1 is reported in units of it).
    pub std: f64,
}

impl Numeric {
    fn of(values: &[f64]) -> Option<Self> {
        let finite: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if finite.is_empty() {
            return None;
        }
        let bins = Bins::from_sample(&finite, BINS);
        let counts = bins.counts(&finite);
        let n = finite.len() as f64;
        let mean = finite.iter().sum::<f64>() / n;
        let std = (finite.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
        Some(Self {
            reference: counts.iter().map(|c| c / n).collect(),
            means: bins.means(&finite),
            bins,
            mean,
            std,
        })
    }
}

/// A categorical signal's reference: the categories seen and their shares (the last share is
/// for every category not listed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Categorical {
    /// The categories, in order.
    pub categories: Vec<String>,
    /// Their shares, then the share of all others.
    pub reference: Vec<f64>,
}

impl Categorical {
    /// The index of a category (the last index for an unlisted one).
    pub fn index(&self, category: &str) -> usize {
        self.categories
            .iter()
            .position(|c| c == category)
            .unwrap_or(self.categories.len())
    }
}

/// An encoder's embeddings: their distance to the reference centroid, and the mean of their
/// random Fourier features (for the MMD).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Embedding {
    /// The reference's mean vector, unit length.
    pub centroid: Vec<f32>,
    /// The cosine distance of each reference vector to the centroid.
    pub distance: Numeric,
    /// The projection's features.
    pub projection: Projection,
    /// The reference's mean feature vector.
    pub mean_features: Vec<f64>,
    /// The reference's mean squared distance of a feature vector to that mean: the scale of
    /// the MMD's noise.
    pub spread: f64,
    /// How many directions that noise is spread over ((tr S)^2 / tr S^2 of the features'
    /// covariance S): the normalized MMD is about chi-square with this many degrees of freedom,
    /// over them.
    pub mmd_dof: f64,
}

/// A fixed random projection followed by random Fourier features (an RBF kernel's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Projection {
    /// The seed everything random is drawn from.
    pub seed: u64,
    /// The embedding dimension.
    pub input: usize,
    /// The kernel's bandwidth in the projected space (the median distance of the reference).
    pub bandwidth: f64,
}

impl Projection {
    /// The feature vector of an embedding.
    pub fn features(&self, v: &[f32], matrices: &ProjectionMatrices) -> Vec<f64> {
        let projected: Vec<f64> = matrices
            .project
            .chunks_exact(self.input)
            .map(|row| row.iter().zip(v).map(|(a, b)| a * f64::from(*b)).sum())
            .collect();
        fourier(&projected, matrices, self.bandwidth)
    }

    /// The random matrices, drawn again from the seed (not stored: they are a pure function of
    /// it).
    pub fn matrices(&self) -> ProjectionMatrices {
        let mut rng = SplitMix(self.seed);
        let scale = 1.0 / (PROJECTED as f64).sqrt();
        ProjectionMatrices {
            project: (0..PROJECTED * self.input)
                .map(|_| rng.normal() * scale)
                .collect(),
            frequencies: (0..FOURIER * PROJECTED).map(|_| rng.normal()).collect(),
            phases: (0..FOURIER)
                .map(|_| rng.uniform() * std::f64::consts::TAU)
                .collect(),
        }
    }
}

fn fourier(projected: &[f64], m: &ProjectionMatrices, bandwidth: f64) -> Vec<f64> {
    let norm = (2.0 / FOURIER as f64).sqrt();
    m.frequencies
        .chunks_exact(PROJECTED)
        .zip(&m.phases)
        .map(|(w, b)| norm * (w.iter().zip(projected).map(|(w, x)| w * x).sum::<f64>() / bandwidth + b).cos())
        .collect()
}

/// The matrices of a [`Projection`].
#[derive(Debug, Clone)]
pub struct ProjectionMatrices {
    project: Vec<f64>,
    frequencies: Vec<f64>,
    phases: Vec<f64>,
}

/// A deterministic generator (splitmix64): the same seed gives the same projection on every
/// machine, so a profile written on one is read the same on another.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform().max(1e-300), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// What a model's inputs and outputs looked like on its calibration set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// The model's name.
    pub model: String,
    /// Rows (or texts) in the calibration set.
    pub count: usize,
    /// The window size the monitor uses unless told otherwise.
    pub window: usize,
    /// Numeric inputs by name (tabular fields; `text_length` for texts).
    pub numeric: BTreeMap<String, Numeric>,
    /// Categorical inputs by name.
    pub categorical: BTreeMap<String, Categorical>,
    /// The predicted class mix (classifiers).
    pub classes: Option<Categorical>,
    /// Confidence of the predictions: `max_probability`, `margin`, `entropy` (classifiers);
    /// `length` of generations (decoders).
    pub outputs: BTreeMap<String, Numeric>,
    /// Embeddings (encoders).
    pub embedding: Option<Embedding>,
}

/// Collects a calibration set's inputs and outputs, then builds the [`Profile`].
#[derive(Default)]
pub struct ProfileBuilder {
    numeric: BTreeMap<String, Vec<f64>>,
    categorical: BTreeMap<String, BTreeMap<String, usize>>,
    classes: Option<(Vec<String>, Vec<usize>)>,
    outputs: BTreeMap<String, Vec<f64>>,
    vectors: Vec<Vec<f32>>,
    count: usize,
}

/// Most categories a categorical input may have in a profile; rarer ones count as "other".
const MAX_CATEGORIES: usize = 50;

impl ProfileBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one request's inputs and what the model answered; `labels` names a classifier's
    /// classes.
    pub fn add(&mut self, input: &Input, output: &Output, labels: &[String]) {
        match input {
            Input::Classify(rows) => rows.iter().for_each(|r| self.add_row(r)),
            Input::Embed(texts) => {
                for t in texts {
                    self.numeric
                        .entry("text_length".into())
                        .or_default()
                        .push(t.chars().count() as f64);
                    self.count += 1;
                }
            }
            Input::Generate { prompt, .. } => {
                self.numeric
                    .entry("text_length".into())
                    .or_default()
                    .push(prompt.chars().count() as f64);
                self.count += 1;
            }
        }
        match output {
            Output::Classes(classes) => {
                let (names, counts) = self
                    .classes
                    .get_or_insert_with(|| (labels.to_vec(), vec![0; labels.len()]));
                for c in classes {
                    if let Some(n) = counts.get_mut(c.class) {
                        *n += 1;
                    }
                    for (name, value) in confidence(c) {
                        self.outputs.entry(name.into()).or_default().push(value);
                    }
                }
                let _ = names;
            }
            Output::Embeddings(vectors) => self.vectors.extend(vectors.iter().cloned()),
            Output::Completion(c) => self
                .outputs
                .entry("length".into())
                .or_default()
                .push(c.token_ids.len() as f64),
        }
    }

    fn add_row(&mut self, row: &Record) {
        self.count += 1;
        for (name, value) in row {
            match value {
                Value::Number(x) => self.numeric.entry(name.clone()).or_default().push(*x),
                Value::Text(t) => match t.trim().parse::<f64>() {
                    Ok(x) => self.numeric.entry(name.clone()).or_default().push(x),
                    Err(_) => {
                        *self
                            .categorical
                            .entry(name.clone())
                            .or_default()
                            .entry(t.clone())
                            .or_default() += 1
                    }
                },
                Value::Tensor { .. } | Value::Null => {}
            }
        }
    }

    /// The profile, with `window` as the monitor's default window size.
    ///
    /// # Errors
    /// An empty calibration set.
    pub fn finish(self, model: &str, window: usize) -> std::result::Result<Profile, String> {
        if self.count == 0 {
            return Err("the calibration set is empty".into());
        }
        let numeric = self
            .numeric
            .iter()
            // A field that is mostly text (a timestamp, an id) is no numeric signal.
            .filter(|(name, v)| !self.categorical.contains_key(*name) && v.len() * 2 >= self.count)
            .filter_map(|(name, v)| Some((name.clone(), Numeric::of(v)?)))
            .collect();
        let categorical = self
            .categorical
            .into_iter()
            .filter(|(_, counts)| counts.len() <= MAX_CATEGORIES)
            .map(|(name, counts)| {
                let total = counts.values().sum::<usize>() as f64;
                let mut reference: Vec<f64> = counts.values().map(|c| *c as f64 / total).collect();
                reference.push(0.0);
                let categories = counts.into_keys().collect();
                (
                    name,
                    Categorical {
                        categories,
                        reference,
                    },
                )
            })
            .collect();
        let classes = self.classes.map(|(names, counts)| {
            let total = counts.iter().sum::<usize>().max(1) as f64;
            let mut reference: Vec<f64> = counts.iter().map(|c| *c as f64 / total).collect();
            reference.push(0.0);
            Categorical {
                categories: names,
                reference,
            }
        });
        let outputs = self
            .outputs
            .iter()
            .filter_map(|(name, v)| Some((name.clone(), Numeric::of(v)?)))
            .collect();
        let embedding = (!self.vectors.is_empty())
            .then(|| embedding_profile(&self.vectors))
            .flatten();
        Ok(Profile {
            model: model.to_string(),
            count: self.count,
            window,
            numeric,
            categorical,
            classes,
            outputs,
            embedding,
        })
    }
}

/// A prediction's confidence: its largest probability, the margin to the second, the entropy.
pub(crate) fn confidence(c: &Classification) -> [(&'static str, f64); 3] {
    let s = c.confidence();
    [
        ("max_probability", s.max_probability),
        ("margin", s.margin),
        ("entropy", s.entropy),
    ]
}

/// The cosine distance of a unit vector to a unit centroid.
pub(crate) fn cosine_distance(v: &[f32], centroid: &[f32]) -> f64 {
    1.0 - v
        .iter()
        .zip(centroid)
        .map(|(a, b)| f64::from(*a) * f64::from(*b))
        .sum::<f64>()
}

fn embedding_profile(vectors: &[Vec<f32>]) -> Option<Embedding> {
    let dim = vectors[0].len();
    let mut centroid = vec![0.0f32; dim];
    for v in vectors {
        centroid.iter_mut().zip(v).for_each(|(c, x)| *c += x);
    }
    let norm = centroid
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::MIN_POSITIVE);
    centroid.iter_mut().for_each(|c| *c /= norm);
    let distances: Vec<f64> = vectors.iter().map(|v| cosine_distance(v, &centroid)).collect();
    let mut projection = Projection {
        seed: 0x6b65_656c,
        input: dim,
        bandwidth: 1.0,
    };
    let m = projection.matrices();
    let projected: Vec<Vec<f64>> = vectors
        .iter()
        .map(|v| {
            m.project
                .chunks_exact(dim)
                .map(|row| row.iter().zip(v).map(|(a, b)| a * f64::from(*b)).sum())
                .collect()
        })
        .collect();
    // The median heuristic: the kernel's width is the median distance between reference points.
    let mut pairs = Vec::new();
    for (i, a) in projected.iter().enumerate().take(200) {
        for b in projected.iter().skip(i + 1).take(200) {
            pairs.push(a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt());
        }
    }
    pairs.sort_by(f64::total_cmp);
    projection.bandwidth = pairs
        .get(pairs.len() / 2)
        .copied()
        .filter(|b| *b > 0.0)
        .unwrap_or(1.0);
    let features: Vec<Vec<f64>> = projected
        .iter()
        .map(|p| fourier(p, &m, projection.bandwidth))
        .collect();
    let n = features.len() as f64;
    let mut mean_features = vec![0.0; FOURIER];
    for f in &features {
        mean_features.iter_mut().zip(f).for_each(|(m, x)| *m += x / n);
    }
    let spread = features
        .iter()
        .map(|f| {
            f.iter()
                .zip(&mean_features)
                .map(|(x, m)| (x - m).powi(2))
                .sum::<f64>()
        })
        .sum::<f64>()
        / n;
    let mut square = 0.0;
    for i in 0..FOURIER {
        for j in 0..FOURIER {
            let cov = features
                .iter()
                .map(|f| (f[i] - mean_features[i]) * (f[j] - mean_features[j]))
                .sum::<f64>()
                / n;
            square += cov * cov;
        }
    }
    let mmd_dof = if square > 0.0 {
        spread * spread / square
    } else {
        1.0
    };
    Some(Embedding {
        centroid,
        distance: Numeric::of(&distances)?,
        projection,
        mean_features,
        spread,
        mmd_dof,
    })
}

impl Profile {
    /// Reads a profile.
    ///
    /// # Errors
    /// A file that cannot be read or is not a profile.
    pub fn read(path: &Path) -> std::result::Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{} is not a Keel profile: {e}", path.display()))
    }

    /// Writes the profile (as JSON).
    ///
    /// # Errors
    /// A file that cannot be written.
    pub fn write(&self, path: &Path) -> std::result::Result<(), String> {
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))
    }
}
