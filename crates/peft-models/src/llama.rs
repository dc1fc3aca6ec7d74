//! Llama family (`LlamaForCausalLM`): RoPE, grouped-query attention,
//! RMSNorm, SwiGLU feed-forward, tied or untied output head.

use std::path::Path;
use std::sync::Arc;

use crate::attention::Hook;
use burn::module::{Module, Param};
use burn::nn::EmbeddingConfig;
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use peft_core::layered::LayeredModel;
use peft_core::model::InsertionPoint::{AfterAttention, AfterFeedForward};
use peft_core::model::{join, InsertionPoint, ResidualHook};
use peft_core::quant::QuantizedMatrix;
use peft_core::slot::LinearSlotConfig;
use peft_core::{
    EmbeddingSlot, LinearSlot, ModelDims, ModelInput, NormSlot, PeftError, PeftModel, Result,
};
use serde::Deserialize;

use crate::activation::swiglu;
use crate::attention::{attend, decoder_mask, split_heads, tied_head};
use crate::checkpoint::{check_dims, read_config, Checkpoint};
use crate::generate::{CausalLm, KvCache, LayerCache};
use crate::gguf::{Gguf, MetaValue};
use crate::norm::RmsNorm;
use peft_core::io::HostTensor;

/// RoPE settings as transformers ≥ 5 writes them.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct RopeParameters {
    /// Base of the rotary frequencies.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Only `default` is supported.
    #[serde(default = "default_rope_type")]
    pub rope_type: String,
}

fn default_theta() -> f64 {
    10_000.0
}
fn default_rope_type() -> String {
    "default".into()
}

/// The fields of a Llama `config.json` this model uses.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct LlamaConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); defaults to the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base in transformers < 5.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// RoPE settings in transformers ≥ 5.
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    /// Whether `lm_head` shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v/o.
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the feed-forward projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// The padding token: `LlamaForSequenceClassification` classifies each
    /// row at its last token that is not this one.
    #[serde(default)]
    pub pad_token_id: Option<i64>,
}

fn default_eps() -> f64 {
    1e-6
}

impl LlamaConfig {
    /// Key/value heads (grouped-query attention), `num_attention_heads` when unset.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    fn theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .map(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10_000.0)
    }
    /// Checks what the loaders build from; `file` names the source.
    fn validate(&self, file: &Path) -> Result<()> {
        check_dims(
            file,
            &[
                ("vocab_size", self.vocab_size),
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
                ("num_hidden_layers", self.num_hidden_layers),
                ("num_attention_heads", self.num_attention_heads),
                ("num_key_value_heads", self.kv_heads()),
            ],
        )?;
        // After the heads are known non-zero: `head_dim` divides by them.
        let hd = self.head_dim();
        check_dims(file, &[("head_dim", hd)])?;
        if hd % 2 == 1 {
            return Err(PeftError::Config(format!(
                "{}: head_dim {hd} is odd (rotary embeddings rotate halves)",
                file.display()
            )));
        }
        if let Some(r) = &self.rope_parameters {
            if r.rope_type != "default" {
                return Err(PeftError::Config(format!(
                    "rope_type `{}` is not supported (only `default`)",
                    r.rope_type
                )));
            }
        }
        if self.num_attention_heads == 0
            || !self.num_attention_heads.is_multiple_of(self.kv_heads())
        {
            return Err(PeftError::Config(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            )));
        }
        Ok(())
    }
}

/// One decoder layer.
#[derive(Module, Debug)]
pub struct LlamaLayer<B: Backend> {
    /// RMSNorm before attention, `[d]`.
    pub input_layernorm: RmsNorm<B>,
    /// `[d, h·hd]`.
    pub q_proj: LinearSlot<B>,
    /// `[d, kv_h·hd]`.
    pub k_proj: LinearSlot<B>,
    /// `[d, kv_h·hd]`.
    pub v_proj: LinearSlot<B>,
    /// `[h·hd, d]`.
    pub o_proj: LinearSlot<B>,
    /// RMSNorm before the feed-forward block, `[d]`.
    pub post_attention_layernorm: RmsNorm<B>,
    /// `[d, ff]`.
    pub gate_proj: LinearSlot<B>,
    /// `[d, ff]`.
    pub up_proj: LinearSlot<B>,
    /// `[ff, d]`.
    pub down_proj: LinearSlot<B>,
}

