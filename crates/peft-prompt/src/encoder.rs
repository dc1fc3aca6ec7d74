//! [`PromptEncoder`]: the soft prompt of one adapter.

use std::collections::HashMap;
use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::{relu, sigmoid, tanh};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use peft_core::io::{ensure_consumed, linear_from_torch, take_tensor, HostTensor};
use peft_core::prompt_learning::{
    PromptEncoderType, PromptLearningConfig, PromptLearningType, VirtualTokenEncoder,
    EMBEDDINGS_KEY,
};
use peft_core::{PeftError, Result};

/// Linear layers with ReLU between them.
#[derive(Module, Debug)]
pub struct MlpHead<B: Backend> {
    /// The layers, in order.
    pub layers: Vec<Linear<B>>,
}

impl<B: Backend> MlpHead<B> {
    fn new(widths: &[usize], device: &B::Device) -> Self {
        MlpHead {
            layers: widths
                .windows(2)
                .map(|w| LinearConfig::new(w[0], w[1]).init(device))
                .collect(),
        }
    }

    fn forward(&self, mut x: Tensor<B, 2>) -> Tensor<B, 2> {
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x);
            if i < last {
                x = relu(x);
            }
        }
        x
    }
}

/// One direction of one LSTM layer, PyTorch's gate order (input, forget,
/// cell, output) along the `4·hidden` axis.
#[derive(Module, Debug)]
pub struct LstmDirection<B: Backend> {
    /// Input weights, `[d_in, 4·hidden]`.
    pub w_ih: Param<Tensor<B, 2>>,
    /// Recurrent weights, `[hidden, 4·hidden]`.
    pub w_hh: Param<Tensor<B, 2>>,
    /// Input bias, `[4·hidden]`.
    pub b_ih: Param<Tensor<B, 1>>,
    /// Recurrent bias, `[4·hidden]`.
    pub b_hh: Param<Tensor<B, 1>>,
}

impl<B: Backend> LstmDirection<B> {
    fn new(d_in: usize, hidden: usize, device: &B::Device) -> Self {
        // PyTorch: every LSTM parameter U(±1/√hidden).
        let k = 1.0 / (hidden as f64).sqrt();
        let u = Distribution::Uniform(-k, k);
        LstmDirection {
            w_ih: Param::from_tensor(Tensor::random([d_in, 4 * hidden], u, device)),
            w_hh: Param::from_tensor(Tensor::random([hidden, 4 * hidden], u, device)),
            b_ih: Param::from_tensor(Tensor::random([4 * hidden], u, device)),
            b_hh: Param::from_tensor(Tensor::random([4 * hidden], u, device)),
        }
    }

    fn from_torch(
        tensors: &mut HashMap<String, HostTensor>,
        suffix: &str,
        [d_in, hidden]: [usize; 2],
        path: &Path,
        device: &B::Device,
    ) -> Result<Self> {
        let mut matrix = |name: &str, rows: usize| -> Result<Param<Tensor<B, 2>>> {
            let key = format!("lstm_head.{name}{suffix}");
            let t = take_tensor(tensors, &key, path)?;
            if t.shape != [4 * hidden, rows] {
                return Err(PeftError::Shape {
                    name: key,
                    expected: vec![4 * hidden, rows],
                    found: t.shape,
                });
            }
            Ok(Param::from_tensor(t.transposed().to_tensor(
                [rows, 4 * hidden],
                &key,
                device,
            )?))
        };
        let w_ih = matrix("weight_ih_", d_in)?;
        let w_hh = matrix("weight_hh_", hidden)?;
        let mut vector = |name: &str| -> Result<Param<Tensor<B, 1>>> {
            let key = format!("lstm_head.{name}{suffix}");
            Ok(Param::from_tensor(
                take_tensor(tensors, &key, path)?.to_tensor([4 * hidden], &key, device)?,
            ))
        };
        Ok(LstmDirection {
            w_ih,
            w_hh,
            b_ih: vector("bias_ih_")?,
            b_hh: vector("bias_hh_")?,
        })
    }

