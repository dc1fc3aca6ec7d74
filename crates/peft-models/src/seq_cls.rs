//! Sequence classification on a decoder, as transformers'
//! `LlamaForSequenceClassification` does it: the `score` head gives class
//! logits at every position, and each row is classified at its last token
//! that is not padding.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use peft_core::{LinearSlot, PeftError, PeftModel, Result};

use crate::gpt2::Gpt2;
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

/// A decoder that classifies sequences as transformers'
/// `*ForSequenceClassification` do: a `score` head over the final hidden
/// states, each row read at its last token that is not padding.
pub trait ScoreHead<B: Backend>: PeftModel<B, Output = Tensor<B, 3>> + Sized {
    /// The model with a `score` head of `num_labels` classes: a
    /// checkpoint's own (it must have that many) or a fresh one drawn from
    /// N(0, 0.02²), transformers' `initializer_range`, no bias. Module
    /// names become the task model's. The head an adapter trains is its own
    /// copy (PEFT's `modules_to_save`), so the draw shows only with
    /// adapters disabled.
    fn with_score(self, num_labels: usize) -> Result<Self>;

    /// The `score` head, if the model has one.
    fn score(&self) -> Option<&LinearSlot<B>>;

    /// The padding token of `config.json`.
    fn pad_token_id(&self) -> Option<i64>;

    /// Class logits `[b, labels]` of `ids` `[b, t]` (`attention_mask`
    /// `[b, t]` for a padded batch), each row's at its last token that is
    /// not padding ([`last_token_logits`]). Fails without a `score` head.
    fn classify(
        &self,
        ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2>>,
    ) -> Result<Tensor<B, 2>> {
        if self.score().is_none() {
            return Err(PeftError::State(
                "this model has no `score` head (*ForSequenceClassification)".into(),
            ));
        }
        let logits = self.run(peft_core::ModelInput::ids(ids.clone()).mask(attention_mask));
        last_token_logits(logits, ids, self.pad_token_id())
    }
}

/// A task model's classification head `key` (`classifier`, `score`) of
/// `num_labels` classes over `d` features: the model's `own`, checked
/// against `num_labels`, or a fresh one as transformers draws it
/// (`initializer_range` 0.02, a zero bias when the head has one).
pub fn task_head<B: Backend>(
    own: Option<LinearSlot<B>>,
    key: &str,
    [d, num_labels]: [usize; 2],
    bias: bool,
    device: &B::Device,
) -> Result<LinearSlot<B>> {
    match own {
        Some(s) if s.d_output() == num_labels => Ok(s),
        Some(s) => Err(PeftError::Shape {
            name: format!("{key}.weight"),
            expected: vec![num_labels, d],
            found: vec![s.d_output(), d],
        }),
        None => {
            let normal = burn::tensor::Distribution::Normal(0.0, 0.02);
            let weight = Tensor::<B, 2>::random([d, num_labels], normal, device);
            let bias = bias.then(|| Tensor::<B, 1>::zeros([num_labels], device));
            Ok(LinearSlot::from_weights(weight, bias))
        }
    }
}

/// `LlamaForSequenceClassification` (the language-model head dropped).
impl<B: Backend> ScoreHead<B> for Llama<B> {
    fn with_score(mut self, num_labels: usize) -> Result<Self> {
        let device = self.embed_tokens.weight.device();
        let fresh = self.score.is_none();
        let dims = [self.config.hidden_size, num_labels];
        let score = task_head(self.score.take(), "score", dims, false, &device)?;
        self.score = Some(score);
        if fresh {
            self.lm_head = None;
        }
        Ok(self)
    }

    fn score(&self) -> Option<&LinearSlot<B>> {
        self.score.as_ref()
    }

    fn pad_token_id(&self) -> Option<i64> {
        self.config.pad_token_id
    }
}

/// `GPT2ForSequenceClassification` (modules under `transformer.`).
impl<B: Backend> ScoreHead<B> for Gpt2<B> {
    fn with_score(mut self, num_labels: usize) -> Result<Self> {
        let device = self.wte.weight.device();
        let dims = [self.config.n_embd, num_labels];
        let score = task_head(self.score.take(), "score", dims, false, &device)?;
        self.score = Some(score);
        self.prefix = "transformer.".into();
        Ok(self)
    }

    fn score(&self) -> Option<&LinearSlot<B>> {
        self.score.as_ref()
    }

    fn pad_token_id(&self) -> Option<i64> {
        self.config.pad_token_id
    }
}
