//! A model with its method attached ([`Adapted`]: one variant per library
//! wrapper), its forward passes, generation and causal-LM metrics, and
//! how a run attaches a method to train or a saved folder to evaluate.

use std::path::Path;

use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use peft_adapter::{AdapterModel, BnConfig};
use peft_core::generate::{CausalLm, Sampler};
use peft_core::loss::causal_lm_loss_after_prompt;
use peft_core::prompt_learning::PromptLearningConfig;
use peft_core::virtual_model::{VirtualTokenModel, VirtualTokens};
use peft_core::{AdapterHost, ModelInput, ParamCount, PeftModel, Result};
use peft_prefix::PrefixTuningModel;
use peft_prompt::PromptTuningModel;

use super::arch::CausalModel;
use super::method::{Method, Slots};
use crate::train::Metric;

/// A model with its method: the model carrying LoRA / (IA)³ adapters (or
/// none) in its slots, the model with bottleneck adapters, or a frozen model
/// after trainable virtual tokens.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Adapted<B: Backend, M: Module<B>> {
    /// LoRA, DoRA, (IA)³, or no adapter.
    Slots(Slots<B, M>),
    /// Bottleneck adapters.
    Adapters(AdapterModel<B, M>),
    /// Prefixes before the frozen model (one trains).
    Prefix(PrefixTuningModel<B, M>),
    /// Soft prompts before the frozen model (one trains).
    Prompt(PromptTuningModel<B, M>),
}

impl<B: Backend, M: CausalModel<B> + Module<B>> Adapted<B, M> {
    /// Logits `[b, n + t, vocab]`, `n` = [`virtual_tokens`](Self::virtual_tokens)
    /// (a soft prompt's positions come first; a prefix has none).
    pub fn logits(&self, ids: Tensor<B, 2, Int>) -> Result<Tensor<B, 3>> {
        match self {
            Adapted::Slots(s) => Ok(s.model.run(ModelInput::ids(ids))),
            Adapted::Adapters(a) => a.forward(ids, None),
            Adapted::Prefix(p) => Ok(p.forward(ids, None)),
            Adapted::Prompt(p) => Ok(p.forward(ids, None)),
        }
    }

    /// Class logits `[b, labels]` of a decoder with a `score` head
    /// (`LlamaForSequenceClassification`): each row's at its last token
    /// that is not padding, after any virtual tokens.
    pub fn classify(
        &self,
        ids: Tensor<B, 2, Int>,
        pad_token_id: Option<i64>,
    ) -> Result<Tensor<B, 2>> {
        self.classify_at(ids.clone(), ids, pad_token_id)
    }

    /// [`classify`](Self::classify) of a right-padded batch whose
    /// `attention_mask` `[b, t]` marks the real tokens: each row is read at
    /// its last one, whatever id the tokenizer padded with (transformers
    /// reads the last token that is not `pad_token_id`: the same position
    /// when the tokenizer pads with it).
    pub fn classify_masked(
        &self,
        ids: Tensor<B, 2, Int>,
        mask: Tensor<B, 2>,
    ) -> Result<Tensor<B, 2>> {
        // Real tokens as 1, padding as 0: with 0 as the padding id, the
        // last non-padding token is the last real one.
        let real = mask.greater_elem(0.5).int().reshape(ids.dims());
        self.classify_at(ids, real, Some(0))
    }

    /// Class logits of `ids`, each row's at the last position of `marks`
    /// `[b, t]` that is not `pad`.
    fn classify_at(
        &self,
        ids: Tensor<B, 2, Int>,
        marks: Tensor<B, 2, Int>,
        pad: Option<i64>,
    ) -> Result<Tensor<B, 2>> {
        let t = ids.dims()[1];
        let logits = self.logits(ids)?.narrow(1, self.virtual_tokens(), t);
        peft_models::seq_cls::last_token_logits(logits, marks, pad)
    }

