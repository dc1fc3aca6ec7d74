//! Sequence classification on a decoder, as transformers'
//! `LlamaForSequenceClassification` does it: the `score` head gives class
//! logits at every position, and each row is classified at its last token
//! that is not padding.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use peft_core::{LinearSlot, PeftError, PeftModel, Result};

use crate::llama::Llama;

/// Each row's logits `[b, labels]` at its last token that is not
/// `pad_token_id`, from per-position logits `[b, t, labels]` of `ids`
/// `[b, t]` (transformers' rule: the rightmost non-padding position; a row
/// of padding only takes position 0). Without a padding token only one row
/// can be classified (transformers refuses more, as we do).
pub fn last_token_logits<B: Backend>(
    logits: Tensor<B, 3>,
    ids: Tensor<B, 2, Int>,
    pad_token_id: Option<i64>,
) -> Result<Tensor<B, 2>> {
    let [b, t, labels] = logits.dims();
    let last: Vec<i64> = match pad_token_id {
        None if b > 1 => {
            return Err(PeftError::Config(
                "cannot classify more than one row without a padding token (`pad_token_id` \
                 in config.json), as transformers"
                    .into(),
            ))
        }
        None => vec![t as i64 - 1],
        Some(pad) => {
            let ids: Vec<i64> = ids
                .into_data()
                .convert::<i64>()
                .into_vec()
                .map_err(|e| PeftError::State(format!("token ids: {e:?}")))?;
            ids.chunks(t)
                .map(|row| row.iter().rposition(|&i| i != pad).unwrap_or(0) as i64)
                .collect()
        }
    };
    let device = logits.device();
    // Row i's position last[i] of the flattened `[b·t, labels]`.
    let flat: Vec<i64> = last
        .iter()
        .enumerate()
        .map(|(row, &p)| row as i64 * t as i64 + p)
        .collect();
    let index = Tensor::<B, 1, Int>::from_data(TensorData::new(flat, [b]), &device);
    Ok(logits.reshape([b * t, labels]).select(0, index))
}

impl<B: Backend> Llama<B> {
    /// The model with a sequence-classification head of `num_labels`
    /// classes, as `LlamaForSequenceClassification` builds one over a
    /// causal LM: `score` `[d, num_labels]` drawn from N(0, 0.02²)
    /// (transformers' `initializer_range`), no bias; the language-model head
    /// is dropped. The head an adapter trains is its own copy (PEFT's
    /// `modules_to_save`). A checkpoint's own `score` is kept and must have
    /// `num_labels` classes.
    pub fn with_score(mut self, num_labels: usize) -> Result<Self> {
        let d = self.config.hidden_size;
        match &self.score {
            Some(s) if s.d_output() == num_labels => {}
            Some(s) => {
                return Err(PeftError::Shape {
                    name: "score.weight".into(),
                    expected: vec![num_labels, d],
                    found: vec![s.d_output(), d],
                })
            }
            None => {
                let device = self.embed_tokens.weight.device();
                let normal = burn::tensor::Distribution::Normal(0.0, 0.02);
                let weight = Tensor::<B, 2>::random([d, num_labels], normal, &device);
                self.score = Some(LinearSlot::from_weights(weight, None));
                self.lm_head = None;
            }
        }
        Ok(self)
    }

    /// Class logits `[b, labels]` of `ids` `[b, t]` (`attention_mask`
    /// `[b, t]` for a padded batch), each row's at its last token that is
    /// not the padding token ([`last_token_logits`]). Fails for a model
    /// without a `score` head.
    pub fn classify(
        &self,
        ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2>>,
    ) -> Result<Tensor<B, 2>> {
        if self.score.is_none() {
            return Err(PeftError::State(
                "this Llama has no `score` head (LlamaForSequenceClassification)".into(),
            ));
        }
        let logits = self.run(peft_core::ModelInput::ids(ids.clone()).mask(attention_mask));
        last_token_logits(logits, ids, self.config.pad_token_id)
    }
}