/// `LlamaForCausalLM`.
#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    /// Token embeddings `[vocab, d]`, adaptable (`modules_to_save`,
    /// trainable tokens); an empty `[0, 0]` table, not offered to adapters,
    /// when [`embed_quantized`](Self::embed_quantized) holds them.
    pub embed_tokens: EmbeddingSlot<B>,
    /// The token embeddings kept quantized, `[vocab, d]`: a lookup
    /// dequantizes only the rows it returns. With tied embeddings the output
    /// head shares this matrix (`lm_head` is then a quantized slot over it).
    #[module(skip)]
    pub embed_quantized: Option<Arc<QuantizedMatrix>>,
    /// Decoder layers.
    pub layers: Vec<LlamaLayer<B>>,
    /// Final RMSNorm `[d]`.
    pub norm: RmsNorm<B>,
    /// Output head `[d, vocab]`; `None` when tied to `embed_tokens`.
    pub lm_head: Option<LinearSlot<B>>,
    /// `score` `[d, num_labels]` (no bias) of `LlamaForSequenceClassification`:
    /// when present it is the output head, giving class logits at every
    /// position (`seq_cls.rs` picks each row's last real token).
    pub score: Option<LinearSlot<B>>,
    /// The model's configuration.
    #[module(skip)]
    pub config: LlamaConfig,
}

/// RoPE's `cos`, `sin` tables, `[n, 1, t, head_dim]`: row `i` for positions
/// `starts[i]..starts[i] + t` (`n = starts.len()`; one entry serves every
/// batch row). Hugging Face's "rotate half" layout: frequencies repeated
/// twice.
type Rope<B> = (Tensor<B, 4>, Tensor<B, 4>);