    /// Runs over `x: [n, d_in]` in order (or reversed), returning `[n, hidden]`
    /// with row `t` the state after step `t`.
    fn run(&self, x: Tensor<B, 2>, reverse: bool) -> Tensor<B, 2> {
        let n = x.dims()[0];
        let hidden = self.w_hh.dims()[0];
        let device = x.device();
        let projected = x.matmul(self.w_ih.val()) + self.b_ih.val().unsqueeze();
        let mut h = Tensor::<B, 2>::zeros([1, hidden], &device);
        let mut c = Tensor::<B, 2>::zeros([1, hidden], &device);
        let mut out: Vec<Option<Tensor<B, 2>>> = vec![None; n];
        let order: Vec<usize> = if reverse {
            (0..n).rev().collect()
        } else {
            (0..n).collect()
        };
        for t in order {
            let g = projected.clone().narrow(0, t, 1)
                + h.matmul(self.w_hh.val())
                + self.b_hh.val().unsqueeze();
            let gate = |k: usize| g.clone().narrow(1, k * hidden, hidden);
            let (i, f, cell, o) = (
                sigmoid(gate(0)),
                sigmoid(gate(1)),
                tanh(gate(2)),
                sigmoid(gate(3)),
            );
            c = f * c + i * cell;
            h = o * tanh(c.clone());
            out[t] = Some(h.clone());
        }
        Tensor::cat(
            out.into_iter()
                .map(|h| h.expect("every step ran"))
                .collect(),
            0,
        )
    }
}

/// A bidirectional multi-layer LSTM (PyTorch's `nn.LSTM(bidirectional=True)`
/// on one sequence).
#[derive(Module, Debug)]
pub struct BiLstm<B: Backend> {
    /// `(forward, backward)` per layer; layer `l > 0` reads `2·hidden` inputs.
    pub layers: Vec<(LstmDirection<B>, LstmDirection<B>)>,
    /// Dropout probability on every layer's output but the last, in
    /// training only (an autodiff backend), as PyTorch's `dropout` argument
    /// (P-tuning's `encoder_dropout`).
    #[module(skip)]
    pub dropout: f64,
}

impl<B: Backend> BiLstm<B> {
    fn forward(&self, mut x: Tensor<B, 2>) -> Tensor<B, 2> {
        let last = self.layers.len().saturating_sub(1);
        for (l, (fwd, bwd)) in self.layers.iter().enumerate() {
            x = Tensor::cat(vec![fwd.run(x.clone(), false), bwd.run(x, true)], 1);
            if l < last {
                x = self.drop(x);
            }
        }
        x
    }

    /// Inverted dropout between layers: kept values scaled by `1/(1-p)`;
    /// `p = 1` drops everything (PyTorch's rule), where Burn's `Dropout`
    /// would divide by zero.
    fn drop(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        if self.dropout <= 0.0 || !B::ad_enabled(&x.device()) {
            return x;
        }
        if self.dropout >= 1.0 {
            return x.zeros_like();
        }
        let keep = 1.0 - self.dropout;
        let mask = x.random_like(Distribution::Bernoulli(keep));
        x * mask / keep
    }
}

/// The soft prompt of one adapter.
///
/// Invariant: [`prompt`](Self::prompt) is `[n_virtual, token_dim]`.
#[derive(Module, Debug)]
pub struct PromptEncoder<B: Backend> {
    /// Prompt tuning and loaded adapters: the prompt itself. P-tuning: the
    /// encoder's input embeddings. `[n_virtual, token_dim]`.
    pub embedding: Param<Tensor<B, 2>>,
    /// P-tuning with an LSTM encoder: `token_dim → 2·hidden`.
    pub lstm: Option<BiLstm<B>>,
    /// P-tuning: the MLP (`token_dim → hidden → hidden → token_dim`), or
    /// after the LSTM (`2·hidden → 2·hidden → token_dim`).
    pub mlp: Option<MlpHead<B>>,
}