    /// Virtual positions at the start of the logits (a soft prompt's).
    pub fn virtual_tokens(&self) -> usize {
        match self {
            Adapted::Prefix(p) => p.num_virtual_tokens(),
            Adapted::Prompt(p) => p.num_virtual_tokens(),
            _ => 0,
        }
    }
}

impl<B: Backend, M: CausalLm<B> + PeftModel<B, Output = Tensor<B, 3>>> Adapted<B, M> {
    /// Continues `prompt` (token ids) through the model's KV cache, with
    /// the attached adapter.
    pub fn generate(
        &self,
        prompt: &[u32],
        max_new: usize,
        sampler: &mut Sampler,
        eos: Option<u32>,
    ) -> Result<Vec<u32>> {
        match self {
            Adapted::Slots(s) => Ok(s.model.generate(prompt, max_new, sampler, eos, true)),
            Adapted::Adapters(a) => a.generate_checked(prompt, max_new, sampler, eos),
            Adapted::Prefix(p) => Ok(p.generate(prompt, max_new, sampler, eos)),
            Adapted::Prompt(p) => Ok(p.generate(prompt, max_new, sampler, eos)),
        }
    }
}

pub fn ids_batch<B: Backend>(
    blocks: &[Vec<u32>],
    idx: &[usize],
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let len = blocks[0].len();
    let flat: Vec<i64> = idx
        .iter()
        .flat_map(|&i| blocks[i].iter().map(|&t| t as i64))
        .collect();
    Tensor::from_data(TensorData::new(flat, [idx.len(), len]), device)
}

/// Mean next-token loss of a batch of blocks, and its token count.
pub fn lm_loss<B: Backend, M: CausalModel<B> + Module<B>>(
    model: &Adapted<B, M>,
    blocks: &[Vec<u32>],
    idx: &[usize],
    device: &B::Device,
) -> Result<(Tensor<B, 1>, usize)> {
    let ids = ids_batch::<B>(blocks, idx, device);
    let n = idx.len() * blocks[0].len();
    let logits = model.logits(ids.clone())?;
    Ok((
        causal_lm_loss_after_prompt(logits, ids, model.virtual_tokens()),
        n,
    ))
}

/// Perplexity on `blocks` (the exponential of the mean next-token loss).
pub fn perplexity<B: Backend, M: CausalModel<B> + Module<B>>(
    model: &Adapted<B, M>,
    blocks: &[Vec<u32>],
    device: &B::Device,
) -> Result<Metric> {
    let mut total = 0.0;
    let all: Vec<usize> = (0..blocks.len()).collect();
    for idx in all.chunks(8) {
        let (l, _) = lm_loss(model, blocks, idx, device)?;
        total += l.into_scalar().elem::<f64>() * idx.len() as f64;
    }
    let mean = total / blocks.len().max(1) as f64;
    Ok(Metric {
        name: "perplexity",
        value: mean.exp(),
        higher_is_better: false,
    })
}

/// The inference copy of a model `M` being trained on `B`.
pub type InnerAdapted<B, M> =
    Adapted<<B as AutodiffBackend>::InnerBackend, <M as AutodiffModule<B>>::InnerModule>;

/// `model` with `method` attached as adapter `default` to train: fresh, or
/// continued from the `last/` checkpoint `from`.
pub fn attach_to_train<B: Backend, M: PeftModel<B>>(
    model: M,
    method: &Method,
    from: Option<&Path>,
) -> Result<Adapted<B, M>> {
    Ok(match method {
        Method::Slot(config) => Adapted::Slots(match from {
            Some(dir) => Slots::from_pretrained(model, dir)?,
            None => Slots::new(model, config.clone())?,
        }),
        Method::Adapter(c) => Adapted::Adapters(bottleneck_to_train(model, c, from)?),
        Method::Prefix(c) => Adapted::Prefix(virtual_to_train(model, c, from)?),
        Method::Prompt(c) => Adapted::Prompt(virtual_to_train(model, c, from)?),
    })
}

