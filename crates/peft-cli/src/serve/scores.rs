//! `/classify` on a decoder (Llama, GPT-2): a sequence-classification
//! `score` head (the base's own, or a SEQ_CLS adapter's copy in
//! `modules_to_save`) over the final hidden states, each input read at its
//! last token, as transformers' `*ForSequenceClassification` do. A
//! classifier is its own model (the head's size is the adapter's), kept
//! among the engine's resident classifiers; generation's shared model is
//! not touched.

use std::path::Path;

use burn::tensor::backend::Backend;
use peft_core::{PeftError, Result};
use peft_models::seq_cls::ScoreHead;

use super::encoder::{padded, rows_of, Classes};
use super::error::ApiError;
use crate::tasks::{self, Adapted, CausalModel, ProblemType};

/// A decoder with a `score` head, and its classes' names.
pub struct ScoreModel<B: Backend, M: burn::module::Module<B>> {
    model: Adapted<B, M>,
    labels: Vec<String>,
    /// What the head's outputs mean ([`ProblemType::of_adapter`]).
    problem: ProblemType,
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
        let own = dir.filter(|_| copied.is_some());
        Ok(ScoreModel {
            labels: tasks::class_names(own, classes)?,
            problem: ProblemType::of_adapter(own, classes, ProblemType::SingleLabel)?,
            model: tasks::load_adapted(model, dir)?,
        })
    }

    /// The scores of `inputs` (the head's logits through
    /// [`ProblemType::activate`]), one right-padded batch, each row read at
    /// its last real token; the outputs' names, and the problem.
    pub fn classify(
        &self,
        inputs: &[Vec<u32>],
        device: &B::Device,
    ) -> std::result::Result<Classes, ApiError> {
        let (ids, mask) = padded::<B>(inputs, device);
        let logits = self
            .model
            .classify_masked(ids, mask)
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        let scores = rows_of(self.problem.activate(logits))?;
        Ok((scores, self.labels.clone(), self.problem))
    }
}
