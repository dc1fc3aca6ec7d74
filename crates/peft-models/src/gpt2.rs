//! GPT-2 (`GPT2LMHeadModel`). Its `Conv1D` layers store weights as
//! `[in, out]`, which is already Burn's layout; PEFT's `fan_in_fan_out`
//! therefore changes nothing in this crate's arithmetic.

use std::path::Path;

use crate::attention::Hook;
use burn::module::Module;
use burn::nn::Embedding;

use crate::norm::LayerNorm;
use burn::tensor::activation::gelu_approximate;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use peft_core::model::InsertionPoint::{AfterAttention, AfterFeedForward};
use peft_core::model::{join, InsertionPoint, ResidualHook};
use peft_core::{
    EmbeddingSlot, LinearSlot, ModelDims, ModelInput, NormSlot, PeftError, PeftModel, Result,
};
use serde::Deserialize;

use crate::attention::{attend, decoder_mask, positions, row_positions, split_heads, tied_head};
use crate::checkpoint::{check_dims, check_heads, read_config, Checkpoint};
use crate::generate::{CausalLm, KvCache, LayerCache};

/// The fields of a GPT-2 `config.json` this model uses.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Gpt2Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Maximum sequence length.
    pub n_positions: usize,
    /// Model width.
    pub n_embd: usize,
    /// Number of blocks.
    pub n_layer: usize,
    /// Attention heads.
    pub n_head: usize,
    /// Feed-forward width (default `4·n_embd`).
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// Only `gelu_new` (tanh approximation) is supported.
    #[serde(default = "default_act")]
    pub activation_function: String,
    /// The padding token: `GPT2ForSequenceClassification` classifies each
    /// row at its last token that is not this one.
    #[serde(default)]
    pub pad_token_id: Option<i64>,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "gelu_new".into()
}

/// One GPT-2 block.
#[derive(Module, Debug)]
pub struct Gpt2Block<B: Backend> {
    /// LayerNorm before attention.
    pub ln_1: LayerNorm<B>,
    /// Fused q/k/v projection `[d, 3d]`.
    pub c_attn: LinearSlot<B>,
    /// Attention output projection `[d, d]`.
    pub attn_c_proj: LinearSlot<B>,
    /// LayerNorm before the MLP.
    pub ln_2: LayerNorm<B>,
    /// MLP up-projection `[d, ff]`.
    pub c_fc: LinearSlot<B>,
    /// MLP down-projection `[ff, d]`.
    pub mlp_c_proj: LinearSlot<B>,
}

/// `GPT2LMHeadModel` (output head tied to `wte`), or
/// `GPT2ForSequenceClassification` (a `score` head).
#[derive(Module, Debug)]
pub struct Gpt2<B: Backend> {
    /// Token embeddings `[vocab, d]`, adaptable (`modules_to_save`,
    /// trainable tokens); the language-model head's matrix too.
    pub wte: EmbeddingSlot<B>,
    /// Position embeddings `[n_positions, d]`.
    pub wpe: Embedding<B>,
    /// Blocks.
    pub h: Vec<Gpt2Block<B>>,
    /// Final LayerNorm.
    pub ln_f: LayerNorm<B>,
    /// `score` `[d, num_labels]` (no bias) of `GPT2ForSequenceClassification`:
    /// when present it is the output head in place of the tied one, giving
    /// class logits at every position (`seq_cls.rs` picks each row's last
    /// real token).
    pub score: Option<LinearSlot<B>>,
    /// The configuration.
    #[module(skip)]
    pub config: Gpt2Config,
    /// Module-path prefix: `transformer.` in `GPT2LMHeadModel`, empty in `GPT2Model`.
    #[module(skip)]
    pub prefix: String,
}

impl<B: Backend> Gpt2Block<B> {
    fn forward(
        &self,
        x: Tensor<B, 3>,
        heads: usize,
        mask: &Tensor<B, 4>,
        cache: Option<&mut LayerCache<B>>,
        hook: Hook<'_, B>,
    ) -> Tensor<B, 3> {
        let [b, t, d] = x.dims();
        let qkv = self.c_attn.forward(self.ln_1.forward(x.clone()));
        let q = split_heads(qkv.clone().slice([0..b, 0..t, 0..d]), heads);
        let k = split_heads(qkv.clone().slice([0..b, 0..t, d..2 * d]), heads);
        let v = split_heads(qkv.slice([0..b, 0..t, 2 * d..3 * d]), heads);
        let (k, v) = LayerCache::append_to(cache, k, v);
        let (hook, i) = (hook.map(|h| h.0), hook.map_or(0, |h| h.1));
        let a = self
            .attn_c_proj
            .forward(attend(q, k, v, Some(mask.clone())));
        let x = join(hook, AfterAttention, i, a, x, None);
        let h = gelu_approximate(self.c_fc.forward(self.ln_2.forward(x.clone())));
        join(
            hook,
            AfterFeedForward,
            i,
            self.mlp_c_proj.forward(h),
            x,
            None,
        )
    }
}

