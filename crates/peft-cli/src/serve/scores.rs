//! `/classify` on a decoder (Llama, GPT-2): a sequence-classification
//! `score` head (the base's own, or a SEQ_CLS adapter's copy in
//! `modules_to_save`) over the final hidden states, each input read at its
//! last token, as transformers' `*ForSequenceClassification` do. A
//! classifier is its own model (the head's size is the adapter's), kept
//! among the engine's resident classifiers; generation's shared model is
//! not touched.

use std::path::Path;

use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use peft_core::{PeftError, Result};
use peft_models::seq_cls::ScoreHead;

use super::encoder::{class_names, padded, rows_of};
use super::error::ApiError;
use crate::tasks::{self, Adapted, CausalModel};

/// A decoder with a `score` head, and its classes' names.
pub struct ScoreModel<B: Backend, M: burn::module::Module<B>> {
    model: Adapted<B, M>,
    labels: Vec<String>,
}

impl<B: Backend, M: CausalModel<B> + ScoreHead<B>> ScoreModel<B, M> {
    /// `base` with the adapter in `dir` (`None`: the base alone), with a
    /// `score` head of the adapter's copy's size. Fails, naming the model,
    /// when neither the adapter nor the base has one.
    pub fn load(base: &M, dir: Option<&Path>) -> Result<Self> {
        let copied = dir
            .map(|d| tasks::head_labels(d, "score"))
            .transpose()?
            .flatten();
        let model = match copied {
            Some(n) => base.clone().with_score(n)?,
            None => base.clone(),
        };
        let Some(classes) = model.score().map(|s| s.d_output()) else {
            return Err(PeftError::Config(match dir {
                Some(d) => format!(
                    "{} has no `score` head (a SEQ_CLS adapter carries one in modules_to_save)",
                    d.display()
                ),
                None => "the base model has no `score` head (*ForSequenceClassification)".into(),
            }));
        };
        Ok(ScoreModel {
            labels: class_names(dir.filter(|_| copied.is_some()), classes)?,
            model: tasks::load_adapted(model, dir)?,
        })
    }

    /// Class probabilities (softmax of the head's logits) of `inputs`, one
    /// right-padded batch, each row read at its last real token; and the
    /// classes' names.
    pub fn classify(
        &self,
        inputs: &[Vec<u32>],
        device: &B::Device,
    ) -> std::result::Result<(Vec<Vec<f32>>, Vec<String>), ApiError> {
        let (ids, mask) = padded::<B>(inputs, device);
        let logits = self
            .model
            .classify_masked(ids, mask)
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        Ok((rows_of(softmax(logits, 1))?, self.labels.clone()))
    }
}
