//! The statistics of drift detection: exact two-sample functions (as scipy computes them), and
//! their binned forms that online windows compute from fixed bins.
//!
//! ```
//! use keel::observe::stats::{ks_statistic, wasserstein_1};
//! let (a, b) = ([1.0, 2.0, 3.0], [2.0, 3.0, 4.0]);
//! assert!((ks_statistic(&a, &b) - 1.0 / 3.0).abs() < 1e-12);
//! assert!((wasserstein_1(&a, &b) - 1.0).abs() < 1e-12);
//! ```

use serde::{Deserialize, Serialize};

/// The floor of a proportion in PSI and chi-square, so that an empty bin stays finite.
pub const PSI_FLOOR: f64 = 1e-4;

fn normalized(v: &[f64]) -> Vec<f64> {
    let total: f64 = v.iter().sum();
    if total <= 0.0 {
        return vec![0.0; v.len()];
    }
    v.iter().map(|x| x / total).collect()
}

/// Population stability index of two distributions given as per-bin proportions (or counts:
/// each side is normalized): sum (a - r) ln(a / r), each proportion floored at [`PSI_FLOOR`].
pub fn psi(reference: &[f64], actual: &[f64]) -> f64 {
    let (r, a) = (normalized(reference), normalized(actual));
    r.iter()
        .zip(&a)
        .map(|(r, a)| {
            let (r, a) = (r.max(PSI_FLOOR), a.max(PSI_FLOOR));
            (a - r) * (a / r).ln()
        })
        .sum()
}

/// Jensen-Shannon distance (natural log; the square root of the divergence), as
/// `scipy.spatial.distance.jensenshannon(p, q)` (inputs normalized). 0 for empty inputs.
pub fn js_distance(p: &[f64], q: &[f64]) -> f64 {
    let (p, q) = (normalized(p), normalized(q));
    let kl = |a: f64, m: f64| if a > 0.0 { a * (a / m).ln() } else { 0.0 };
    let d: f64 = p
        .iter()
        .zip(&q)
        .map(|(a, b)| {
            let m = (a + b) / 2.0;
            (kl(*a, m) + kl(*b, m)) / 2.0
        })
        .sum();
    d.max(0.0).sqrt()
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(f64::total_cmp);
    s
}

/// Two-sample Kolmogorov-Smirnov statistic, as `scipy.stats.ks_2samp(a, b).statistic`
/// (non-finite values ignored; 0 if a side is empty).
pub fn ks_statistic(a: &[f64], b: &[f64]) -> f64 {
    let (a, b) = (sorted(a), sorted(b));
    if a.is_empty() || b.is_empty() {
        return 0.0;
    }
    let (n, m) = (a.len() as f64, b.len() as f64);
    let (mut i, mut j, mut d) = (0, 0, 0.0f64);
    while i < a.len() && j < b.len() {
        let x = a[i].min(b[j]);
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        d = d.max((i as f64 / n - j as f64 / m).abs());
    }
    d
}

/// Wasserstein-1 distance of two samples, as `scipy.stats.wasserstein_distance(a, b)`: the
/// area between their empirical CDFs (non-finite values ignored; 0 if a side is empty).
pub fn wasserstein_1(a: &[f64], b: &[f64]) -> f64 {
    let (a, b) = (sorted(a), sorted(b));
    if a.is_empty() || b.is_empty() {
        return 0.0;
    }
    let mut all: Vec<f64> = a.iter().chain(&b).copied().collect();
    all.sort_by(f64::total_cmp);
    let (n, m) = (a.len() as f64, b.len() as f64);
    let (mut i, mut j, mut area) = (0, 0, 0.0);
    for w in all.windows(2) {
        while i < a.len() && a[i] <= w[0] {
            i += 1;
        }
        while j < b.len() && b[j] <= w[0] {
            j += 1;
        }
        area += (i as f64 / n - j as f64 / m).abs() * (w[1] - w[0]);
    }
    area
}

/// Pearson's chi-square statistic of observed counts against expected proportions (scaled to
/// the observed total), as `scipy.stats.chisquare(f_obs, f_exp).statistic`; an expected
/// proportion of 0 is floored at [`PSI_FLOOR`].
pub fn chi_square(observed: &[f64], expected: &[f64]) -> f64 {
    let total: f64 = observed.iter().sum();
    let e = normalized(&expected.iter().map(|p| p.max(PSI_FLOOR)).collect::<Vec<_>>());
    observed
        .iter()
        .zip(&e)
        .map(|(o, p)| {
            let e = p * total;
            if e > 0.0 {
                (o - e).powi(2) / e
            } else {
                0.0
            }
        })
        .sum()
}

