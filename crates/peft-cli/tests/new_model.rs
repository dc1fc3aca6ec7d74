//! The worked example of `docs/NEW_MODEL.md`: a small pre-norm decoder
//! written from scratch against [`PeftModel`], and each kind of method
//! reaching it through its one forward entry: LoRA (its slots), a prefix
//! (its key/value cache), a soft prompt (its embeddings), bottleneck
//! adapters (its residual joins), and generation ([`CausalLm`]).
//!
//! Each check compares two routes to the same function, so a model whose
//! `run` ignored a field of [`ModelInput`] (or handled it wrongly: cached
//! positions, the mask after a cache) fails here.

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig};
use burn::tensor::activation::gelu;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use peft_adapter::{AdapterModel, BnConfig};
use peft_core::compare::{assert_close, Tolerance};
use peft_core::config::InitLoraWeights;
use peft_core::generate::{CausalLm, Sampler};
use peft_core::io::{read_safetensors, HostTensor};
use peft_core::kv::{KvCache, LayerCache};
use peft_core::model::{join, InsertionPoint, ResidualHook};
use peft_core::prompt_learning::{PromptLearningConfig, PromptTuningInit};
use peft_core::slot::LinearSlotConfig;
use peft_core::{backend_tests, LinearSlot, LoraConfig, ModelDims, ModelInput, PeftModel};
use peft_lora::LoraModel;
use peft_models::attention::{attend, decoder_mask, row_positions, split_heads, tied_head};
use peft_models::fixtures::{max_diff, temp_dir};
use peft_prefix::PrefixTuningModel;
use peft_prompt::PromptTuningModel;

// ---- The model: all a downstream author writes ----

/// The sizes of a [`TinyLm`].
#[derive(Debug, Clone)]
pub struct TinyLmConfig {
    /// Rows of the embedding table.
    pub vocab_size: usize,
    /// Model width.
    pub d_model: usize,
    /// Attention heads.
    pub heads: usize,
    /// Decoder blocks.
    pub layers: usize,
    /// Longest sequence (rows of the position table).
    pub max_len: usize,
}

/// One pre-norm decoder block.
#[derive(Module, Debug)]
pub struct TinyBlock<B: Backend> {
    /// Norm before attention.
    pub ln_1: LayerNorm<B>,
    /// Query projection `[d, d]`.
    pub q_proj: LinearSlot<B>,
    /// Key projection `[d, d]`.
    pub k_proj: LinearSlot<B>,
    /// Value projection `[d, d]`.
    pub v_proj: LinearSlot<B>,
    /// Attention output projection `[d, d]`.
    pub o_proj: LinearSlot<B>,
    /// Norm before the MLP.
    pub ln_2: LayerNorm<B>,
    /// MLP up-projection `[d, 4d]`.
    pub up_proj: LinearSlot<B>,
    /// MLP down-projection `[4d, d]`.
    pub down_proj: LinearSlot<B>,
}

/// A decoder with learned positions and a head tied to the embeddings.
#[derive(Module, Debug)]
pub struct TinyLm<B: Backend> {
    /// Token embeddings `[vocab, d]`.
    pub token_embedding: Embedding<B>,
    /// Position embeddings `[max_len, d]`.
    pub position_embedding: Embedding<B>,
    /// The blocks.
    pub blocks: Vec<TinyBlock<B>>,
    /// Final norm.
    pub ln_f: LayerNorm<B>,
    /// Attention heads.
    #[module(skip)]
    pub heads: usize,
}

impl TinyLmConfig {
    /// A randomly initialised model.
    pub fn init<B: Backend>(&self, device: &B::Device) -> TinyLm<B> {
        let d = self.d_model;
        let slot = |i: usize, o: usize| LinearSlotConfig::new(i, o).init(device);
        let norm = || LayerNormConfig::new(d).init(device);
        TinyLm {
            token_embedding: EmbeddingConfig::new(self.vocab_size, d).init(device),
            position_embedding: EmbeddingConfig::new(self.max_len, d).init(device),
            blocks: (0..self.layers)
                .map(|_| TinyBlock {
                    ln_1: norm(),
                    q_proj: slot(d, d),
                    k_proj: slot(d, d),
                    v_proj: slot(d, d),
                    o_proj: slot(d, d),
                    ln_2: norm(),
                    up_proj: slot(d, 4 * d),
                    down_proj: slot(4 * d, d),
                })
                .collect(),
            ln_f: norm(),
            heads: self.heads,
        }
    }
}

