//! BERT (`BertModel`, `BertForSequenceClassification`), post-LayerNorm
//! encoder with exact (erf) GELU.

use std::path::Path;

use crate::attention::Hook;
use burn::module::Module;
use burn::nn::Embedding;

use crate::norm::LayerNorm;
use burn::tensor::activation::{gelu, tanh};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use peft_core::model::InsertionPoint::{AfterAttention, AfterFeedForward};
use peft_core::model::{join, InsertionPoint, ResidualHook};
use peft_core::{
    EmbeddingSlot, LinearSlot, ModelDims, ModelInput, NormSlot, PeftError, PeftModel, Result,
};
use serde::Deserialize;

use crate::attention::{attend, attend_real, padding_mask, positions, split_heads};
use crate::checkpoint::{check_dims, check_heads, read_config, Checkpoint};
use crate::packing::Packing;
use crate::seq_cls::task_head;
use peft_core::kv::{KvCache, LayerCache};

/// The fields of a BERT `config.json` this model uses.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// Maximum sequence length.
    pub max_position_embeddings: usize,
    /// Token-type vocabulary.
    #[serde(default = "default_types")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Only `gelu` (exact) is supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_types() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}

/// One encoder layer (Hugging Face names in the field docs).
#[derive(Module, Debug)]
pub struct BertLayer<B: Backend> {
    /// `attention.self.query` `[d, d]`.
    pub query: LinearSlot<B>,
    /// `attention.self.key` `[d, d]`.
    pub key: LinearSlot<B>,
    /// `attention.self.value` `[d, d]`.
    pub value: LinearSlot<B>,
    /// `attention.output.dense` `[d, d]`.
    pub attention_output: LinearSlot<B>,
    /// `attention.output.LayerNorm`.
    pub attention_norm: LayerNorm<B>,
    /// `intermediate.dense` `[d, ff]`.
    pub intermediate: LinearSlot<B>,
    /// `output.dense` `[ff, d]`.
    pub output: LinearSlot<B>,
    /// `output.LayerNorm`.
    pub output_norm: LayerNorm<B>,
}

/// A BERT encoder, with the classification head when the checkpoint has one.
#[derive(Module, Debug)]
pub struct Bert<B: Backend> {
    /// `embeddings.word_embeddings` `[vocab, d]`.
    /// Adaptable (`modules_to_save`, trainable tokens).
    pub word_embeddings: EmbeddingSlot<B>,
    /// `embeddings.position_embeddings` `[max_pos, d]`.
    pub position_embeddings: Embedding<B>,
    /// `embeddings.token_type_embeddings` `[types, d]`.
    pub token_type_embeddings: Embedding<B>,
    /// `embeddings.LayerNorm`.
    pub embeddings_norm: LayerNorm<B>,
    /// Encoder layers.
    pub layers: Vec<BertLayer<B>>,
    /// `pooler.dense` `[d, d]` (tanh on the first token), if the checkpoint has one.
    pub pooler: Option<LinearSlot<B>>,
    /// `classifier` `[d, num_labels]` of `BertForSequenceClassification`, if present.
    pub classifier: Option<LinearSlot<B>>,
    /// The configuration.
    #[module(skip)]
    pub config: BertConfig,
    /// Module-path prefix of the encoder: `bert.` in task models, empty in `BertModel`.
    #[module(skip)]
    pub prefix: String,
}