/// The standard normal's upper quantile: z with P(Z > z) = p (Acklam's rational
/// approximation, relative error below 1.2e-9).
pub fn normal_upper(p: f64) -> f64 {
    -normal_quantile(p.clamp(1e-300, 1.0 - 1e-16))
}

// Acklam's published coefficients, kept as printed.
#[allow(clippy::excessive_precision)]
fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.383577518672690e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-3,
        3.224671290700398e-1,
        2.445134137142996,
        3.754408661907416,
    ];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// The chi-square distribution's upper quantile: x with P(X > x) = p for `dof` degrees of
/// freedom. Exact (through the normal) for 1 degree of freedom; the Wilson-Hilferty
/// approximation otherwise (against scipy, tests/observe.rs: within 6% below 10 degrees of freedom
/// and 2% from 10 on, to p = 1e-5).
pub fn chi_square_upper(p: f64, dof: usize) -> f64 {
    let z = normal_upper(p);
    if dof <= 1 {
        let z = normal_upper(p / 2.0);
        return z * z;
    }
    let k = dof as f64;
    let h = 2.0 / (9.0 * k);
    k * (1.0 - h + z * h.sqrt()).powi(3).max(0.0)
}

/// The critical value of the two-sample KS statistic at significance `alpha` for samples of
/// `n` and `m` values (asymptotic: sqrt(-ln(alpha / 2) / 2) sqrt((n + m) / (n m))).
pub fn ks_critical(alpha: f64, n: usize, m: usize) -> f64 {
    let (n, m) = (n.max(1) as f64, m.max(1) as f64);
    (-(alpha / 2.0).ln() / 2.0).sqrt() * ((n + m) / (n * m)).sqrt()
}

/// Fixed bins for one numeric signal: interior edges at a reference sample's quantiles, so that
/// each bin holds about the same share of it. Bin i holds values in [edge[i-1], edge[i]); the
/// first bin everything below the first edge, the last everything from the last edge up. Ties
/// in the reference merge edges, so no bin is empty by construction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bins {
    edges: Vec<f64>,
    lo: f64,
    hi: f64,
}

impl Bins {
    /// About `bins` bins at the quantiles of `sample` (non-finite values ignored).
    pub fn from_sample(sample: &[f64], bins: usize) -> Self {
        let s = sorted(sample);
        let (lo, hi) = (
            s.first().copied().unwrap_or(0.0),
            s.last().copied().unwrap_or(0.0),
        );
        let mut edges: Vec<f64> = (1..bins.max(1))
            .filter_map(|i| s.get(i * s.len() / bins))
            .copied()
            .filter(|e| *e > lo)
            .collect();
        edges.dedup();
        Self { edges, lo, hi }
    }

    /// How many bins.
    pub fn len(&self) -> usize {
        self.edges.len() + 1
    }

    /// Never: there is always at least one bin.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The interior edges.
    pub fn edges(&self) -> &[f64] {
        &self.edges
    }

    /// The bin of `x`, in O(log bins).
    pub fn index(&self, x: f64) -> usize {
        self.edges.partition_point(|e| *e <= x)
    }

    /// The mean of `sample`'s values in each bin (0 where a bin is empty).
    pub fn means(&self, sample: &[f64]) -> Vec<f64> {
        let mut sums = vec![0.0; self.len()];
        let counts = self.counts(sample);
        for x in sample.iter().filter(|x| x.is_finite()) {
            sums[self.index(*x)] += x;
        }
        sums.iter()
            .zip(&counts)
            .map(|(s, c)| if *c > 0.0 { s / c } else { 0.0 })
            .collect()
    }

    /// The count of `sample` in each bin (non-finite values ignored).
    pub fn counts(&self, sample: &[f64]) -> Vec<f64> {
        let mut c = vec![0.0; self.len()];
        for x in sample.iter().filter(|x| x.is_finite()) {
            c[self.index(*x)] += 1.0;
        }
        c
    }
}

/// The four numeric drift statistics of a window against its reference.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct NumericDrift {
    /// Population stability index.
    pub psi: f64,
    /// Kolmogorov-Smirnov statistic.
    pub ks: f64,
    /// Jensen-Shannon distance.
    pub js: f64,
    /// Wasserstein-1 distance, in the signal's units.
    pub wasserstein: f64,
}

