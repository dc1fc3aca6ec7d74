//! Text generation: the key/value cache, samplers, and `generate` for any
//! causal LM that can run one step against a cache.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
pub use peft_core::kv::{KvCache, LayerCache};
use peft_core::rng::SplitMix64;

/// A causal language model that can extend a [`KvCache`].
pub trait CausalLm<B: Backend> {
    /// The device the model lives on.
    fn device(&self) -> B::Device;
    /// Logits `[b, t, vocab]` for `ids: [b, t]` (no cache).
    fn logits(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3>;
    /// Logits for the next `t` tokens after the cached ones; extends `cache`.
    fn logits_cached(&self, ids: Tensor<B, 2, Int>, cache: &mut KvCache<B>) -> Tensor<B, 3>;

    /// Continues `prompt` by up to `max_new` tokens, stopping after `eos`.
    /// With `use_cache`, each step feeds one token through the KV cache;
    /// without, each step recomputes the whole sequence (for checking).
    fn generate(
        &self,
        prompt: &[u32],
        max_new: usize,
        sampler: &mut Sampler,
        eos: Option<u32>,
        use_cache: bool,
    ) -> Vec<u32> {
        let device = self.device();
        let to_ids = |ids: &[u32]| {
            let v: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
            Tensor::<B, 2, Int>::from_data(TensorData::new(v, [1, ids.len()]), &device)
        };
        let mut cache = KvCache::new();
        let mut seq = prompt.to_vec();
        let mut out = Vec::new();
        for step in 0..max_new {
            let logits = if use_cache {
                let input = if step == 0 {
                    &seq[..]
                } else {
                    &seq[seq.len() - 1..]
                };
                self.logits_cached(to_ids(input), &mut cache)
            } else {
                self.logits(to_ids(&seq))
            };
            let [_, t, v] = logits.dims();
            let last = logits.slice([0..1, t - 1..t, 0..v]).reshape([v]);
            let row: Vec<f32> = last
                .into_data()
                .convert::<f32>()
                .to_vec()
                .expect("f32 logits");
            let next = sampler.sample(&row);
            seq.push(next);
            out.push(next);
            if Some(next) == eos {
                break;
            }
        }
        out
    }
}

/// How the next token is chosen from logits.
#[derive(Debug, Clone)]
pub enum Sampler {
    /// The most likely token.
    Greedy,
    /// Softmax at `temperature`, restricted to the `top_k` most likely tokens
    /// (0: all) and to the smallest set whose probability reaches `top_p`.
    Random {
        /// Softmax temperature (> 0).
        temperature: f32,
        /// Keep only the k most likely tokens (0 keeps all).
        top_k: usize,
        /// Nucleus threshold in (0, 1].
        top_p: f32,
        /// Generator state (SplitMix64).
        state: u64,
    },
}

impl Sampler {
    /// Picks a token id from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let argmax = || {
            logits
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i as u32)
                .unwrap_or(0)
        };
        match self {
            Sampler::Greedy => argmax(),
            Sampler::Random {
                temperature,
                top_k,
                top_p,
                state,
            } => {
                if *temperature <= 0.0 {
                    return argmax();
                }
                let mut idx: Vec<usize> = (0..logits.len()).collect();
                idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
                if *top_k > 0 {
                    idx.truncate(*top_k);
                }
                let max = logits[idx[0]];
                let mut probs: Vec<f32> = idx
                    .iter()
                    .map(|&i| ((logits[i] - max) / *temperature).exp())
                    .collect();
                let sum: f32 = probs.iter().sum();
                probs.iter_mut().for_each(|p| *p /= sum);
                let mut acc = 0.0;
                let keep = probs.iter().position(|p| {
                    acc += p;
                    acc >= *top_p
                });
                let keep = keep.map(|k| k + 1).unwrap_or(probs.len());
                let total: f32 = probs[..keep].iter().sum();
                let mut rng = SplitMix64(*state);
                let u = rng.next_f64() as f32 * total;
                *state = rng.0;
                let mut acc = 0.0;
                for (k, p) in probs[..keep].iter().enumerate() {
                    acc += p;
                    if u < acc {
                        return idx[k] as u32;
                    }
                }
                idx[keep - 1] as u32
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samplers_respect_top_k_top_p_and_seeds() {
        let logits = [0.0f32, 3.0, 2.9, -1.0, 1.0];
        assert_eq!(Sampler::Greedy.sample(&logits), 1);
        let draw = |top_k, top_p, seed| {
            let mut s = Sampler::Random {
                temperature: 1.0,
                top_k,
                top_p,
                state: seed,
            };
            (0..200).map(|_| s.sample(&logits)).collect::<Vec<u32>>()
        };
        assert!(
            draw(2, 1.0, 1).iter().all(|&t| t == 1 || t == 2),
            "top-k 2 keeps the two best"
        );
        assert!(
            draw(0, 0.01, 1).iter().all(|&t| t == 1),
            "a tiny top-p keeps only the best"
        );
        assert!(
            draw(0, 1.0, 1).contains(&4),
            "without limits every token can come"
        );
        assert_eq!(draw(0, 1.0, 7), draw(0, 1.0, 7), "same seed, same draws");
        let mut cold = Sampler::Random {
            temperature: 1e-4,
            top_k: 0,
            top_p: 1.0,
            state: 3,
        };
        assert_eq!(cold.sample(&logits), 1, "near-zero temperature is greedy");
    }
}