fn rope_tables<B: Backend>(
    t: usize,
    starts: &[usize],
    head_dim: usize,
    theta: f64,
    device: &B::Device,
) -> Rope<B> {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
        .collect();
    let n = starts.len();
    let mut cos = Vec::with_capacity(n * t * head_dim);
    let mut sin = Vec::with_capacity(n * t * head_dim);
    for p in starts.iter().flat_map(|&s| s..s + t) {
        for j in 0..head_dim {
            let angle = p as f32 * inv_freq[j % half];
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    (
        Tensor::from_data(TensorData::new(cos, [n, 1, t, head_dim]), device),
        Tensor::from_data(TensorData::new(sin, [n, 1, t, head_dim]), device),
    )
}

/// `x·cos + rotate_half(x)·sin` for `x: [b, h, t, hd]`.
fn apply_rope<B: Backend>(x: Tensor<B, 4>, (cos, sin): &Rope<B>) -> Tensor<B, 4> {
    let [b, h, t, d] = x.dims();
    let x1 = x.clone().slice([0..b, 0..h, 0..t, 0..d / 2]);
    let x2 = x.clone().slice([0..b, 0..h, 0..t, d / 2..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone() + rotated * sin.clone()
}

impl<B: Backend> LlamaLayer<B> {
    fn forward(
        &self,
        x: Tensor<B, 3>,
        config: &LlamaConfig,
        rope: &Rope<B>,
        mask: &Tensor<B, 4>,
        cache: Option<&mut LayerCache<B>>,
        hook: Hook<'_, B>,
    ) -> Tensor<B, 3> {
        let h = self.input_layernorm.forward(x.clone());
        let q = split_heads(self.q_proj.forward(h.clone()), config.num_attention_heads);
        let k = split_heads(self.k_proj.forward(h.clone()), config.kv_heads());
        let v = split_heads(self.v_proj.forward(h), config.kv_heads());
        let q = apply_rope(q, rope);
        let k = apply_rope(k, rope);
        let (k, v) = LayerCache::append_to(cache, k, v);
        let attn = attend(q, k, v, Some(mask.clone()));
        let (hook, i) = (hook.map(|h| h.0), hook.map_or(0, |h| h.1));
        let x = join(hook, AfterAttention, i, self.o_proj.forward(attn), x, None);
        let h = self.post_attention_layernorm.forward(x.clone());
        let ff = swiglu(self.gate_proj.forward(h.clone()), self.up_proj.forward(h));
        join(
            hook,
            AfterFeedForward,
            i,
            self.down_proj.forward(ff),
            x,
            None,
        )
    }
}

impl LlamaConfig {
    /// A config with the given sizes and Llama's defaults elsewhere.
    pub fn new(
        vocab: usize,
        hidden: usize,
        intermediate: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
    ) -> Self {
        LlamaConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: intermediate,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv_heads),
            head_dim: None,
            rms_norm_eps: 1e-5,
            rope_theta: None,
            rope_parameters: None,
            tie_word_embeddings: true,
            attention_bias: false,
            mlp_bias: false,
            pad_token_id: None,
        }
    }

    /// A randomly initialised model (frozen, like a loaded one), for tests
    /// and benchmarks.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<Llama<B>> {
        self.validate(Path::new("LlamaConfig"))?;
        let (d, ff) = (self.hidden_size, self.intermediate_size);
        let (qd, kvd) = (
            self.num_attention_heads * self.head_dim(),
            self.kv_heads() * self.head_dim(),
        );
        let slot = |i, o, bias| {
            LinearSlotConfig::new(i, o)
                .with_bias(bias)
                .init::<B>(device)
        };
        let norm = || RmsNorm::new(d, self.rms_norm_eps, device);
        let (ab, mb) = (self.attention_bias, self.mlp_bias);
        let layers = (0..self.num_hidden_layers)
            .map(|_| LlamaLayer {
                input_layernorm: norm(),
                q_proj: slot(d, qd, ab),
                k_proj: slot(d, kvd, ab),
                v_proj: slot(d, kvd, ab),
                o_proj: slot(qd, d, ab),
                post_attention_layernorm: norm(),
                gate_proj: slot(d, ff, mb),
                up_proj: slot(d, ff, mb),
                down_proj: slot(ff, d, mb),
            })
            .collect();
        Ok(Llama {
            embed_tokens: EmbeddingSlot::new(
                EmbeddingConfig::new(self.vocab_size, d)
                    .init(device)
                    .weight
                    .val(),
            ),
            layers,
            norm: norm(),
            lm_head: (!self.tie_word_embeddings).then(|| slot(d, self.vocab_size, false)),
            score: None,
            embed_quantized: None,
            config: self.clone(),
        }
        .no_grad())
    }
}

impl<B: Backend> Llama<B> {
    /// Loads `config.json` + `model.safetensors` from a Hugging Face directory.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        Checkpoint::<B>::check_model_type(dir, &["llama"])?;
        let config: LlamaConfig = read_config(dir)?;
        config.validate(&dir.join("config.json"))?;
        let mut ck = Checkpoint::<B>::open(dir, device)?;
        let (d, ff) = (config.hidden_size, config.intermediate_size);
        let (qd, kvd) = (
            config.num_attention_heads * config.head_dim(),
            config.kv_heads() * config.head_dim(),
        );
        let (ab, mb) = (config.attention_bias, config.mlp_bias);
        // Not `with_capacity`: the layer count is what a file claims.
        let mut layers = Vec::new();
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(LlamaLayer {
                input_layernorm: ck.rms_norm(
                    &format!("{p}.input_layernorm"),
                    d,
                    config.rms_norm_eps,
                )?,
                q_proj: ck.linear(&format!("{p}.self_attn.q_proj"), d, qd, ab)?,
                k_proj: ck.linear(&format!("{p}.self_attn.k_proj"), d, kvd, ab)?,
                v_proj: ck.linear(&format!("{p}.self_attn.v_proj"), d, kvd, ab)?,
                o_proj: ck.linear(&format!("{p}.self_attn.o_proj"), qd, d, ab)?,
                post_attention_layernorm: ck.rms_norm(
                    &format!("{p}.post_attention_layernorm"),
                    d,
                    config.rms_norm_eps,
                )?,
                gate_proj: ck.linear(&format!("{p}.mlp.gate_proj"), d, ff, mb)?,
                up_proj: ck.linear(&format!("{p}.mlp.up_proj"), d, ff, mb)?,
                down_proj: ck.linear(&format!("{p}.mlp.down_proj"), ff, d, mb)?,
            });
        }
        let embed_tokens = ck.embedding_slot("model.embed_tokens.weight", config.vocab_size, d)?;
        let norm = ck.rms_norm("model.norm", d, config.rms_norm_eps)?;
        // `LlamaForSequenceClassification` has `score` in place of `lm_head`.
        let score = ck.optional_head("score", d, false)?;
        let tied = config.tie_word_embeddings || score.is_some();
        let lm_head = if tied && !ck.contains("lm_head.weight") {
            None
        } else {
            Some(ck.linear("lm_head", d, config.vocab_size, false)?)
        };
        ck.finish()?;
        Ok(Llama {
            embed_tokens,
            embed_quantized: None,
            layers,
            norm,
            lm_head,
            score,
            config,
        })
    }

    /// Logits `[b, t, vocab]` for `ids: [b, t]`; `attention_mask: [b, t]`
    /// (1 = token, 0 = padding) when the batch is padded.
    pub fn forward(
        &self,
        ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2>>,
    ) -> Tensor<B, 3> {
        self.run(ModelInput::ids(ids).mask(attention_mask))
    }

    /// Logits `[b, t, vocab]` for the next `t` tokens after those already in
    /// `cache`, whose keys/values are extended in place. Positions continue
    /// from the cache length.
    pub fn forward_cached(&self, ids: Tensor<B, 2, Int>, cache: &mut KvCache<B>) -> Tensor<B, 3> {
        self.run(ModelInput::ids(ids).cache(cache))
    }

    fn run_layers(
        &self,
        mut x: Tensor<B, 3>,
        starts: &[usize],
        mask: Tensor<B, 4>,
        mut cache: Option<&mut KvCache<B>>,
        hook: Option<&dyn ResidualHook<B>>,
    ) -> Tensor<B, 3> {
        let t = x.dims()[1];
        let rope = rope_tables(
            t,
            starts,
            self.config.head_dim(),
            self.config.theta(),
            &x.device(),
        );
        for (i, layer) in self.layers.iter().enumerate() {
            let c = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(x, &self.config, &rope, &mask, c, hook.map(|h| (h, i)));
        }
        self.head(x)
    }

    /// Final norm and output head: logits `[b, t, vocab]` of the last
    /// hidden states `[b, t, d]`.
    fn head(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self.norm.forward(x);
        if let Some(score) = &self.score {
            return score.forward(h);
        }
        match &self.lm_head {
            Some(head) => head.forward(h),
            None => self.embed_tokens.tied_head(h, tied_head),
        }
    }

    /// Token embeddings `[b, t, d]` of `ids: [b, t]`. Token ids are checked
    /// by the tokenizer; an id past the vocabulary of a quantized table is
    /// read as the last row rather than aborting a batch.
    pub fn embed(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let Some(table) = &self.embed_quantized else {
            return self.embed_tokens.forward(ids);
        };
        let [b, t] = ids.dims();
        let device = ids.device();
        let rows: Vec<usize> = ids
            .into_data()
            .convert::<i64>()
            .into_vec::<i64>()
            .expect("ids convert to i64")
            .into_iter()
            .map(|i| (i.max(0) as usize).min(table.rows - 1))
            .collect();
        let values = table.gather_rows(&rows).expect("rows clamped to the table");
        Tensor::from_data(TensorData::new(values, [b, t, table.cols]), &device)
    }

    /// Parameters held quantized outside the linear slots (a quantized
    /// embedding table that no slot shares).
    fn unshared_quantized_params(&self) -> usize {
        match (&self.embed_quantized, &self.lm_head) {
            (Some(e), Some(h)) if h.quantized.as_ref().is_some_and(|q| Arc::ptr_eq(q, e)) => 0,
            (Some(e), _) => e.len(),
            _ => 0,
        }
    }
}