impl<B: Backend> TinyBlock<B> {
    /// The block on `x: [b, t, d]`; `cache` (when given) is extended with
    /// this block's keys and values, `hook` (when given) replaces both
    /// residual joins.
    fn forward(
        &self,
        x: Tensor<B, 3>,
        heads: usize,
        mask: &Tensor<B, 4>,
        cache: Option<&mut LayerCache<B>>,
        hook: Option<&dyn ResidualHook<B>>,
        layer: usize,
    ) -> Tensor<B, 3> {
        let h = self.ln_1.forward(x.clone());
        let q = split_heads(self.q_proj.forward(h.clone()), heads);
        let k = split_heads(self.k_proj.forward(h.clone()), heads);
        let v = split_heads(self.v_proj.forward(h), heads);
        let (k, v) = LayerCache::append_to(cache, k, v);
        let a = self.o_proj.forward(attend(q, k, v, Some(mask.clone())));
        let x = join(hook, InsertionPoint::AfterAttention, layer, a, x, None);
        let h = gelu(self.up_proj.forward(self.ln_2.forward(x.clone())));
        let m = self.down_proj.forward(h);
        join(hook, InsertionPoint::AfterFeedForward, layer, m, x, None)
    }
}

impl<B: Backend> PeftModel<B> for TinyLm<B> {
    /// Logits `[b, t, vocab]`.
    type Output = Tensor<B, 3>;

    fn run(&self, input: ModelInput<'_, B>) -> Tensor<B, 3> {
        // The embeddings of ids or the embeddings given, the positions
        // already cached (a prefix, or the tokens generated so far), the
        // cache readied for our layers, the mask and the hook.
        let mut p = input.prepare(self.blocks.len(), |ids| self.token_embedding.forward(ids));
        let [b, t, _] = p.embeds.dims();
        let device = p.embeds.device();
        // Positions continue after the cache (each row's own length when a
        // server batches sequences of different lengths: `left_padding`);
        // the mask lets every token see the cache, padding excepted.
        let starts = p.starts();
        let pads = p.left_padding.as_deref();
        let mask = decoder_mask::<B>(t, p.past, p.attention_mask, pads, &device);
        let positions = row_positions::<B>(b, t, &starts, &device);
        let mut x = p.embeds + self.position_embedding.forward(positions);
        for (i, block) in self.blocks.iter().enumerate() {
            let layer_cache = p.cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = block.forward(x, self.heads, &mask, layer_cache, p.hook, i);
        }
        tied_head(self.ln_f.forward(x), self.token_embedding.weight.val())
    }

    fn dims(&self) -> ModelDims {
        let [vocab_size, d_model] = self.token_embedding.weight.val().dims();
        ModelDims {
            layers: self.blocks.len(),
            d_model,
            vocab_size,
            kv_heads: self.heads,
            head_dim: d_model / self.heads,
        }
    }

    fn embed_tokens(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.token_embedding.forward(ids)
    }

    fn hook_path(&self, point: InsertionPoint, layer: usize) -> String {
        let site = match point {
            InsertionPoint::AfterAttention => "attention_adapters",
            InsertionPoint::AfterFeedForward => "output_adapters",
        };
        format!("blocks.{layer}.{site}")
    }