impl<B: Backend> Gpt2<B> {
    /// Loads `config.json` + `model.safetensors` from a Hugging Face directory.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        Checkpoint::<B>::check_model_type(dir, &["gpt2"])?;
        let config: Gpt2Config = read_config(dir)?;
        if config.activation_function != "gelu_new" {
            return Err(PeftError::Config(format!(
                "activation_function `{}` is not supported (gelu_new)",
                config.activation_function
            )));
        }
        let mut ck = Checkpoint::<B>::open(dir, device)?;
        // GPT2LMHeadModel checkpoints prefix with `transformer.`; bare GPT2Model ones do not.
        let root = if ck.has_prefix("transformer.") {
            "transformer."
        } else {
            ""
        };
        let file = dir.join("config.json");
        check_dims(
            &file,
            &[
                ("vocab_size", config.vocab_size),
                ("n_positions", config.n_positions),
                ("n_embd", config.n_embd),
                ("n_layer", config.n_layer),
                ("n_head", config.n_head),
                ("n_inner", config.n_inner.unwrap_or(1)),
            ],
        )?;
        check_heads(&file, ("n_embd", config.n_embd), ("n_head", config.n_head))?;
        let d = config.n_embd;
        let ff = config.n_inner.unwrap_or(4 * d);
        let eps = config.layer_norm_epsilon;
        // Not `with_capacity`: the layer count is what a file claims.
        let mut h = Vec::new();
        for i in 0..config.n_layer {
            let p = format!("{root}h.{i}");
            h.push(Gpt2Block {
                ln_1: ck.layer_norm(&format!("{p}.ln_1"), d, eps)?,
                c_attn: ck.conv1d(&format!("{p}.attn.c_attn"), d, 3 * d)?,
                attn_c_proj: ck.conv1d(&format!("{p}.attn.c_proj"), d, d)?,
                ln_2: ck.layer_norm(&format!("{p}.ln_2"), d, eps)?,
                c_fc: ck.conv1d(&format!("{p}.mlp.c_fc"), d, ff)?,
                mlp_c_proj: ck.conv1d(&format!("{p}.mlp.c_proj"), ff, d)?,
            });
        }
        let score = ck.optional_head("score", d, false)?;
        let model = Gpt2 {
            wte: ck.embedding_slot(&format!("{root}wte.weight"), config.vocab_size, d)?,
            wpe: ck.embedding(&format!("{root}wpe.weight"), config.n_positions, d)?,
            ln_f: ck.layer_norm(&format!("{root}ln_f"), d, eps)?,
            score,
            h,
            config,
            prefix: root.to_string(),
        };
        ck.finish()?;
        Ok(model)
    }

    /// Logits `[b, t, vocab]` for `ids: [b, t]`.
    pub fn forward(
        &self,
        ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2>>,
    ) -> Tensor<B, 3> {
        self.run(ModelInput::ids(ids).mask(attention_mask))
    }
}

impl<B: Backend> Gpt2<B> {
    /// Positions from `starts` ([`row_positions`]), the blocks (extending
    /// `cache` when given), the final norm and the tied head.
    fn run_blocks(
        &self,
        embeds: Tensor<B, 3>,
        starts: &[usize],
        mask: Tensor<B, 4>,
        mut cache: Option<&mut KvCache<B>>,
        hook: Option<&dyn ResidualHook<B>>,
    ) -> Tensor<B, 3> {
        let device = embeds.device();
        let [b, t, _] = embeds.dims();
        let positions = row_positions::<B>(b, t, starts, &device);
        let mut x = embeds + self.wpe.forward(positions);
        for (i, block) in self.h.iter().enumerate() {
            let c = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = block.forward(x, self.config.n_head, &mask, c, hook.map(|h| (h, i)));
        }
        self.head(x)
    }

    /// Final norm and output head: the `score` head's class logits when
    /// there is one, else the tied language-model head's.
    fn head(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self.ln_f.forward(x);
        match &self.score {
            Some(score) => score.forward(h),
            None => self.wte.tied_head(h, tied_head),
        }
    }

    /// Logits for the next tokens after those in `cache` (extended in place).
    pub fn forward_cached(&self, ids: Tensor<B, 2, Int>, cache: &mut KvCache<B>) -> Tensor<B, 3> {
        self.run(ModelInput::ids(ids).cache(cache))
    }
}

impl<B: Backend> peft_core::layered::LayeredModel<B> for Gpt2<B> {
    /// The attention mask.
    type Context = Tensor<B, 4>;

    fn layer_input(
        &self,
        ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2>>,
    ) -> (Tensor<B, 3>, Self::Context) {
        let device = ids.device();
        let [b, t] = ids.dims();
        let mask = decoder_mask::<B>(t, 0, attention_mask, None, &device);
        let x = self.wte.forward(ids) + self.wpe.forward(positions::<B>(b, t, 0, &device));
        (x, mask)
    }