impl<B: Backend> LayeredModel<B> for Llama<B> {
    /// RoPE tables and the attention mask.
    type Context = (Rope<B>, Tensor<B, 4>);

    fn layer_input(
        &self,
        ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2>>,
    ) -> (Tensor<B, 3>, Self::Context) {
        let device = ids.device();
        let t = ids.dims()[1];
        let mask = decoder_mask::<B>(t, 0, attention_mask, None, &device);
        let rope = rope_tables::<B>(
            t,
            &[0],
            self.config.head_dim(),
            self.config.theta(),
            &device,
        );
        (self.embed(ids), (rope, mask))
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn run_layer(&self, i: usize, x: Tensor<B, 3>, (rope, mask): &Self::Context) -> Tensor<B, 3> {
        self.layers[i].forward(x, &self.config, rope, mask, None, None)
    }

    fn run_head(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.head(x)
    }
}

impl<B: AutodiffBackend> Llama<B> {
    /// The loss of one batch and the gradients of every trainable parameter,
    /// computed one decoder layer at a time, so that a quantized base never
    /// has more than one layer's weights dequantized at once
    /// ([`peft_core::layered::loss_and_grads_by_layer`]). `loss` maps logits
    /// `[b, t, vocab]` to the scalar to differentiate.
    pub fn loss_and_grads_by_layer(
        &self,
        ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2>>,
        seed: u64,
        loss: impl FnOnce(Tensor<B, 3>) -> Tensor<B, 1>,
    ) -> (f64, GradientsParams) {
        peft_core::layered::loss_and_grads_by_layer(self, ids, attention_mask, seed, loss)
    }
}

impl<B: Backend> CausalLm<B> for Llama<B> {
    fn device(&self) -> B::Device {
        self.embed_tokens.weight.device()
    }

