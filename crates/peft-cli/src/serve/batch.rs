//! The sequences a decoder engine steps as one batch: one KV cache shared
//! by rows of different lengths, each left-padded to the longest
//! ([`ModelInput::left_padding`] tells the model how much), one adapter per
//! row through the slots' mixed-batch routing.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use peft_core::generate::{CausalLm, KvCache};
use peft_core::{ModelInput, PeftModel, Result};

use crate::tasks::Slots;

/// The shared cache and each row's padding.
#[derive(Debug, Default)]
pub struct DecodeBatch<B: Backend> {
    /// `[rows, kv_heads, s, head_dim]` per layer.
    cache: KvCache<B>,
    /// Row `i`'s cache starts with `pads[i]` padding positions.
    pads: Vec<usize>,
}

impl<B: Backend> DecodeBatch<B> {
    /// Rows in the batch.
    pub fn rows(&self) -> usize {
        self.pads.len()
    }

    /// Adds a sequence's own cache (one row, after its prompt) as the last
    /// row: the shorter side is padded on the left.
    pub fn join(&mut self, cache: KvCache<B>) {
        if self.pads.is_empty() {
            self.cache = cache;
            self.pads = vec![0];
            return;
        }
        let (shared, own) = (self.cache.len(), cache.len());
        if own > shared {
            self.cache = self.cache.pad_left(own - shared);
            self.pads.iter_mut().for_each(|p| *p += own - shared);
        }
        let pad = self.cache.len() - own;
        let all = std::mem::take(&mut self.cache);
        self.cache = KvCache::cat_rows(vec![all, cache.pad_left(pad)]);
        self.pads.push(pad);
    }

    /// Keeps rows `keep` (indices, in order) and drops the others; the
    /// padding every kept row has is trimmed away.
    pub fn keep(&mut self, keep: &[usize]) {
        if keep.len() == self.pads.len() && keep.iter().enumerate().all(|(i, &k)| i == k) {
            return;
        }
        if keep.is_empty() {
            *self = Self::default();
            return;
        }
        let pads: Vec<usize> = keep.iter().map(|&i| self.pads[i]).collect();
        let trim = pads.iter().copied().min().unwrap_or(0);
        self.cache = self.cache.select_rows(keep).drop_front(trim);
        self.pads = pads.into_iter().map(|p| p - trim).collect();
    }

    /// Forgets every row (after a step that failed half-way).
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// Feeds `tokens[i]` to row `i`, routed through adapter `routes[i]`
    /// (`BASE_ROW` for none) of `slots`: the next-token logits of every row.
    pub fn step<M>(
        &mut self,
        slots: &Slots<B, M>,
        routes: &[&str],
        tokens: &[u32],
    ) -> Result<Vec<Vec<f32>>>
    where
        M: CausalLm<B> + PeftModel<B, Output = Tensor<B, 3>>,
    {
        let n = tokens.len();
        assert_eq!(n, self.rows(), "one token per row");
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let device = slots.model.device();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [n, 1]), &device);
        let input = ModelInput::ids(ids)
            .cache(&mut self.cache)
            .left_padding(self.pads.clone());
        let logits = slots.forward_mixed(routes, n, |m| m.run(input))?;
        let vocab = logits.dims()[2];
        let host = logits
            .reshape([n * vocab])
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("f32 logits");
        Ok(host.chunks(vocab).map(<[f32]>::to_vec).collect())
    }
}
