//! [`PrefixEncoder`]: the learned per-layer keys and values.

use std::collections::HashMap;
use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::tanh;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use peft_core::io::{ensure_consumed, linear_from_torch, take_tensor, HostTensor};
use peft_core::kv::{KvCache, LayerCache};
use peft_core::prompt_learning::{PromptLearningConfig, PromptLearningType, VirtualTokenEncoder};
use peft_core::{PeftError, Result};

/// The reparameterisation MLP of a projected prefix.
#[derive(Module, Debug)]
pub struct PrefixProjection<B: Backend> {
    /// `token_dim → encoder_hidden_size`.
    pub first: Linear<B>,
    /// `encoder_hidden_size → num_layers·2·token_dim`.
    pub second: Linear<B>,
}

/// The prefix of one adapter.
///
/// Invariant: [`prefix`](Self::prefix) is `[n_virtual, num_layers·2·token_dim]`,
/// laid out as PEFT's `past_key_values` view: for virtual token `i`, layer
/// `l`, the key is column block `2l` and the value block `2l + 1`, each
/// `[kv_heads, head_dim]` row-major.
#[derive(Module, Debug)]
pub struct PrefixEncoder<B: Backend> {
    /// Without projection: the prefix itself, `[n_virtual, num_layers·2·token_dim]`.
    /// With projection: virtual-token embeddings, `[n_virtual, token_dim]`.
    pub embedding: Param<Tensor<B, 2>>,
    /// The reparameterisation, present while training a projected prefix.
    pub transform: Option<PrefixProjection<B>>,
}

impl<B: Backend> PrefixEncoder<B> {
    /// A fresh prefix per `config` (model fields filled), initialised as
    /// PEFT does: N(0, 1) embeddings, PyTorch's default `Linear` init, or
    /// zeros (`init_weights: "zero"`) for the prefix / the last layer.
    pub fn new(config: &PromptLearningConfig, device: &B::Device) -> Self {
        let [n, width] = config.embedding_shape();
        let zero = config.init_weights.as_deref() == Some("zero");
        if config.projected() {
            let d = config.token_dim.expect("model fields filled");
            let hidden = config.encoder_hidden_size.expect("validated");
            let mut second = LinearConfig::new(hidden, width).init(device);
            if zero {
                second.weight = Param::from_tensor(Tensor::zeros([hidden, width], device));
                second.bias = Some(Param::from_tensor(Tensor::zeros([width], device)));
            }
            PrefixEncoder {
                embedding: Param::from_tensor(Tensor::random(
                    [n, d],
                    Distribution::Normal(0.0, 1.0),
                    device,
                )),
                transform: Some(PrefixProjection {
                    first: LinearConfig::new(d, hidden).init(device),
                    second,
                }),
            }
        } else {
            let embedding = if zero {
                Tensor::zeros([n, width], device)
            } else {
                Tensor::random([n, width], Distribution::Normal(0.0, 1.0), device)
            };
            PrefixEncoder {
                embedding: Param::from_tensor(embedding),
                transform: None,
            }
        }
    }

    /// A folded prefix from saved `prompt_embeddings` of shape
    /// `config.embedding_shape()`.
    pub fn from_embeddings(
        config: &PromptLearningConfig,
        embeddings: &HostTensor,
        device: &B::Device,
    ) -> Result<Self> {
        Ok(PrefixEncoder {
            embedding: Param::from_tensor(embeddings.to_tensor(
                config.embedding_shape(),
                peft_core::prompt_learning::EMBEDDINGS_KEY,
                device,
            )?),
            transform: None,
        })
    }

    /// A prefix from PyTorch's `PrefixEncoder.state_dict()` (`embedding.weight`,
    /// and `transform.0.*` / `transform.2.*` when `config` is projected), for
    /// continuing a PyTorch run with its reparameterisation. `path` names the
    /// source in errors; every tensor must be used.
    pub fn from_torch_state(
        config: &PromptLearningConfig,
        mut tensors: HashMap<String, HostTensor>,
        path: &Path,
        device: &B::Device,
    ) -> Result<Self> {
        let [n, width] = config.embedding_shape();
        let key = "embedding.weight";
        let embedding = take_tensor(&mut tensors, key, path)?;
        let this = if config.projected() {
            let d = config.token_dim.expect("model fields filled");
            let hidden = config.encoder_hidden_size.expect("validated");
            PrefixEncoder {
                embedding: Param::from_tensor(embedding.to_tensor([n, d], key, device)?),
                transform: Some(PrefixProjection {
                    first: linear_from_torch(
                        &mut tensors,
                        "transform.0",
                        [d, hidden],
                        true,
                        path,
                        device,
                    )?,
                    second: linear_from_torch(
                        &mut tensors,
                        "transform.2",
                        [hidden, width],
                        true,
                        path,
                        device,
                    )?,
                }),
            }
        } else {
            PrefixEncoder {
                embedding: Param::from_tensor(embedding.to_tensor([n, width], key, device)?),
                transform: None,
            }
        };
        ensure_consumed(tensors, path)?;
        Ok(this)
    }