    fn forward_logits(&self, input: ModelInput<'_, B>) -> Tensor<B, 3> {
        self.run(input)
    }
}

impl<B: Backend> PeftModel<B> for Llama<B> {
    /// Logits `[b, t, vocab]`.
    type Output = Tensor<B, 3>;

    fn run(&self, input: ModelInput<'_, B>) -> Tensor<B, 3> {
        let p = input.prepare(self.layers.len(), |ids| self.embed(ids));
        let (t, device) = (p.embeds.dims()[1], p.embeds.device());
        let starts = p.starts();
        let pads = p.left_padding.as_deref();
        let mask = decoder_mask::<B>(t, p.past, p.attention_mask, pads, &device);
        self.run_layers(p.embeds, &starts, mask, p.cache, p.hook)
    }

    fn dims(&self) -> ModelDims {
        ModelDims {
            layers: self.layers.len(),
            d_model: self.config.hidden_size,
            vocab_size: self.config.vocab_size,
            kv_heads: self.config.kv_heads(),
            head_dim: self.config.head_dim(),
        }
    }

    fn embed_tokens(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.embed(ids)
    }

    fn hook_path(&self, point: InsertionPoint, layer: usize) -> String {
        let site = match point {
            AfterAttention => "attention_adapters",
            AfterFeedForward => "output_adapters",
        };
        format!("model.layers.{layer}.{site}")
    }

    fn param_count(&self) -> peft_core::ParamCount {
        let (mut trainable, mut quantized) = (0, self.unshared_quantized_params());
        self.visit_linears(&mut |_, s| {
            trainable += s.trainable_params();
            quantized += s.quantized_params();
        });
        self.visit_norms(&mut |_, s| trainable += s.trainable_params());
        self.visit_embeddings(&mut |_, s| trainable += s.trainable_params());
        peft_core::ParamCount {
            trainable,
            all: self.num_params() + quantized,
        }
    }