/// One side of a binned comparison: the count in each bin and the mean of the values there.
#[derive(Debug, Clone, Copy)]
pub struct Binned<'a> {
    /// Values per bin.
    pub counts: &'a [f64],
    /// The mean value in each bin (any number where a bin is empty).
    pub means: &'a [f64],
}

/// The drift statistics of `current` against `reference`, both counted over `bins`. PSI and JS
/// are computed on proportions smoothed by half a count per bin (Jeffreys): a window of 50
/// values leaves some of 16 bins empty by chance, and an empty bin would weigh
/// ln(1 / PSI_FLOOR) in the PSI. KS is the largest gap of the two CDFs at the bin edges (a lower
/// bound of the exact statistic, short of it by at most the largest bin's share).
/// Wasserstein-1 is exact between the two sides with each bin's mass put at its mean: within
/// a bin's width of the exact distance, and much closer where bins are narrow.
pub fn binned_drift(bins: &Bins, reference: Binned<'_>, current: Binned<'_>) -> NumericDrift {
    let (r, c) = (normalized(reference.counts), normalized(current.counts));
    let smooth = |v: &[f64]| normalized(&v.iter().map(|x| x + 0.5).collect::<Vec<_>>());
    let (rs, cs) = (smooth(reference.counts), smooth(current.counts));
    let (mut fr, mut fc, mut ks) = (0.0f64, 0.0f64, 0.0f64);
    for (pr, pc) in r.iter().zip(&c).take(bins.len().saturating_sub(1)) {
        fr += pr;
        fc += pc;
        ks = ks.max((fr - fc).abs());
    }
    // Point masses at the bins' means: W1 of two weighted samples.
    let mut points: Vec<(f64, f64)> = r
        .iter()
        .zip(reference.means)
        .filter(|(w, _)| **w > 0.0)
        .map(|(w, x)| (*x, *w))
        .chain(
            c.iter()
                .zip(current.means)
                .filter(|(w, _)| **w > 0.0)
                .map(|(w, x)| (*x, -*w)),
        )
        .collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut gap, mut w1) = (0.0, 0.0);
    for pair in points.windows(2) {
        gap += pair[0].1;
        w1 += gap.abs() * (pair[1].0 - pair[0].0);
    }
    NumericDrift {
        psi: psi(&rs, &cs),
        ks,
        js: js_distance(&rs, &cs),
        wasserstein: w1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_checked_cases() {
        let a = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(ks_statistic(&a, &a), 0.0);
        assert_eq!(wasserstein_1(&a, &a), 0.0);
        assert_eq!(ks_statistic(&a, &[10.0, 11.0]), 1.0);
        let shifted: Vec<f64> = a.iter().map(|x| x + 2.5).collect();
        assert!((wasserstein_1(&a, &shifted) - 2.5).abs() < 1e-12);
        let by_formula = (0.9 - 0.5) * (0.9f64 / 0.5).ln() + (0.1 - 0.5) * (0.1f64 / 0.5).ln();
        assert!((psi(&[0.5, 0.5], &[0.9, 0.1]) - by_formula).abs() < 1e-12);
        assert_eq!(js_distance(&[1.0, 0.0], &[1.0, 0.0]), 0.0);
        assert!((js_distance(&[1.0, 0.0], &[0.0, 1.0]) - 2f64.ln().sqrt()).abs() < 1e-12);
        assert!((chi_square_upper(0.05, 10) / 18.307 - 1.0).abs() < 0.01);
        assert!((chi_square_upper(0.05, 1) / 3.8415 - 1.0).abs() < 1e-3);
        assert!((ks_critical(0.05, 100, 100) / (1.358 * (0.02f64).sqrt()) - 1.0).abs() < 0.01);
        // Empty inputs do not panic.
        assert_eq!(ks_statistic(&[], &a), 0.0);
        assert_eq!(wasserstein_1(&a, &[]), 0.0);
        assert_eq!(psi(&[], &[]), 0.0);
    }

    #[test]
    fn ties_merge_bins_and_no_bin_is_empty() {
        let sample: Vec<f64> = (0..100)
            .map(|i| if i < 60 { 1.0 } else { f64::from(i) })
            .collect();
        let bins = Bins::from_sample(&sample, 10);
        let counts = bins.counts(&sample);
        assert!(bins.len() < 10);
        assert!(counts.iter().all(|c| *c > 0.0), "{counts:?}");
        let means = bins.means(&sample);
        let side = Binned {
            counts: &counts,
            means: &means,
        };
        let d = binned_drift(&bins, side, side);
        assert_eq!((d.psi, d.ks, d.wasserstein), (0.0, 0.0, 0.0));
    }
}