    fn visit_linears(&self, f: &mut dyn FnMut(&str, &LinearSlot<B>)) {
        for (i, b) in self.blocks.iter().enumerate() {
            f(&format!("blocks.{i}.attn.q_proj"), &b.q_proj);
            f(&format!("blocks.{i}.attn.k_proj"), &b.k_proj);
            f(&format!("blocks.{i}.attn.v_proj"), &b.v_proj);
            f(&format!("blocks.{i}.attn.o_proj"), &b.o_proj);
            f(&format!("blocks.{i}.mlp.up_proj"), &b.up_proj);
            f(&format!("blocks.{i}.mlp.down_proj"), &b.down_proj);
        }
    }

    fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&str, &mut LinearSlot<B>)) {
        for (i, b) in self.blocks.iter_mut().enumerate() {
            f(&format!("blocks.{i}.attn.q_proj"), &mut b.q_proj);
            f(&format!("blocks.{i}.attn.k_proj"), &mut b.k_proj);
            f(&format!("blocks.{i}.attn.v_proj"), &mut b.v_proj);
            f(&format!("blocks.{i}.attn.o_proj"), &mut b.o_proj);
            f(&format!("blocks.{i}.mlp.up_proj"), &mut b.up_proj);
            f(&format!("blocks.{i}.mlp.down_proj"), &mut b.down_proj);
        }
    }
}

/// Generation (greedy, sampled, through the cache) for a decoder.
impl<B: Backend> CausalLm<B> for TinyLm<B> {
    fn device(&self) -> B::Device {
        self.token_embedding.weight.device()
    }

    fn forward_logits(&self, input: ModelInput<'_, B>) -> Tensor<B, 3> {
        self.run(input)
    }
}

// ---- The checks ----

/// Two computations of one function through different code paths.
const SAME: Tolerance = Tolerance::new(1e-5, 1e-6);

fn tiny<B: Backend>(device: &B::Device) -> TinyLm<B> {
    B::seed(device, 7);
    let model = TinyLmConfig {
        vocab_size: 50,
        d_model: 32,
        heads: 4,
        layers: 2,
        max_len: 32,
    }
    .init(device);
    // Burn draws a parameter's initial values when it is first read: a
    // clone taken before that draws its own. One pass fixes them, so the
    // wrappers below hold the same weights as `model`.
    model.logits(ids(&[0], device));
    model
}

fn ids<B: Backend>(v: &[i64], device: &B::Device) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(v.to_vec(), [1, v.len()]), device)
}

fn host<B: Backend>(t: Tensor<B, 3>) -> HostTensor {
    HostTensor::from_tensor(t)
}

/// Positions `from..` of logits `[1, t, v]`.
fn tail<B: Backend>(t: Tensor<B, 3>, from: usize) -> HostTensor {
    let [_, len, v] = t.dims();
    host(t.slice([0..1, from..len, 0..v]))
}

const TEXT: [i64; 3] = [4, 8, 15];
const INPUT: [i64; 4] = [16, 23, 42, 7];
const TEXT_IDS: [u32; 3] = [4, 8, 15];

/// `TEXT ++ INPUT` through the plain model.
fn text_then_input<B: Backend>(model: &TinyLm<B>, device: &B::Device) -> Tensor<B, 3> {
    let all: Vec<i64> = TEXT.iter().chain(&INPUT).copied().collect();
    model.logits(ids(&all, device))
}

/// The logits of tokens run after a cache equal those of the whole
/// sequence at once; greedy generation through the cache equals
/// recomputing every step.
fn the_cache_continues_the_sequence<B: Backend>(device: &B::Device) {
    let model = tiny::<B>(device);
    let mut cache = KvCache::new();
    model.logits_cached(ids(&TEXT, device), &mut cache);
    assert_eq!(cache.len(), TEXT.len());
    let after = host(model.logits_cached(ids(&INPUT, device), &mut cache));
    let want = tail(text_then_input(&model, device), TEXT.len());
    assert_close("after the cache vs the whole sequence", &after, &want, SAME);

    let prompt: [u32; 5] = [3, 1, 4, 1, 5];
    let cached = model.generate(&prompt, 8, &mut Sampler::Greedy, None, true);
    let recomputed = model.generate(&prompt, 8, &mut Sampler::Greedy, None, false);
    assert_eq!(cached.len(), 8);
    assert_eq!(cached, recomputed);
}

