//! Text generation: samplers, and `generate` for any causal LM that can run
//! a step against a [`KvCache`]. Prefix tuning seeds the cache with its
//! virtual keys/values; prompt tuning runs the first step from embeddings
//! ([`CausalLm::logits_embeds_cached`]); both then [`decode`](CausalLm::decode)
//! as the plain model does.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::input::ModelInput;
pub use crate::kv::{KvCache, LayerCache};
use crate::rng::SplitMix64;

/// `ids` as a `[1, len]` tensor.
pub fn ids_tensor<B: Backend>(ids: &[u32], device: &B::Device) -> Tensor<B, 2, Int> {
    let v: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(v, [1, ids.len()]), device)
}

/// A causal language model that can extend a [`KvCache`]: a model whose
/// [`run`](crate::PeftModel::run) gives logits, or a method's wrapper
/// around one.
pub trait CausalLm<B: Backend> {
    /// The device the model lives on.
    fn device(&self) -> B::Device;
    /// Logits `[b, t, vocab]` of one forward pass over `input`.
    fn forward_logits(&self, input: ModelInput<'_, B>) -> Tensor<B, 3>;
    /// Logits `[b, t, vocab]` for `ids: [b, t]` (no cache).
    fn logits(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.forward_logits(ModelInput::ids(ids))
    }
    /// Logits for the next `t` tokens after the cached ones; extends `cache`.
    /// Positions continue from the cache length.
    fn logits_cached(&self, ids: Tensor<B, 2, Int>, cache: &mut KvCache<B>) -> Tensor<B, 3> {
        self.forward_logits(ModelInput::ids(ids).cache(cache))
    }
    /// As [`logits_cached`](Self::logits_cached), from input embeddings
    /// `[b, t, d_model]` instead of ids (prompt tuning's first step).
    fn logits_embeds_cached(&self, embeds: Tensor<B, 3>, cache: &mut KvCache<B>) -> Tensor<B, 3> {
        self.forward_logits(ModelInput::embeds(embeds).cache(cache))
    }

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
        if use_cache {
            let mut cache = KvCache::new();
            let logits = self.logits_cached(ids_tensor(prompt, &device), &mut cache);
            return self.decode(logits, &mut cache, max_new, sampler, eos);
        }
        let mut seq = prompt.to_vec();
        let mut out = Vec::new();
        for _ in 0..max_new {
            let next = sampler.sample(&last_row(self.logits(ids_tensor(&seq, &device))));
            seq.push(next);
            out.push(next);
            if Some(next) == eos {
                break;
            }
        }
        out
    }

    /// The generation loop after the prompt: samples from the last row of
    /// `logits: [1, t, vocab]` (the prompt's, already in `cache`), then feeds
    /// each new token through the cache, up to `max_new` tokens or `eos`.
    fn decode(
        &self,
        logits: Tensor<B, 3>,
        cache: &mut KvCache<B>,
        max_new: usize,
        sampler: &mut Sampler,
        eos: Option<u32>,
    ) -> Vec<u32> {
        let device = self.device();
        let mut out = Vec::new();
        let mut logits = logits;
        while out.len() < max_new {
            let next = sampler.sample(&last_row(logits));
            out.push(next);
            if Some(next) == eos || out.len() == max_new {
                break;
            }
            logits = self.logits_cached(ids_tensor(&[next], &device), cache);
        }
        out
    }
}

/// The last position's logits of row 0 of `logits: [b, t, vocab]`.
pub fn last_row<B: Backend>(logits: Tensor<B, 3>) -> Vec<f32> {
    let [_, t, v] = logits.dims();
    logits
        .slice([0..1, t - 1..t, 0..v])
        .reshape([v])
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32 logits")
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