impl<B: Backend> PromptEncoder<B> {
    /// A prompt whose rows are `embedding: [n_virtual, token_dim]`.
    pub fn from_tensor(embedding: Tensor<B, 2>) -> Self {
        PromptEncoder {
            embedding: Param::from_tensor(embedding),
            lstm: None,
            mlp: None,
        }
    }

    /// A fresh P-tuning encoder per `config` (model fields filled),
    /// initialised as PyTorch initialises its modules.
    pub fn p_tuning(config: &PromptLearningConfig, device: &B::Device) -> Self {
        let [n, d] = config.embedding_shape();
        let hidden = config.encoder_hidden_size.expect("validated");
        let embedding = Tensor::random([n, d], Distribution::Normal(0.0, 1.0), device);
        match config.encoder_reparameterization_type {
            Some(PromptEncoderType::Lstm) => {
                let layers = config.encoder_num_layers.unwrap_or(2);
                PromptEncoder {
                    embedding: Param::from_tensor(embedding),
                    lstm: Some(BiLstm {
                        dropout: config.encoder_dropout.unwrap_or(0.0),
                        layers: (0..layers)
                            .map(|l| {
                                let d_in = if l == 0 { d } else { 2 * hidden };
                                (
                                    LstmDirection::new(d_in, hidden, device),
                                    LstmDirection::new(d_in, hidden, device),
                                )
                            })
                            .collect(),
                    }),
                    mlp: Some(MlpHead::new(&[2 * hidden, 2 * hidden, d], device)),
                }
            }
            _ => PromptEncoder {
                embedding: Param::from_tensor(embedding),
                lstm: None,
                mlp: Some(MlpHead::new(&[d, hidden, hidden, d], device)),
            },
        }
    }

    /// A folded prompt from saved `prompt_embeddings`.
    pub fn from_embeddings(
        config: &PromptLearningConfig,
        embeddings: &HostTensor,
        device: &B::Device,
    ) -> Result<Self> {
        Ok(Self::from_tensor(embeddings.to_tensor(
            config.embedding_shape(),
            EMBEDDINGS_KEY,
            device,
        )?))
    }