impl<B: Backend, M: PeftModel<B>> Adapted<B, M> {
    /// The wrapper, as what every wrapper does with its adapters.
    pub fn host(&self) -> &dyn AdapterHost {
        match self {
            Adapted::Slots(s) => s,
            Adapted::Adapters(a) => a,
            Adapted::Prefix(p) => p,
            Adapted::Prompt(p) => p,
        }
    }

    /// [`host`](Self::host), mutably.
    pub fn host_mut(&mut self) -> &mut dyn AdapterHost {
        match self {
            Adapted::Slots(s) => s,
            Adapted::Adapters(a) => a,
            Adapted::Prefix(p) => p,
            Adapted::Prompt(p) => p,
        }
    }

    /// Trainable (the active adapter's) and total parameters, as PEFT's
    /// `get_nb_trainable_parameters` counts them.
    pub fn param_count(&self) -> ParamCount {
        self.host().param_count()
    }

    /// Writes the trained adapter `default` into `dir`, in its method's
    /// own format (a prefix's or prompt's full encoder beside PEFT's files
    /// when it has a reparameterisation, so that a run can continue).
    pub fn save_trained(&self, dir: &Path) -> Result<()> {
        let name = peft_core::DEFAULT_ADAPTER;
        match self {
            Adapted::Prefix(p) => p.save_checkpoint(name, dir),
            Adapted::Prompt(p) => p.save_checkpoint(name, dir),
            _ => self.host().save_adapter(name, dir),
        }
    }
}

/// A bottleneck adapter `default` to train: fresh per `config`, or loaded
/// from a `last/` checkpoint to continue.
fn bottleneck_to_train<B: Backend, M: PeftModel<B>>(
    model: M,
    config: &BnConfig,
    from: Option<&Path>,
) -> Result<AdapterModel<B, M>> {
    match from {
        None => AdapterModel::new(model, peft_core::DEFAULT_ADAPTER, config.clone()),
        Some(dir) => {
            let mut a = AdapterModel::wrap(model);
            a.load_adapter(dir, Some(peft_core::DEFAULT_ADAPTER))?;
            a.train_adapter(peft_adapter::Setup::single(peft_core::DEFAULT_ADAPTER))?;
            Ok(a)
        }
    }
}

/// A prefix / prompt `default` to train: fresh per `config`, or continued
/// from a `last/` checkpoint (its full encoder when it kept one).
fn virtual_to_train<B: Backend, M: PeftModel<B>, E: VirtualTokens<B>>(
    model: M,
    config: &PromptLearningConfig,
    from: Option<&Path>,
) -> Result<VirtualTokenModel<B, M, E>> {
    match from {
        None => VirtualTokenModel::new(model, config.clone()),
        Some(dir) => VirtualTokenModel::resume(model, dir),
    }
}

/// `model` with the adapter folder `dir` attached (detected method), or
/// plain without one: what `eval`, `forward` and `generate` run.
pub fn load_adapted<B: Backend, M>(model: M, dir: Option<&Path>) -> Result<Adapted<B, M>>
where
    M: PeftModel<B> + Clone,
{
    let Some(dir) = dir else {
        return Ok(Adapted::Slots(Slots::wrap(model)));
    };
    Ok(match Method::detect(dir)? {
        Method::Slot(_) => Adapted::Slots(Slots::from_pretrained(model, dir)?),
        Method::Adapter(_) => {
            let mut a = AdapterModel::wrap(model);
            let name = a.load_adapter(dir, None)?;
            a.set_active(peft_adapter::Setup::single(&name))?;
            Adapted::Adapters(a)
        }
        Method::Prefix(_) => Adapted::Prefix(PrefixTuningModel::from_pretrained(model, dir)?),
        Method::Prompt(_) => Adapted::Prompt(PromptTuningModel::from_pretrained(model, dir)?),
    })
}