/// A prefix made of a text's own keys and values is that text before the
/// input: positions continue after the cache, the cache is visible.
fn a_prefix_from_text_is_the_text_before_the_input<B: Backend>(device: &B::Device) {
    let model = tiny::<B>(device);
    let mut prefix = PrefixTuningModel::wrap(model.clone());
    prefix
        .add_adapter_from_text("text", PromptLearningConfig::prefix_tuning(3), &TEXT_IDS)
        .unwrap();
    let got = host(prefix.forward(ids(&INPUT, device), None));
    let masked = host(prefix.forward(
        ids(&INPUT, device),
        Some(Tensor::ones([1, INPUT.len()], device)),
    ));
    let want = tail(text_then_input(&model, device), TEXT.len());
    assert_close("prefix from text vs text ++ input", &got, &want, SAME);
    assert_close("prefix with an all-ones mask", &masked, &got, SAME);
}

/// A soft prompt of a text's embeddings is that text before the input; the
/// output covers the prompt's positions too.
fn a_prompt_from_text_is_the_text_before_the_input<B: Backend>(device: &B::Device) {
    let model = tiny::<B>(device);
    let mut prompt = PromptTuningModel::wrap(model.clone());
    let mut config = PromptLearningConfig::prompt_tuning(3, PromptTuningInit::Text);
    config.prompt_tuning_init_text = Some("the text".into());
    prompt
        .add_adapter_from_text("text", config, &TEXT_IDS)
        .unwrap();
    let got = host(prompt.forward(ids(&INPUT, device), None));
    let want = host(text_then_input(&model, device));
    assert_close("prompt from text vs text ++ input", &got, &want, SAME);
}

/// LoRA finds the slots by their paths; merged equals unmerged.
fn lora_reaches_the_slots<B: Backend>(device: &B::Device) {
    let model = tiny::<B>(device);
    let input = ids(&INPUT, device);
    let base = host(model.logits(input.clone()));
    let mut config = LoraConfig::new(4, 8.0, &["q_proj", "v_proj"]);
    config.init_lora_weights = InitLoraWeights::Bool(false);
    let mut lora = LoraModel::new(model, config).unwrap();
    let adapted = host(lora.model.logits(input.clone()));
    let moved = max_diff(&adapted, &base);
    assert!(moved > 1e-3, "LoRA did not change the logits ({moved:e})");
    lora.merge_adapter().unwrap();
    let merged = host(lora.model.logits(input));
    assert_close("merged vs unmerged LoRA", &merged, &adapted, SAME);
}

/// Bottleneck adapters sit at the joins `hook_path` names, in the files too.
fn bottleneck_adapters_reach_the_joins<B: Backend>(device: &B::Device) {
    let model = tiny::<B>(device);
    let input = ids(&INPUT, device);
    let base = host(model.logits(input.clone()));
    let adapters = AdapterModel::new(model, "task", BnConfig::seq_bn()).unwrap();
    let adapted = host(adapters.forward(input.clone(), None).unwrap());
    let moved = max_diff(&adapted, &base);
    assert!(moved > 1e-4, "the adapters did not run ({moved:e})");
    let cached = host(adapters.logits_cached(input, &mut Default::default()));
    assert_close("adapters through the cache", &cached, &adapted, SAME);

    let dir = temp_dir("new-model-bn");
    adapters.save_adapter("task", &dir).unwrap();
    let mut keys = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            keys.extend(read_safetensors(&path).unwrap().into_keys());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    for layer in 0..2 {
        let key = format!("blocks.{layer}.output_adapters.adapters.task.adapter_down.0.weight");
        assert!(keys.contains(&key), "{key} not among {keys:?}");
    }
}

backend_tests!(
    the_cache_continues_the_sequence,
    a_prefix_from_text_is_the_text_before_the_input,
    a_prompt_from_text_is_the_text_before_the_input,
    lora_reaches_the_slots,
    bottleneck_adapters_reach_the_joins,
);