impl<B: Backend> BertLayer<B> {
    fn forward(
        &self,
        x: Tensor<B, 3>,
        heads: usize,
        mask: Option<&Tensor<B, 4>>,
        packing: Option<&Packing<B>>,
        prefix: Option<&mut LayerCache<B>>,
        hook: Hook<'_, B>,
    ) -> Tensor<B, 3> {
        // `x` is `[b, t, d]`, or the real tokens `[1, n, d]` under a
        // packing: attention alone needs the padded layout.
        let heads_of = |y: Tensor<B, 3>| match packing {
            Some(p) => split_heads(p.spread(y), heads),
            None => split_heads(y, heads),
        };
        let q = heads_of(self.query.forward(x.clone()));
        let k = heads_of(self.key.forward(x.clone()));
        let v = heads_of(self.value.forward(x.clone()));
        let (k, v) = LayerCache::append_to(prefix, k, v);
        // Under a packing only the real queries' outputs are kept: with
        // right padding, attention computes no others.
        let a = match (packing, packing.and_then(Packing::lengths)) {
            (Some(p), Some(real)) => p.pack(attend_real(q, k, v, mask.cloned(), real)),
            (Some(p), None) => p.pack(attend(q, k, v, mask.cloned())),
            (None, _) => attend(q, k, v, mask.cloned()),
        };
        let a = self.attention_output.forward(a);
        let (hook, i) = (hook.map(|h| h.0), hook.map_or(0, |h| h.1));
        let norm = |t| self.attention_norm.forward(t);
        let x = join(hook, AfterAttention, i, a, x, Some(&norm));
        let h = gelu(self.intermediate.forward(x.clone()));
        let norm = |t| self.output_norm.forward(t);
        join(
            hook,
            AfterFeedForward,
            i,
            self.output.forward(h),
            x,
            Some(&norm),
        )
    }
}