    fn visit_linears(&self, f: &mut dyn FnMut(&str, &LinearSlot<B>)) {
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            f(&format!("{p}.self_attn.q_proj"), &l.q_proj);
            f(&format!("{p}.self_attn.k_proj"), &l.k_proj);
            f(&format!("{p}.self_attn.v_proj"), &l.v_proj);
            f(&format!("{p}.self_attn.o_proj"), &l.o_proj);
            f(&format!("{p}.mlp.gate_proj"), &l.gate_proj);
            f(&format!("{p}.mlp.up_proj"), &l.up_proj);
            f(&format!("{p}.mlp.down_proj"), &l.down_proj);
        }
        if let Some(h) = &self.lm_head {
            f("lm_head", h);
        }
        if let Some(s) = &self.score {
            f("score", s);
        }
    }

    fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&str, &mut LinearSlot<B>)) {
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            f(&format!("{p}.self_attn.q_proj"), &mut l.q_proj);
            f(&format!("{p}.self_attn.k_proj"), &mut l.k_proj);
            f(&format!("{p}.self_attn.v_proj"), &mut l.v_proj);
            f(&format!("{p}.self_attn.o_proj"), &mut l.o_proj);
            f(&format!("{p}.mlp.gate_proj"), &mut l.gate_proj);
            f(&format!("{p}.mlp.up_proj"), &mut l.up_proj);
            f(&format!("{p}.mlp.down_proj"), &mut l.down_proj);
        }
        if let Some(h) = &mut self.lm_head {
            f("lm_head", h);
        }
        if let Some(s) = &mut self.score {
            f("score", s);
        }
    }

    fn visit_norms(&self, f: &mut dyn FnMut(&str, &NormSlot<B>)) {
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            f(&format!("{p}.input_layernorm"), &l.input_layernorm.slot);
            f(
                &format!("{p}.post_attention_layernorm"),
                &l.post_attention_layernorm.slot,
            );
        }
        f("model.norm", &self.norm.slot);
    }

    fn visit_norms_mut(&mut self, f: &mut dyn FnMut(&str, &mut NormSlot<B>)) {
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            f(&format!("{p}.input_layernorm"), &mut l.input_layernorm.slot);
            f(
                &format!("{p}.post_attention_layernorm"),
                &mut l.post_attention_layernorm.slot,
            );
        }
        f("model.norm", &mut self.norm.slot);
    }

    /// The token table, unless it is kept quantized (no copy of it can be
    /// made then).
    fn visit_embeddings(&self, f: &mut dyn FnMut(&str, &EmbeddingSlot<B>)) {
        if self.embed_quantized.is_none() {
            f("model.embed_tokens", &self.embed_tokens);
        }
    }

    fn visit_embeddings_mut(&mut self, f: &mut dyn FnMut(&str, &mut EmbeddingSlot<B>)) {
        if self.embed_quantized.is_none() {
            f("model.embed_tokens", &mut self.embed_tokens);
        }
    }

    /// `lm_head`, when it is the embedding table (a causal LM with tied
    /// embeddings).
    fn tied_head_path(&self) -> Option<&str> {
        (self.lm_head.is_none() && self.score.is_none()).then_some("lm_head")
    }

    fn model_type(&self) -> Option<&str> {
        Some("llama")
    }

    fn output_layers(&self) -> Vec<String> {
        vec!["lm_head".into(), "score".into()]
    }
}

/// Undoes llama.cpp's q/k row permutation (`convert_hf_to_gguf.permute`),
/// giving back the Hugging Face layout of `w: [heads·head_dim, in]`.
fn unpermute_rows(w: &HostTensor, heads: usize) -> HostTensor {
    let (rows, cols) = (w.shape[0], w.shape[1]);
    let data = unpermuted_sources(rows, heads)
        .into_iter()
        .flat_map(|gguf| w.data[gguf * cols..(gguf + 1) * cols].iter().copied())
        .collect();
    HostTensor {
        shape: w.shape.clone(),
        data,
    }
}

