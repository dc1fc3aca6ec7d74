//! [`PrefixTuningModel`]: a model with named prefixes, the prompt-learning
//! wrapper of `peft-core` over [`PrefixEncoder`], whose virtual tokens enter
//! the model as the first entry of every layer's key/value cache.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use peft_core::generate::ids_tensor;
use peft_core::kv::{KvCache, LayerCache};
use peft_core::model::device_of;
use peft_core::prompt_learning::{PromptLearningConfig, PromptLearningType};
use peft_core::virtual_model::{Rows, VirtualTokenModel, VirtualTokens};
use peft_core::{ModelDims, ModelInput, PeftError, PeftModel, Result, Tokens};

use crate::encoder::{split_layers, LayerPrefix, PrefixEncoder};

/// A model carrying named prefixes, at most one active.
///
/// The wrapped model is frozen; each prefix is its own Burn module
/// ([`PrefixEncoder`]): train it with any Burn optimizer through
/// [`map_encoder`](VirtualTokenModel::map_encoder).
pub type PrefixTuningModel<B, M> = VirtualTokenModel<B, M, PrefixEncoder<B>>;

impl<B: Backend> VirtualTokens<B> for PrefixEncoder<B> {
    const WHAT: &'static str = "prefixes";

    /// None: a prefix sits in the cache, not in the output.
    fn output_positions(&self) -> usize {
        0
    }

    /// The width of a layer's keys is per key/value head, as PEFT's
    /// `_prepare_prompt_learning_config` sets it.
    fn fit_config(
        mut config: PromptLearningConfig,
        dims: &ModelDims,
    ) -> Result<PromptLearningConfig> {
        if config.peft_type != PromptLearningType::PrefixTuning {
            return Err(PeftError::Config(format!(
                "peft_type {} is not PREFIX_TUNING",
                config.peft_type.as_str()
            )));
        }
        config.fill_from_model(dims.layers, dims.kv_heads * dims.head_dim, dims.kv_heads)?;
        Ok(config)
    }

    fn fresh<M: PeftModel<B>>(config: &PromptLearningConfig, model: &M) -> Result<Self> {
        let device = device_of(model);
        Ok(PrefixEncoder::new(config, &device))
    }

    /// The keys and values the model computes for the text: before
    /// training, the model behaves exactly as if the text preceded every
    /// input. Not for a projected config (its parameters are not a prefix).
    fn from_text<M: PeftModel<B>>(
        config: &PromptLearningConfig,
        model: &M,
        text_ids: &[u32],
    ) -> Result<Self> {
        if config.projected() {
            return Err(PeftError::Config(
                "a projected prefix cannot start from text; use prefix_projection: false".into(),
            ));
        }
        let ids: Vec<u32> = text_ids
            .iter()
            .copied()
            .cycle()
            .take(config.num_virtual_tokens)
            .collect();
        let device = device_of(model);
        let mut cache = KvCache::new();
        model.run(ModelInput::ids(ids_tensor(&ids, &device)).cache(&mut cache));
        PrefixEncoder::from_cache(&cache)
    }

    fn enter(
        rows: Rows<'_, Self>,
        tokens: Tokens<B>,
        attention_mask: Option<Tensor<B, 2>>,
        dims: &ModelDims,
        _embed: &dyn Fn(Tensor<B, 2, Int>) -> Tensor<B, 3>,
        cache: &mut KvCache<B>,
    ) -> (Tokens<B>, Option<Tensor<B, 2>>) {
        *cache = match rows {
            Rows::All(e, batch) => e.cache(batch, dims.layers, dims.kv_heads, dims.head_dim),
            Rows::Each(rows) => mixed_cache(rows, dims),
        };
        (tokens, attention_mask)
    }
}

/// The cache whose row `i` holds `rows[i]`'s prefix (each distinct prefix
/// split into layers once).
fn mixed_cache<B: Backend>(rows: &[&PrefixEncoder<B>], dims: &ModelDims) -> KvCache<B> {
    let mut distinct: Vec<(&PrefixEncoder<B>, Vec<LayerPrefix<B>>)> = Vec::new();
    for &e in rows {
        if distinct.iter().all(|(d, _)| !std::ptr::eq(*d, e)) {
            let layers = split_layers(e.prefix(), dims.layers, dims.kv_heads, dims.head_dim);
            distinct.push((e, layers));
        }
    }
    let row = |e: &PrefixEncoder<B>| {
        &distinct
            .iter()
            .find(|(d, _)| std::ptr::eq(*d, e))
            .expect("collected")
            .1
    };
    KvCache {
        layers: (0..dims.layers)
            .map(|l| LayerCache {
                k: Some(Tensor::cat(
                    rows.iter().map(|e| row(e)[l].0.clone()).collect(),
                    0,
                )),
                v: Some(Tensor::cat(
                    rows.iter().map(|e| row(e)[l].1.clone()).collect(),
                    0,
                )),
            })
            .collect(),
    }
}