impl<B: Backend> Bert<B> {
    /// Loads `config.json` + `model.safetensors` from a Hugging Face directory.
    /// `BertForSequenceClassification` checkpoints (keys under `bert.` plus
    /// `classifier`) load with their head.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        Checkpoint::<B>::check_model_type(dir, &["bert"])?;
        let config: BertConfig = read_config(dir)?;
        let file = dir.join("config.json");
        check_dims(
            &file,
            &[
                ("vocab_size", config.vocab_size),
                ("hidden_size", config.hidden_size),
                ("num_hidden_layers", config.num_hidden_layers),
                ("num_attention_heads", config.num_attention_heads),
                ("intermediate_size", config.intermediate_size),
                ("max_position_embeddings", config.max_position_embeddings),
                ("type_vocab_size", config.type_vocab_size),
            ],
        )?;
        check_heads(
            &file,
            ("hidden_size", config.hidden_size),
            ("num_attention_heads", config.num_attention_heads),
        )?;
        if config.hidden_act != "gelu" {
            return Err(PeftError::Config(format!(
                "hidden_act `{}` is not supported (gelu)",
                config.hidden_act
            )));
        }
        let mut ck = Checkpoint::<B>::open(dir, device)?;
        let prefix = if ck.has_prefix("bert.") { "bert." } else { "" }.to_string();
        let (d, ff, eps) = (
            config.hidden_size,
            config.intermediate_size,
            config.layer_norm_eps,
        );
        let e = format!("{prefix}embeddings");
        let word_embeddings =
            ck.embedding_slot(&format!("{e}.word_embeddings.weight"), config.vocab_size, d)?;
        let position_embeddings = ck.embedding(
            &format!("{e}.position_embeddings.weight"),
            config.max_position_embeddings,
            d,
        )?;
        let token_type_embeddings = ck.embedding(
            &format!("{e}.token_type_embeddings.weight"),
            config.type_vocab_size,
            d,
        )?;
        let embeddings_norm = ck.layer_norm(&format!("{e}.LayerNorm"), d, eps)?;
        // Not `with_capacity`: the layer count is what a file claims.
        let mut layers = Vec::new();
        for i in 0..config.num_hidden_layers {
            let p = format!("{prefix}encoder.layer.{i}");
            layers.push(BertLayer {
                query: ck.linear(&format!("{p}.attention.self.query"), d, d, true)?,
                key: ck.linear(&format!("{p}.attention.self.key"), d, d, true)?,
                value: ck.linear(&format!("{p}.attention.self.value"), d, d, true)?,
                attention_output: ck.linear(&format!("{p}.attention.output.dense"), d, d, true)?,
                attention_norm: ck.layer_norm(
                    &format!("{p}.attention.output.LayerNorm"),
                    d,
                    eps,
                )?,
                intermediate: ck.linear(&format!("{p}.intermediate.dense"), d, ff, true)?,
                output: ck.linear(&format!("{p}.output.dense"), ff, d, true)?,
                output_norm: ck.layer_norm(&format!("{p}.output.LayerNorm"), d, eps)?,
            });
        }
        let pooler_key = format!("{prefix}pooler.dense");
        let pooler = if ck.contains(&format!("{pooler_key}.weight")) {
            Some(ck.linear(&pooler_key, d, d, true)?)
        } else {
            None
        };
        let classifier = ck.optional_head("classifier", d, true)?;
        ck.finish()?;
        Ok(Bert {
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            embeddings_norm,
            layers,
            pooler,
            classifier,
            config,
            prefix,
        })
    }

    /// Last hidden states `[b, t, d]` for `ids: [b, t]` (token type 0);
    /// `attention_mask: [b, t]` with 1 for tokens, 0 for padding.
    pub fn encode(
        &self,
        ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2>>,
    ) -> Tensor<B, 3> {
        self.run(ModelInput::ids(ids).mask(attention_mask))
    }

    /// Sentence embeddings as sentence-transformers computes them: the mean
    /// of the last hidden states over real tokens, `[b, d]`; L2-normalised
    /// when `normalize`.
    pub fn mean_pooled(
        &self,
        ids: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2>,
        normalize: bool,
    ) -> Tensor<B, 2> {
        let h = self.encode(ids, Some(attention_mask.clone()));
        Self::pool_mean(h, attention_mask, normalize)
    }

    /// Mean pooling of hidden states `h: [b, t, d]` over real tokens
    /// (`attention_mask: [b, t]`), L2-normalised when `normalize`: the
    /// pooling of [`mean_pooled`](Self::mean_pooled), for hidden states from
    /// an adapted forward pass.
    pub fn pool_mean(
        h: Tensor<B, 3>,
        attention_mask: Tensor<B, 2>,
        normalize: bool,
    ) -> Tensor<B, 2> {
        let [b, t, _] = h.dims();
        let m = attention_mask.reshape([b, t, 1]);
        let summed = (h * m.clone()).sum_dim(1).squeeze_dim::<2>(1);
        let counts = m.sum_dim(1).squeeze_dim::<2>(1).clamp_min(1e-9);
        let mean = summed / counts;
        if normalize {
            let norm = mean
                .clone()
                .powf_scalar(2.0)
                .sum_dim(1)
                .sqrt()
                .clamp_min(1e-12);
            mean / norm
        } else {
            mean
        }
    }

    /// The model with a sequence-classification head of `num_labels`
    /// classes, as `BertForSequenceClassification` builds one over a
    /// checkpoint that has none: `classifier` `[d, num_labels]` drawn from
    /// N(0, 0.02²) (transformers' `initializer_range`), bias zero. The head
    /// an adapter trains is its own copy (PEFT's `modules_to_save`), so this
    /// draw only shows with adapters disabled. A checkpoint's own head is
    /// kept and must have `num_labels` classes; the checkpoint's pooler is
    /// needed (transformers would draw one at random, and PEFT would not
    /// save it). The encoder's modules are then named as in the task model
    /// (`bert.encoder.layer.0…`), so that adapters cross with PEFT's
    /// `SEQ_CLS` ones.
    pub fn with_classifier(mut self, num_labels: usize) -> Result<Self> {
        if self.pooler.is_none() {
            return Err(PeftError::Config(
                "this BERT checkpoint has no pooler (`pooler.dense`): a classification head reads the pooled first token"
                    .into(),
            ));
        }
        let fresh = self.classifier.is_none();
        let device = self.word_embeddings.weight.device();
        let dims = [self.config.hidden_size, num_labels];
        let head = task_head(self.classifier.take(), "classifier", dims, true, &device)?;
        self.classifier = Some(head);
        if fresh {
            self.prefix = "bert.".into();
        }
        Ok(self)
    }

    /// Classification logits `[b, num_labels]`. Fails for a checkpoint without a head.
    pub fn classify(
        &self,
        ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2>>,
    ) -> Result<Tensor<B, 2>> {
        self.classify_hidden(self.encode(ids, attention_mask))
    }

    /// Classification logits `[b, num_labels]` from last hidden states
    /// `[b, t, d]` (pooler on position 0): the head after a prefix- or
    /// prompt-tuned forward pass. Fails for a checkpoint without a head.
    pub fn classify_hidden(&self, h: Tensor<B, 3>) -> Result<Tensor<B, 2>> {
        let (Some(pooler), Some(classifier)) = (&self.pooler, &self.classifier) else {
            return Err(PeftError::State(
                "this BERT checkpoint has no pooler + classifier head".into(),
            ));
        };
        Ok(classifier.forward(pool_first(pooler, h)))
    }
}

