//! A model with its method attached ([`Adapted`]: one variant per library
//! wrapper), its forward passes, generation and causal-LM metrics, and
//! how a run attaches a method to train or a saved folder to evaluate.

use std::path::Path;

use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use peft_adapter::{AdapterModel, BnConfig};
use peft_core::generate::{ids_tensor, last_row, CausalLm, KvCache, Sampler};
use peft_core::loss::causal_lm_loss_after_prompt;
use peft_core::prompt_learning::PromptLearningConfig;
use peft_core::virtual_model::{VirtualTokenModel, VirtualTokens};
use peft_core::{AdapterHost, ModelInput, ParamCount, PeftModel, Result};
use peft_lora::{converts_to_lora, ConvertToLora, InitialFactors};
use peft_prefix::PrefixTuningModel;
use peft_prompt::PromptTuningModel;

use super::arch::CausalModel;
use super::method::{Method, Slots};
use crate::train::{Metric, Saving};

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

/// One sequence being generated: its KV cache and the logits its next
/// token is sampled from. [`Adapted::start`] makes one,
/// [`Adapted::advance`] feeds it a token; a server steps many of them in
/// turn, each through its own adapter.
#[derive(Debug)]
pub struct Decoding<B: Backend> {
    /// Keys and values of every position so far (after any prefix).
    cache: KvCache<B>,
    /// `[1, t, vocab]`: the last step's logits; the next token comes from
    /// its last row.
    logits: Tensor<B, 3>,
}

impl<B: Backend> Decoding<B> {
    /// The next token per `sampler`, from the last step's logits.
    pub fn sample(&self, sampler: &mut Sampler) -> u32 {
        sampler.sample(&last_row(self.logits.clone()))
    }

    /// Positions in the cache: virtual tokens, the prompt and the tokens
    /// fed since.
    pub fn positions(&self) -> usize {
        self.cache.len()
    }

    /// The logits the next token is sampled from (the last position's).
    pub fn next_logits(&self) -> Vec<f32> {
        last_row(self.logits.clone())
    }

    /// The KV cache, for decoding on elsewhere (a server's batch).
    pub fn into_cache(self) -> KvCache<B> {
        self.cache
    }
}

impl<B: Backend, M: CausalLm<B> + PeftModel<B, Output = Tensor<B, 3>>> Adapted<B, M> {
    /// Continues `prompt` (token ids) through the model's KV cache, with
    /// the attached adapter: [`start`](Self::start), then
    /// [`advance`](Self::advance) with each sampled token, up to `max_new`
    /// tokens or `eos`.
    pub fn generate(
        &self,
        prompt: &[u32],
        max_new: usize,
        sampler: &mut Sampler,
        eos: Option<u32>,
    ) -> Result<Vec<u32>> {
        let mut state = self.start(prompt)?;
        let mut out = Vec::new();
        while out.len() < max_new {
            let next = state.sample(sampler);
            out.push(next);
            if Some(next) == eos || out.len() == max_new {
                break;
            }
            self.advance(&mut state, next);
        }
        Ok(out)
    }

    /// The first step of generation: `prompt` (after the method's virtual
    /// tokens) through a fresh KV cache.
    pub fn start(&self, prompt: &[u32]) -> Result<Decoding<B>> {
        let mut cache = KvCache::new();
        let logits = match self {
            Adapted::Slots(s) => s
                .model
                .logits_cached(ids_tensor(prompt, &s.model.device()), &mut cache),
            Adapted::Adapters(a) => {
                a.check_generation()?;
                a.logits_cached(ids_tensor(prompt, &a.device()), &mut cache)
            }
            Adapted::Prefix(p) => return Ok(Decoding::from(p.start_generation(prompt))),
            Adapted::Prompt(p) => return Ok(Decoding::from(p.start_generation(prompt))),
        };
        Ok(Decoding { cache, logits })
    }

    /// Feeds `token` to a sequence [`start`](Self::start)ed by this model:
    /// one position more in its cache, and the logits after it.
    pub fn advance(&self, state: &mut Decoding<B>, token: u32) {
        let step = |m: &dyn CausalLm<B>, cache: &mut KvCache<B>| {
            m.logits_cached(ids_tensor(&[token], &m.device()), cache)
        };
        state.logits = match self {
            Adapted::Slots(s) => step(&s.model, &mut state.cache),
            Adapted::Adapters(a) => step(a, &mut state.cache),
            Adapted::Prefix(p) => step(&p.model, &mut state.cache),
            Adapted::Prompt(p) => step(&p.model, &mut state.cache),
        };
    }
}

impl<B: Backend> From<(Tensor<B, 3>, KvCache<B>)> for Decoding<B> {
    fn from((logits, cache): (Tensor<B, 3>, KvCache<B>)) -> Self {
        Decoding { cache, logits }
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
    /// when it has a reparameterisation, so that a run can continue). A
    /// PiSSA / OLoRA adapter is written for `best/` as the plain LoRA of the
    /// original weights (PEFT's `path_initial_model_for_weight_conversion`:
    /// it loads on the untouched base in any tool), and for `last/` as it
    /// trains (PEFT's layout; loading splits the base again, so a resumed
    /// run continues exactly). A split DoRA adapter, which has no plain-LoRA
    /// form, stays in PEFT's layout in both.
    pub fn save_trained(&self, dir: &Path, saving: Saving) -> Result<()> {
        let name = peft_core::DEFAULT_ADAPTER;
        match self {
            Adapted::Prefix(p) => p.save_checkpoint(name, dir),
            Adapted::Prompt(p) => p.save_checkpoint(name, dir),
            Adapted::Slots(s) if saving == Saving::Best && converts_to_lora(s, name) => {
                s.save_as_lora(name, dir, InitialFactors::Recorded)
            }
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
