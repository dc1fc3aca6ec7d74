//! [`PromptTuningModel`]: a model with named soft prompts (prompt tuning or
//! P-tuning), the prompt-learning wrapper of `peft-core` over
//! [`PromptEncoder`], whose virtual tokens enter the model as embeddings
//! before the tokens' own.

use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor};
use peft_core::generate::ids_tensor;
use peft_core::kv::KvCache;
use peft_core::model::device_of;
use peft_core::prompt_learning::{PromptLearningConfig, PromptLearningType, PromptTuningInit};
use peft_core::virtual_model::{Rows, VirtualTokenModel, VirtualTokens};
use peft_core::{ModelDims, PeftError, PeftModel, Result, Tokens};

use crate::encoder::PromptEncoder;

/// A model carrying named soft prompts (prompt tuning or P-tuning), at most
/// one active.
///
/// The wrapped model is frozen; each prompt is its own Burn module
/// ([`PromptEncoder`]): train it with any Burn optimizer through
/// [`map_encoder`](VirtualTokenModel::map_encoder). The output covers the
/// virtual positions first, as PEFT's does.
pub type PromptTuningModel<B, M> = VirtualTokenModel<B, M, PromptEncoder<B>>;

impl<B: Backend> VirtualTokens<B> for PromptEncoder<B> {
    const WHAT: &'static str = "prompts";

    fn output_positions(&self) -> usize {
        self.num_virtual_tokens()
    }

    /// PEFT records the model's attention (query) heads and layers, as its
    /// `_prepare_prompt_learning_config` reads them from the model's
    /// config; the prompt itself only needs the embedding width. A file's
    /// own values stand.
    fn fit_config(
        mut config: PromptLearningConfig,
        dims: &ModelDims,
    ) -> Result<PromptLearningConfig> {
        if config.peft_type == PromptLearningType::PrefixTuning {
            return Err(PeftError::Config(
                "peft_type PREFIX_TUNING belongs to peft-prefix, not to prompt tuning".into(),
            ));
        }
        let heads = config
            .num_attention_heads
            .unwrap_or(dims.d_model / dims.head_dim.max(1));
        let layers = config.num_layers.unwrap_or(dims.layers);
        config.fill_from_model(layers, dims.d_model, heads)?;
        Ok(config)
    }

    /// Prompt tuning `RANDOM` (N(0, 1)) or `SAMPLE_VOCAB` (word embeddings
    /// of uniformly drawn ids), or a P-tuning encoder. `TEXT` needs the
    /// text's token ids: [`from_text`](Self::from_text).
    fn fresh<M: PeftModel<B>>(config: &PromptLearningConfig, model: &M) -> Result<Self> {
        let device = device_of(model);
        let [n, d] = config.embedding_shape();
        Ok(match (config.peft_type, config.prompt_tuning_init) {
            (PromptLearningType::PTuning, _) => PromptEncoder::p_tuning(config, &device),
            (_, Some(PromptTuningInit::Text)) => {
                return Err(PeftError::Config(
                    "prompt_tuning_init TEXT: use add_adapter_from_text with the text's token ids"
                        .into(),
                ))
            }
            (_, Some(PromptTuningInit::SampleVocab)) => {
                let vocab = model.dims().vocab_size;
                let draws: Vec<f32> =
                    Tensor::<B, 1>::random([n], Distribution::Uniform(0.0, vocab as f64), &device)
                        .into_data()
                        .convert::<f32>()
                        .to_vec()
                        .expect("f32");
                let ids: Vec<u32> = draws
                    .iter()
                    .map(|&u| (u as u32).min(vocab as u32 - 1))
                    .collect();
                PromptEncoder::from_tensor(embed_ids(model, &ids)?)
            }
            _ => PromptEncoder::from_tensor(Tensor::random(
                [n, d],
                Distribution::Normal(0.0, 1.0),
                &device,
            )),
        })
    }

    /// PEFT's `TEXT` init: the word embeddings of the text.
    fn from_text<M: PeftModel<B>>(
        config: &PromptLearningConfig,
        model: &M,
        text_ids: &[u32],
    ) -> Result<Self> {
        let n = config.embedding_shape()[0];
        let ids: Vec<u32> = text_ids.iter().copied().cycle().take(n).collect();
        Ok(PromptEncoder::from_tensor(embed_ids(model, &ids)?))
    }

    /// The prompts before the tokens' embeddings, the mask extended over
    /// them.
    fn enter(
        rows: Rows<'_, Self>,
        tokens: Tokens<B>,
        attention_mask: Option<Tensor<B, 2>>,
        _dims: &ModelDims,
        embed: &dyn Fn(Tensor<B, 2, Int>) -> Tensor<B, 3>,
        _cache: &mut KvCache<B>,
    ) -> (Tokens<B>, Option<Tensor<B, 2>>) {
        let prompts = match rows {
            Rows::All(e, batch) => {
                let p = e.prompt();
                let [n, d] = p.dims();
                p.unsqueeze::<3>().expand([batch, n, d])
            }
            Rows::Each(rows) => mixed_prompts(rows),
        };
        let embeds = tokens.embedded(embed);
        let [b, n, _] = prompts.dims();
        let mask =
            attention_mask.map(|m| Tensor::cat(vec![Tensor::ones([b, n], &m.device()), m], 1));
        (Tokens::Embeds(Tensor::cat(vec![prompts, embeds], 1)), mask)
    }
}

/// `[rows, n, d]`: row `i` is `rows[i]`'s prompt (each distinct prompt
/// computed once).
fn mixed_prompts<B: Backend>(rows: &[&PromptEncoder<B>]) -> Tensor<B, 3> {
    let mut distinct: Vec<(&PromptEncoder<B>, Tensor<B, 3>)> = Vec::new();
    for &e in rows {
        if distinct.iter().all(|(d, _)| !std::ptr::eq(*d, e)) {
            distinct.push((e, e.prompt().unsqueeze::<3>()));
        }
    }
    let row = |e: &PromptEncoder<B>| {
        distinct
            .iter()
            .find(|(d, _)| std::ptr::eq(*d, e))
            .expect("collected")
            .1
            .clone()
    };
    Tensor::cat(rows.iter().map(|e| row(e)).collect(), 0)
}

/// The word embeddings of `ids` as `[len, d_model]` (detached); an id past
/// the vocabulary is an error.
fn embed_ids<B: Backend, M: PeftModel<B>>(model: &M, ids: &[u32]) -> Result<Tensor<B, 2>> {
    let dims = model.dims();
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= dims.vocab_size) {
        return Err(PeftError::Config(format!(
            "token id {bad} is outside the vocabulary of {}",
            dims.vocab_size
        )));
    }
    let device = device_of(model);
    let e = model.embed_tokens(ids_tensor(ids, &device));
    Ok(e.reshape([ids.len(), dims.d_model]).detach())
}