    /// The encoder as PyTorch's `PrefixEncoder.state_dict()` names and lays
    /// it out (`[out, in]` weights): what [`from_torch_state`](Self::from_torch_state)
    /// reads. Unlike the saved adapter, it keeps the reparameterisation, so
    /// a projected run can continue from it.
    pub fn torch_state(&self) -> Vec<(String, HostTensor)> {
        let mut out = vec![(
            "embedding.weight".to_string(),
            HostTensor::from_tensor(self.embedding.val()),
        )];
        if let Some(t) = &self.transform {
            for (name, linear) in [("transform.0", &t.first), ("transform.2", &t.second)] {
                out.push((
                    format!("{name}.weight"),
                    HostTensor::from_tensor(linear.weight.val()).transposed(),
                ));
                if let Some(b) = &linear.bias {
                    out.push((format!("{name}.bias"), HostTensor::from_tensor(b.val())));
                }
            }
        }
        out
    }

    /// A prefix holding exactly the keys/values of `cache` (every layer
    /// filled, batch 1): the model then behaves as if the cached tokens came
    /// before the input. The initialisation Li & Liang recommend (the
    /// activations of real words).
    pub fn from_cache(cache: &KvCache<B>) -> Result<Self> {
        let mut blocks = Vec::with_capacity(2 * cache.layers.len());
        for (l, layer) in cache.layers.iter().enumerate() {
            let (Some(k), Some(v)) = (&layer.k, &layer.v) else {
                return Err(PeftError::State(format!("layer {l} of the cache is empty")));
            };
            if k.dims()[0] != 1 {
                return Err(PeftError::State(format!(
                    "a prefix comes from one sequence; the cache holds {}",
                    k.dims()[0]
                )));
            }
            blocks.push(k.clone());
            blocks.push(v.clone());
        }
        let [_, h, n, d] = blocks[0].dims();
        let layers = cache.layers.len();
        // Inverse of `split_layers`: [2L, h, n, d] → [n, 2L, h, d] → flat.
        let flat = Tensor::cat(blocks, 0)
            .permute([2, 0, 1, 3])
            .reshape([n, 2 * layers * h * d]);
        Ok(PrefixEncoder {
            embedding: Param::from_tensor(flat.detach()),
            transform: None,
        })
    }

    /// Number of virtual tokens.
    pub fn num_virtual_tokens(&self) -> usize {
        self.embedding.dims()[0]
    }

    /// The prefix `[n_virtual, num_layers·2·token_dim]` (through the
    /// projection when there is one): what PEFT saves as `prompt_embeddings`.
    pub fn prefix(&self) -> Tensor<B, 2> {
        let e = self.embedding.val();
        match &self.transform {
            Some(t) => t.second.forward(tanh(t.first.forward(e))),
            None => e,
        }
    }

    /// This prefix folded: its projection evaluated once and dropped.
    pub fn folded(&self) -> Self {
        PrefixEncoder {
            embedding: Param::from_tensor(self.prefix().detach()),
            transform: None,
        }
    }