/// For llama.cpp's q/k permutation of `rows = heads·head_dim` rows: the
/// GGUF row that holds each Hugging Face row (see [`unpermute_rows`]).
fn unpermuted_sources(rows: usize, heads: usize) -> Vec<usize> {
    let hd = rows / heads;
    let mut source = vec![0; rows];
    for h in 0..heads {
        for a in 0..2 {
            for b in 0..hd / 2 {
                source[h * hd + a * (hd / 2) + b] = h * hd + 2 * b + a;
            }
        }
    }
    source
}

impl<B: Backend> Llama<B> {
    /// Loads a llama.cpp GGUF file (architecture `llama`), dequantising every
    /// tensor to `f32` one at a time and undoing the q/k permutation, so the
    /// result equals the Hugging Face model.
    pub fn from_gguf(path: &Path, device: &B::Device) -> Result<Self> {
        Self::read_gguf(path, device, false)
    }

    /// Loads a GGUF file keeping the matrices quantized as the file stores
    /// them (QLoRA): every linear layer's weight and the token embeddings
    /// stay in their GGML blocks (the q/k permutation is undone by moving
    /// whole rows of blocks), and only the norms are `f32`. Forward passes
    /// give the same numbers as [`from_gguf`](Self::from_gguf), which
    /// dequantizes with the same code. With tied embeddings the output head
    /// is a quantized slot sharing the embedding table.
    pub fn from_gguf_quantized(path: &Path, device: &B::Device) -> Result<Self> {
        Self::read_gguf(path, device, true)
    }

