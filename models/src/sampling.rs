//! Choosing the next token from logits: greedy, or seeded temperature / top-k / top-p sampling.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How to choose each next token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// Always the most likely token (the lowest id among exact ties), as PyTorch's `argmax`.
    Greedy,
    /// A random draw from the tempered, truncated distribution; the same seed gives the same tokens.
    Random {
        /// Divides the logits; must be > 0.
        temperature: f32,
        /// Keep only the `k` most likely tokens (0: no limit).
        top_k: usize,
        /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1.0: all).
        top_p: f32,
        /// Seed of the random generator.
        seed: u64,
    },
}

/// A [`Sampling`] rule with its random state.
pub struct Sampler {
    rule: Sampling,
    rng: StdRng,
    scratch: Vec<(u32, f32)>,
}

impl Sampler {
    /// A sampler for `rule`. Temperatures at or below zero fall back to greedy choice.
    pub fn new(rule: Sampling) -> Self {
        let seed = match rule {
            Sampling::Random { seed, .. } => seed,
            Sampling::Greedy => 0,
        };
        Self {
            rule,
            rng: StdRng::seed_from_u64(seed),
            scratch: Vec::new(),
        }
    }

    /// The next token for `logits` (one per vocabulary entry; must not be empty).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        match self.rule {
            Sampling::Random {
                temperature,
                top_k,
                top_p,
                ..
            } if temperature > 0.0 => self.draw(logits, temperature, top_k, top_p),
            _ => argmax(logits),
        }
    }

    fn draw(&mut self, logits: &[f32], temperature: f32, top_k: usize, top_p: f32) -> u32 {
        let candidates = &mut self.scratch;
        candidates.clear();
        candidates.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| !l.is_nan())
                .map(|(i, &l)| (i as u32, l / temperature)),
        );
        if candidates.is_empty() {
            return argmax(logits);
        }
        // Most likely first; ties by id so that the result does not depend on the sort.
        candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if top_k > 0 {
            candidates.truncate(top_k);
        }
        let max = candidates[0].1;
        let mut total = 0.0f32;
        for c in candidates.iter_mut() {
            c.1 = (c.1 - max).exp();
            total += c.1;
        }
        if top_p < 1.0 {
            let mut kept = 0.0f32;
            let cut = candidates
                .iter()
                .position(|c| {
                    kept += c.1 / total;
                    kept >= top_p
                })
                .map_or(candidates.len(), |i| i + 1);
            candidates.truncate(cut);
            total = candidates.iter().map(|c| c.1).sum();
        }
        let mut r = self.rng.random::<f32>() * total;
        for c in candidates.iter() {
            r -= c.1;
            if r <= 0.0 {
                return c.0;
            }
        }
        candidates[candidates.len() - 1].0
    }
}

/// Index of the largest value; the first among ties; NaN never wins.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] || values[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, 0.2]), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_top_k_one_is_greedy() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let rule = Sampling::Random {
            temperature: 0.8,
            top_k: 0,
            top_p: 0.9,
            seed: 7,
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(rule);
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(rule);
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        let mut k1 = Sampler::new(Sampling::Random {
            temperature: 1.0,
            top_k: 1,
            top_p: 1.0,
            seed: 1,
        });
        assert_eq!(k1.sample(&logits), argmax(&logits));
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // One token holds ~all the mass: top_p = 0.5 must always pick it.
        let mut logits = vec![0.0f32; 50];
        logits[17] = 20.0;
        let mut s = Sampler::new(Sampling::Random {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            seed: 3,
        });
        assert!((0..100).all(|_| s.sample(&logits) == 17));
    }
}