    fn num_layers(&self) -> usize {
        self.h.len()
    }

    fn run_layer(&self, i: usize, x: Tensor<B, 3>, mask: &Self::Context) -> Tensor<B, 3> {
        self.h[i].forward(x, self.config.n_head, mask, None, None)
    }

    fn run_head(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.head(x)
    }
}

impl<B: Backend> CausalLm<B> for Gpt2<B> {
    fn device(&self) -> B::Device {
        self.wte.weight.device()
    }

    fn forward_logits(&self, input: ModelInput<'_, B>) -> Tensor<B, 3> {
        self.run(input)
    }
}

impl<B: Backend> PeftModel<B> for Gpt2<B> {
    /// Logits `[b, t, vocab]`.
    type Output = Tensor<B, 3>;

    fn run(&self, input: ModelInput<'_, B>) -> Tensor<B, 3> {
        let p = input.prepare(self.h.len(), |ids| self.wte.forward(ids));
        let (t, device) = (p.embeds.dims()[1], p.embeds.device());
        let starts = p.starts();
        let pads = p.left_padding.as_deref();
        let mask = decoder_mask::<B>(t, p.past, p.attention_mask, pads, &device);
        self.run_blocks(p.embeds, &starts, mask, p.cache, p.hook)
    }

    fn dims(&self) -> ModelDims {
        let c = &self.config;
        ModelDims {
            layers: self.h.len(),
            d_model: c.n_embd,
            vocab_size: c.vocab_size,
            kv_heads: c.n_head,
            head_dim: c.n_embd / c.n_head,
        }
    }

    fn embed_tokens(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.wte.forward(ids)
    }

    fn hook_path(&self, point: InsertionPoint, layer: usize) -> String {
        let site = match point {
            AfterAttention => "attention_adapters",
            AfterFeedForward => "output_adapters",
        };
        format!("{}h.{layer}.{site}", self.prefix)
    }

    fn visit_linears(&self, f: &mut dyn FnMut(&str, &LinearSlot<B>)) {
        for (i, blk) in self.h.iter().enumerate() {
            let p = format!("{}h.{i}", self.prefix);
            f(&format!("{p}.attn.c_attn"), &blk.c_attn);
            f(&format!("{p}.attn.c_proj"), &blk.attn_c_proj);
            f(&format!("{p}.mlp.c_fc"), &blk.c_fc);
            f(&format!("{p}.mlp.c_proj"), &blk.mlp_c_proj);
        }
        if let Some(s) = &self.score {
            f("score", s);
        }
    }

    fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&str, &mut LinearSlot<B>)) {
        for (i, blk) in self.h.iter_mut().enumerate() {
            let p = format!("{}h.{i}", self.prefix);
            f(&format!("{p}.attn.c_attn"), &mut blk.c_attn);
            f(&format!("{p}.attn.c_proj"), &mut blk.attn_c_proj);
            f(&format!("{p}.mlp.c_fc"), &mut blk.c_fc);
            f(&format!("{p}.mlp.c_proj"), &mut blk.mlp_c_proj);
        }
        if let Some(s) = &mut self.score {
            f("score", s);
        }
    }

    fn visit_norms(&self, f: &mut dyn FnMut(&str, &NormSlot<B>)) {
        for (i, blk) in self.h.iter().enumerate() {
            let p = format!("{}h.{i}", self.prefix);
            f(&format!("{p}.ln_1"), &blk.ln_1.slot);
            f(&format!("{p}.ln_2"), &blk.ln_2.slot);
        }
        f(&format!("{}ln_f", self.prefix), &self.ln_f.slot);
    }

    fn visit_norms_mut(&mut self, f: &mut dyn FnMut(&str, &mut NormSlot<B>)) {
        for (i, blk) in self.h.iter_mut().enumerate() {
            let p = format!("{}h.{i}", self.prefix);
            f(&format!("{p}.ln_1"), &mut blk.ln_1.slot);
            f(&format!("{p}.ln_2"), &mut blk.ln_2.slot);
        }
        f(&format!("{}ln_f", self.prefix), &mut self.ln_f.slot);
    }

    fn visit_embeddings(&self, f: &mut dyn FnMut(&str, &EmbeddingSlot<B>)) {
        f(&format!("{}wte", self.prefix), &self.wte);
    }

    fn visit_embeddings_mut(&mut self, f: &mut dyn FnMut(&str, &mut EmbeddingSlot<B>)) {
        f(&format!("{}wte", self.prefix), &mut self.wte);
    }

    /// `lm_head` of `GPT2LMHeadModel`, which is `wte`'s table.
    fn tied_head_path(&self) -> Option<&str> {
        (self.score.is_none() && !self.prefix.is_empty()).then_some("lm_head")
    }

    fn model_type(&self) -> Option<&str> {
        Some("gpt2")
    }

    fn output_layers(&self) -> Vec<String> {
        vec!["lm_head".into(), "score".into()]
    }
}