    fn read_gguf(path: &Path, device: &B::Device, keep_quantized: bool) -> Result<Self> {
        let g = Gguf::open(path)?;
        let arch = g.meta("general.architecture")?.as_str().unwrap_or("");
        if arch != "llama" {
            return Err(PeftError::Config(format!(
                "{}: architecture `{arch}` is not supported (llama)",
                path.display()
            )));
        }
        let u = |k: &str| g.meta_u64(&format!("llama.{k}")).map(|v| v as usize);
        let embd = g
            .info("token_embd.weight")
            .ok_or_else(|| PeftError::MissingTensor {
                path: path.into(),
                key: "token_embd.weight".into(),
            })?;
        let vocab = embd.shape()[0];
        let f = |k: &str, default: f64| {
            g.metadata
                .get(&format!("llama.{k}"))
                .and_then(MetaValue::as_f64)
                .unwrap_or(default)
        };
        let config = LlamaConfig {
            vocab_size: vocab,
            hidden_size: u("embedding_length")?,
            intermediate_size: u("feed_forward_length")?,
            num_hidden_layers: u("block_count")?,
            num_attention_heads: u("attention.head_count")?,
            num_key_value_heads: Some(u("attention.head_count_kv")?),
            head_dim: None,
            rms_norm_eps: f("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta: Some(f("rope.freq_base", 10_000.0)),
            rope_parameters: None,
            tie_word_embeddings: g.info("output.weight").is_none(),
            attention_bias: false,
            mlp_bias: false,
            pad_token_id: None,
        };
        config.validate(path)?;
        let (d, ff) = (config.hidden_size, config.intermediate_size);
        let (heads, kv) = (config.num_attention_heads, config.kv_heads());
        let hd = config.head_dim();
        let param = |name: &str, shape: Vec<usize>| -> Result<HostTensor> {
            let t = g.tensor(name)?;
            if t.shape != shape {
                return Err(PeftError::Shape {
                    name: name.into(),
                    expected: shape,
                    found: t.shape,
                });
            }
            Ok(t)
        };
        // GGUF matrices are `[out, in]` row-major, like PyTorch's.
        let quantized = |name: &str, rows: usize, cols: usize| -> Result<QuantizedMatrix> {
            let (info, bytes, _) = g.raw(name)?;
            if info.shape() != [rows, cols] {
                return Err(PeftError::Shape {
                    name: name.into(),
                    expected: vec![rows, cols],
                    found: info.shape(),
                });
            }
            QuantizedMatrix::from_ggml(info.ggml_type, rows, cols, bytes.to_vec()).map_err(|e| {
                PeftError::Checkpoint {
                    path: path.into(),
                    message: format!("tensor `{name}`: {e}"),
                }
            })
        };
        let slot = |name: &str,
                    d_in: usize,
                    d_out: usize,
                    permute: Option<usize>|
         -> Result<LinearSlot<B>> {
            if keep_quantized {
                let mut q = quantized(name, d_out, d_in)?;
                if let Some(h) = permute {
                    q = q.permute_rows(&unpermuted_sources(d_out, h))?;
                }
                return LinearSlot::from_quantized(Arc::new(q), None, device);
            }
            let mut w = param(name, vec![d_out, d_in])?;
            if let Some(h) = permute {
                w = unpermute_rows(&w, h);
            }
            let w = w.transposed().to_tensor([d_in, d_out], name, device)?;
            Ok(LinearSlot::from_weights(w, None))
        };
        let norm = |name: &str| -> Result<RmsNorm<B>> {
            let gamma = param(name, vec![d])?.to_tensor([d], name, device)?;
            Ok(RmsNorm::from_params(gamma, config.rms_norm_eps))
        };
        // Not `with_capacity`: the layer count is what a file claims.
        let mut layers = Vec::new();
        for i in 0..config.num_hidden_layers {
            let p = format!("blk.{i}");
            layers.push(LlamaLayer {
                input_layernorm: norm(&format!("{p}.attn_norm.weight"))?,
                q_proj: slot(&format!("{p}.attn_q.weight"), d, heads * hd, Some(heads))?,
                k_proj: slot(&format!("{p}.attn_k.weight"), d, kv * hd, Some(kv))?,
                v_proj: slot(&format!("{p}.attn_v.weight"), d, kv * hd, None)?,
                o_proj: slot(&format!("{p}.attn_output.weight"), heads * hd, d, None)?,
                post_attention_layernorm: norm(&format!("{p}.ffn_norm.weight"))?,
                gate_proj: slot(&format!("{p}.ffn_gate.weight"), d, ff, None)?,
                up_proj: slot(&format!("{p}.ffn_up.weight"), d, ff, None)?,
                down_proj: slot(&format!("{p}.ffn_down.weight"), ff, d, None)?,
            });
        }
        let (embed_tokens, embed_quantized) = if keep_quantized {
            let table = Arc::new(quantized("token_embd.weight", vocab, d)?);
            let empty = TensorData::new(Vec::<f32>::new(), [0, 0]);
            let weight = Param::from_tensor(Tensor::from_data(empty, device));
            (EmbeddingSlot::new(weight.val()), Some(table))
        } else {
            let embed = param("token_embd.weight", vec![vocab, d])?;
            let weight = embed.to_tensor([vocab, d], "token_embd.weight", device)?;
            (EmbeddingSlot::new(weight), None)
        };
        let lm_head = match (&embed_quantized, config.tie_word_embeddings) {
            (_, false) => Some(slot("output.weight", d, vocab, None)?),
            (Some(table), true) => Some(LinearSlot::from_quantized(table.clone(), None, device)?),
            (None, true) => None,
        };
        Ok(Llama {
            embed_tokens,
            embed_quantized,
            layers,
            norm: norm("output_norm.weight")?,
            lm_head,
            score: None,
            config,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: reshape(heads, 2, hd/2, in).swapaxes(1, 2)
        let (heads, hd, cols) = (2, 4, 1);
        let hf: Vec<f32> = (0..heads * hd).map(|i| i as f32).collect();
        let mut gguf = vec![0.0; hf.len()];
        for h in 0..heads {
            for a in 0..2 {
                for b in 0..hd / 2 {
                    gguf[h * hd + 2 * b + a] = hf[h * hd + a * (hd / 2) + b];
                }
            }
        }
        let w = HostTensor {
            shape: vec![heads * hd, cols],
            data: gguf,
        };
        assert_eq!(unpermute_rows(&w, heads).data, hf);
    }
}