/// BERT's pooler: `tanh(dense(h[:, 0]))`, `[b, d]` of `h: [b, t, d]`.
fn pool_first<B: Backend>(pooler: &LinearSlot<B>, h: Tensor<B, 3>) -> Tensor<B, 2> {
    let [b, _, d] = h.dims();
    let first = h.slice([0..b, 0..1, 0..d]).reshape([b, d]);
    tanh(pooler.forward(first))
}

impl<B: Backend> Bert<B> {
    /// Embeddings at positions `start..`, then the encoder layers (each after
    /// its `prefix` entry when given). `tokens: [b, t]` is the real tokens'
    /// attention mask, from which `mask` (over the prefix too) was made.
    ///
    /// With padding in `tokens`, the layers run on the real tokens alone
    /// ([`Packing`]) and padded positions of the result are zero. Not with a
    /// `hook` or a mixed batch ([`peft_core::routing`]): those route each
    /// batch row to its own adapter.
    fn run_layers(
        &self,
        embeds: Tensor<B, 3>,
        start: usize,
        mask: Option<Tensor<B, 4>>,
        tokens: Option<&Tensor<B, 2>>,
        mut prefix: Option<&mut KvCache<B>>,
        hook: Option<&dyn ResidualHook<B>>,
    ) -> Tensor<B, 3> {
        let device = embeds.device();
        let [b, t, _] = embeds.dims();
        let positions = positions::<B>(b, t, start, &device);
        let types = Tensor::<B, 2, Int>::zeros([b, t], &device);
        let x = embeds
            + self.position_embeddings.forward(positions)
            + self.token_type_embeddings.forward(types);
        let packing = match (hook, tokens) {
            (None, Some(tokens)) if peft_core::routing::row_adapters().is_none() => {
                Packing::of(tokens)
            }
            _ => None,
        };
        let x = match &packing {
            Some(p) => p.pack(x),
            None => x,
        };
        let mut x = self.embeddings_norm.forward(x);
        for (i, layer) in self.layers.iter().enumerate() {
            let p = prefix.as_deref_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(
                x,
                self.config.num_attention_heads,
                mask.as_ref(),
                packing.as_ref(),
                p,
                hook.map(|h| (h, i)),
            );
        }
        match &packing {
            Some(p) => p.unpack(x),
            None => x,
        }
    }
}

impl<B: Backend> PeftModel<B> for Bert<B> {
    /// Last hidden states `[b, t, d]` (the head: [`Bert::classify_hidden`]).
    type Output = Tensor<B, 3>;

    /// After a cache (a prefix), the padding mask spans the cached positions
    /// (always visible) and the tokens.
    fn run(&self, input: ModelInput<'_, B>) -> Tensor<B, 3> {
        let p = input.prepare(self.layers.len(), |ids| self.word_embeddings.forward(ids));
        let (x, past, attention_mask, cache, hook) =
            (p.embeds, p.past, p.attention_mask, p.cache, p.hook);
        if past == 0 {
            let mask = attention_mask.clone().map(padding_mask);
            return self.run_layers(x, 0, mask, attention_mask.as_ref(), cache, hook);
        }
        let device = x.device();
        let [b, t, _] = x.dims();
        let am = attention_mask.unwrap_or_else(|| Tensor::ones([b, t], &device));
        let mask = padding_mask(Tensor::cat(
            vec![Tensor::ones([b, past], &device), am.clone()],
            1,
        ));
        self.run_layers(x, past, Some(mask), Some(&am), cache, hook)
    }