    /// The prefix as a cache of `layers` layers of `[batch, kv_heads,
    /// n_virtual, head_dim]` keys and values.
    pub fn cache(
        &self,
        batch: usize,
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> KvCache<B> {
        let per_layer = split_layers(self.prefix(), layers, kv_heads, head_dim);
        KvCache {
            layers: per_layer
                .into_iter()
                .map(|(k, v)| LayerCache {
                    k: Some(expand_batch(k, batch)),
                    v: Some(expand_batch(v, batch)),
                })
                .collect(),
        }
    }
}

/// One layer's prefix keys and values, each `[1, kv_heads, n_virtual, head_dim]`.
pub(crate) type LayerPrefix<B> = (Tensor<B, 4>, Tensor<B, 4>);

/// `[n, L·2·h·d]` → per layer `(k, v)`, each `[1, h, n, d]`.
pub(crate) fn split_layers<B: Backend>(
    prefix: Tensor<B, 2>,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Vec<LayerPrefix<B>> {
    let n = prefix.dims()[0];
    // PEFT: view(n, 2L, h, d).permute(2L, h, n, d), then (k, v) pairs.
    let blocks = prefix
        .reshape([n, 2 * layers, kv_heads, head_dim])
        .permute([1, 2, 0, 3]);
    (0..layers)
        .map(|l| {
            let k = blocks.clone().narrow(0, 2 * l, 1);
            let v = blocks.clone().narrow(0, 2 * l + 1, 1);
            (k, v)
        })
        .collect()
}

fn expand_batch<B: Backend>(x: Tensor<B, 4>, batch: usize) -> Tensor<B, 4> {
    let [_, h, n, d] = x.dims();
    x.expand([batch, h, n, d])
}

impl<B: Backend> VirtualTokenEncoder<B> for PrefixEncoder<B> {
    const PEFT_TYPES: &'static [PromptLearningType] = &[PromptLearningType::PrefixTuning];

    fn num_virtual_tokens(&self) -> usize {
        self.num_virtual_tokens()
    }

    fn prompt_embeddings(&self) -> Tensor<B, 2> {
        self.prefix()
    }

    fn is_reparameterised(&self) -> bool {
        self.transform.is_some()
    }

    fn torch_state(&self) -> Vec<(String, HostTensor)> {
        self.torch_state()
    }

    fn from_torch_state(
        config: &PromptLearningConfig,
        tensors: HashMap<String, HostTensor>,
        path: &Path,
        device: &B::Device,
    ) -> Result<Self> {
        Self::from_torch_state(config, tensors, path, device)
    }

    fn from_embeddings(
        config: &PromptLearningConfig,
        embeddings: &HostTensor,
        device: &B::Device,
    ) -> Result<Self> {
        Self::from_embeddings(config, embeddings, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::TensorData;

    type B = NdArray;

    fn values(t: Tensor<B, 2>) -> Vec<f32> {
        t.to_data().to_vec::<f32>().unwrap()
    }

    /// PEFT's `past_key_values` view on three layers (two would not tell
    /// `2·L` from `2 + L`): value (token i, layer l, key/value j, head h,
    /// dim d) of the flat prefix is layer l's key (j = 0) or value (j = 1)
    /// at `[0, h, i, d]`, and `from_cache` inverts the split.
    #[test]
    fn split_layers_is_pefts_past_key_values_view() {
        let (n, layers, heads, dim) = (2, 3, 2, 4);
        let width = layers * 2 * heads * dim;
        let flat: Vec<f32> = (0..n * width).map(|x| x as f32).collect();
        let device = Default::default();
        let prefix = Tensor::<B, 2>::from_data(TensorData::new(flat.clone(), [n, width]), &device);
        let split = split_layers(prefix.clone(), layers, heads, dim);
        assert_eq!(split.len(), layers);
        for (l, (k, v)) in split.iter().enumerate() {
            for (j, t) in [k, v].into_iter().enumerate() {
                assert_eq!(t.dims(), [1, heads, n, dim], "layer {l}, {j}");
                let got = t.to_data().to_vec::<f32>().unwrap();
                for h in 0..heads {
                    for i in 0..n {
                        for d in 0..dim {
                            let want = flat[i * width + ((2 * l + j) * heads + h) * dim + d];
                            let at = (h * n + i) * dim + d;
                            assert_eq!(got[at], want, "layer {l}, {j}, head {h}, token {i}");
                        }
                    }
                }
            }
        }
        let encoder = PrefixEncoder {
            embedding: Param::from_tensor(prefix),
            transform: None,
        };
        let cache = encoder.cache(1, layers, heads, dim);
        let back = PrefixEncoder::from_cache(&cache).unwrap();
        assert_eq!(values(back.prefix()), flat);
    }

    /// What a training loop asks of the encoder, through the shared
    /// `VirtualTokenEncoder` interface: its number of virtual tokens,
    /// whether it is reparameterised (and not once folded), and PyTorch's
    /// `state_dict`, which loads back into the same prefix.
    #[test]
    fn the_encoder_interface_reports_tokens_kind_and_state() {
        let device = Default::default();
        for projected in [false, true] {
            let mut config = if projected {
                PromptLearningConfig::prefix_tuning_projected(5, 6)
            } else {
                PromptLearningConfig::prefix_tuning(5)
            };
            config.fill_from_model(3, 8, 2).unwrap();
            let encoder = PrefixEncoder::<B>::new(&config, &device);
            assert_eq!(encoder.num_virtual_tokens(), 5);
            assert_eq!(VirtualTokenEncoder::<B>::num_virtual_tokens(&encoder), 5);
            assert_eq!(
                VirtualTokenEncoder::<B>::is_reparameterised(&encoder),
                projected
            );
            let folded = encoder.folded();
            assert!(!VirtualTokenEncoder::<B>::is_reparameterised(&folded));
            assert_eq!(values(folded.prefix()), values(encoder.prefix()));
            let state = VirtualTokenEncoder::<B>::torch_state(&encoder);
            let names: Vec<&str> = state.iter().map(|(n, _)| n.as_str()).collect();
            let want: &[&str] = if projected {
                &[
                    "embedding.weight",
                    "transform.0.weight",
                    "transform.0.bias",
                    "transform.2.weight",
                    "transform.2.bias",
                ]
            } else {
                &["embedding.weight"]
            };
            assert_eq!(names, want);
            let back = <PrefixEncoder<B> as VirtualTokenEncoder<B>>::from_torch_state(
                &config,
                state.into_iter().collect(),
                Path::new("state"),
                &device,
            )
            .unwrap();
            assert_eq!(back.transform.is_some(), projected);
            assert_eq!(values(back.prefix()), values(encoder.prefix()));
        }
    }
}