    /// An encoder from PyTorch's `PromptEmbedding` / `PromptEncoder`
    /// `state_dict()` (`embedding.weight`, `mlp_head.*`, `lstm_head.*`), for
    /// continuing a PyTorch run with its reparameterisation. Every tensor
    /// must be used; `path` names the source in errors.
    pub fn from_torch_state(
        config: &PromptLearningConfig,
        mut tensors: HashMap<String, HostTensor>,
        path: &Path,
        device: &B::Device,
    ) -> Result<Self> {
        let [n, d] = config.embedding_shape();
        let key = "embedding.weight";
        let embedding = take_tensor(&mut tensors, key, path)?.to_tensor([n, d], key, device)?;
        let mut this = Self::from_tensor(embedding);
        let hidden = config.encoder_hidden_size.unwrap_or(0);
        let mut linears = |widths: &[usize], indices: &[usize]| -> Result<MlpHead<B>> {
            let layers = widths
                .windows(2)
                .zip(indices)
                .map(|(w, i)| {
                    linear_from_torch(
                        &mut tensors,
                        &format!("mlp_head.{i}"),
                        [w[0], w[1]],
                        true,
                        path,
                        device,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(MlpHead { layers })
        };
        match (config.peft_type, config.encoder_reparameterization_type) {
            (
                peft_core::prompt_learning::PromptLearningType::PTuning,
                Some(PromptEncoderType::Mlp),
            ) if !config.inference_mode => {
                this.mlp = Some(linears(&[d, hidden, hidden, d], &[0, 2, 4])?);
            }
            (
                peft_core::prompt_learning::PromptLearningType::PTuning,
                Some(PromptEncoderType::Lstm),
            ) if !config.inference_mode => {
                this.mlp = Some(linears(&[2 * hidden, 2 * hidden, d], &[0, 2])?);
                let layers = config.encoder_num_layers.unwrap_or(2);
                let lstm = (0..layers)
                    .map(|l| {
                        let d_in = if l == 0 { d } else { 2 * hidden };
                        Ok((
                            LstmDirection::from_torch(
                                &mut tensors,
                                &format!("l{l}"),
                                [d_in, hidden],
                                path,
                                device,
                            )?,
                            LstmDirection::from_torch(
                                &mut tensors,
                                &format!("l{l}_reverse"),
                                [d_in, hidden],
                                path,
                                device,
                            )?,
                        ))
                    })
                    .collect::<Result<Vec<_>>>()?;
                this.lstm = Some(BiLstm {
                    layers: lstm,
                    dropout: config.encoder_dropout.unwrap_or(0.0),
                });
            }
            _ => {}
        }
        ensure_consumed(tensors, path)?;
        Ok(this)
    }

    /// The encoder as PyTorch's `state_dict()` names and lays it out
    /// (`[out, in]` weights): what [`from_torch_state`](Self::from_torch_state)
    /// reads. Unlike the saved adapter it keeps a P-tuning encoder, so a run
    /// can continue from it.
    pub fn torch_state(&self) -> Vec<(String, HostTensor)> {
        let mut out = vec![(
            "embedding.weight".to_string(),
            HostTensor::from_tensor(self.embedding.val()),
        )];
        if let Some(mlp) = &self.mlp {
            // PyTorch's `Sequential` puts an activation between the linears.
            for (k, linear) in mlp.layers.iter().enumerate() {
                out.push((
                    format!("mlp_head.{}.weight", 2 * k),
                    HostTensor::from_tensor(linear.weight.val()).transposed(),
                ));
                if let Some(b) = &linear.bias {
                    out.push((
                        format!("mlp_head.{}.bias", 2 * k),
                        HostTensor::from_tensor(b.val()),
                    ));
                }
            }
        }
        if let Some(lstm) = &self.lstm {
            for (l, (forward, backward)) in lstm.layers.iter().enumerate() {
                for (dir, suffix) in [
                    (forward, format!("l{l}")),
                    (backward, format!("l{l}_reverse")),
                ] {
                    let key = |name: &str| format!("lstm_head.{name}_{suffix}");
                    out.push((
                        key("weight_ih"),
                        HostTensor::from_tensor(dir.w_ih.val()).transposed(),
                    ));
                    out.push((
                        key("weight_hh"),
                        HostTensor::from_tensor(dir.w_hh.val()).transposed(),
                    ));
                    out.push((key("bias_ih"), HostTensor::from_tensor(dir.b_ih.val())));
                    out.push((key("bias_hh"), HostTensor::from_tensor(dir.b_hh.val())));
                }
            }
        }
        out
    }

    /// Number of virtual tokens.
    pub fn num_virtual_tokens(&self) -> usize {
        self.embedding.dims()[0]
    }

    /// The prompt `[n_virtual, token_dim]` (through the encoder when there is
    /// one): what PEFT saves as `prompt_embeddings`.
    pub fn prompt(&self) -> Tensor<B, 2> {
        let mut x = self.embedding.val();
        if let Some(lstm) = &self.lstm {
            x = lstm.forward(x);
        }
        if let Some(mlp) = &self.mlp {
            x = mlp.forward(x);
        }
        x
    }

    /// This prompt folded: its encoder evaluated once and dropped.
    pub fn folded(&self) -> Self {
        Self::from_tensor(self.prompt().detach())
    }
}

impl<B: Backend> VirtualTokenEncoder<B> for PromptEncoder<B> {
    const PEFT_TYPES: &'static [PromptLearningType] = &[
        PromptLearningType::PromptTuning,
        PromptLearningType::PTuning,
    ];

    fn num_virtual_tokens(&self) -> usize {
        self.num_virtual_tokens()
    }

    fn prompt_embeddings(&self) -> Tensor<B, 2> {
        self.prompt()
    }

    fn is_reparameterised(&self) -> bool {
        self.mlp.is_some() || self.lstm.is_some()
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