    fn dims(&self) -> ModelDims {
        let c = &self.config;
        ModelDims {
            layers: self.layers.len(),
            d_model: c.hidden_size,
            vocab_size: c.vocab_size,
            kv_heads: c.num_attention_heads,
            head_dim: c.hidden_size / c.num_attention_heads,
        }
    }

    fn embed_tokens(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.word_embeddings.forward(ids)
    }

    fn hook_path(&self, point: InsertionPoint, layer: usize) -> String {
        let site = match point {
            AfterAttention => "attention.output",
            AfterFeedForward => "output",
        };
        format!("{}encoder.layer.{layer}.{site}", self.prefix)
    }

    fn visit_linears(&self, f: &mut dyn FnMut(&str, &LinearSlot<B>)) {
        let pre = &self.prefix;
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("{pre}encoder.layer.{i}");
            f(&format!("{p}.attention.self.query"), &l.query);
            f(&format!("{p}.attention.self.key"), &l.key);
            f(&format!("{p}.attention.self.value"), &l.value);
            f(&format!("{p}.attention.output.dense"), &l.attention_output);
            f(&format!("{p}.intermediate.dense"), &l.intermediate);
            f(&format!("{p}.output.dense"), &l.output);
        }
        if let Some(p) = &self.pooler {
            f(&format!("{pre}pooler.dense"), p);
        }
        if let Some(c) = &self.classifier {
            f("classifier", c);
        }
    }

    fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&str, &mut LinearSlot<B>)) {
        let pre = self.prefix.clone();
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("{pre}encoder.layer.{i}");
            f(&format!("{p}.attention.self.query"), &mut l.query);
            f(&format!("{p}.attention.self.key"), &mut l.key);
            f(&format!("{p}.attention.self.value"), &mut l.value);
            f(
                &format!("{p}.attention.output.dense"),
                &mut l.attention_output,
            );
            f(&format!("{p}.intermediate.dense"), &mut l.intermediate);
            f(&format!("{p}.output.dense"), &mut l.output);
        }
        if let Some(p) = &mut self.pooler {
            f(&format!("{pre}pooler.dense"), p);
        }
        if let Some(c) = &mut self.classifier {
            f("classifier", c);
        }
    }

    fn visit_norms(&self, f: &mut dyn FnMut(&str, &NormSlot<B>)) {
        let pre = &self.prefix;
        f(
            &format!("{pre}embeddings.LayerNorm"),
            &self.embeddings_norm.slot,
        );
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("{pre}encoder.layer.{i}");
            f(
                &format!("{p}.attention.output.LayerNorm"),
                &l.attention_norm.slot,
            );
            f(&format!("{p}.output.LayerNorm"), &l.output_norm.slot);
        }
    }

    fn visit_norms_mut(&mut self, f: &mut dyn FnMut(&str, &mut NormSlot<B>)) {
        let pre = self.prefix.clone();
        f(
            &format!("{pre}embeddings.LayerNorm"),
            &mut self.embeddings_norm.slot,
        );
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("{pre}encoder.layer.{i}");
            f(
                &format!("{p}.attention.output.LayerNorm"),
                &mut l.attention_norm.slot,
            );
            f(&format!("{p}.output.LayerNorm"), &mut l.output_norm.slot);
        }
    }

    fn visit_embeddings(&self, f: &mut dyn FnMut(&str, &EmbeddingSlot<B>)) {
        let path = format!("{}embeddings.word_embeddings", self.prefix);
        f(&path, &self.word_embeddings);
    }

    fn visit_embeddings_mut(&mut self, f: &mut dyn FnMut(&str, &mut EmbeddingSlot<B>)) {
        let path = format!("{}embeddings.word_embeddings", self.prefix);
        f(&path, &mut self.word_embeddings);
    }

    fn model_type(&self) -> Option<&str> {
        Some("bert")
    }

    fn pooled_output(&self, hidden: Tensor<B, 3>) -> Option<Tensor<B, 2>> {
        self.pooler.as_ref().map(|p| pool_first(p, hidden))
    }

    fn output_layers(&self) -> Vec<String> {
        vec!["classifier".into()]
    }
}
