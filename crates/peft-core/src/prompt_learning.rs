//! What prefix tuning, prompt tuning and P-tuning share: PEFT's
//! `PromptLearningConfig` family as one serde type, and their adapter files.
//!
//! All three learn `num_virtual_tokens` vectors and save one tensor,
//! `prompt_embeddings`: the encoder's output on the virtual-token ids, with
//! any reparameterisation (prefix projection, P-tuning's MLP/LSTM) folded
//! away. Its shape is [`PromptLearningConfig::embedding_shape`]:
//! `[n_virtual, num_layers·2·token_dim]` for prefix tuning (keys and values
//! of every layer), `[n_virtual·submodules, token_dim]` for the others.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::{from_value, parse_json, read_text, sorted_json, warn_unknown_keys};
use crate::error::{PeftError, Result};
use crate::io::{
    ensure_consumed, read_safetensors, serialize_safetensors, write_adapter_files, write_atomic,
    HostTensor,
};

pub use crate::io::{CONFIG_FILE, WEIGHTS_FILE};
/// The one tensor of a prompt-learning adapter file.
pub const EMBEDDINGS_KEY: &str = "prompt_embeddings";

/// Which prompt-learning method (`peft_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PromptLearningType {
    /// Per-layer key/value prefixes.
    #[serde(rename = "PREFIX_TUNING")]
    PrefixTuning,
    /// Soft prompt embeddings before the input embeddings.
    #[serde(rename = "PROMPT_TUNING")]
    PromptTuning,
    /// Soft prompt produced by a prompt encoder (MLP or LSTM).
    #[serde(rename = "P_TUNING")]
    PTuning,
}

impl PromptLearningType {
    /// PEFT's name.
    pub fn as_str(self) -> &'static str {
        match self {
            PromptLearningType::PrefixTuning => "PREFIX_TUNING",
            PromptLearningType::PromptTuning => "PROMPT_TUNING",
            PromptLearningType::PTuning => "P_TUNING",
        }
    }
}

/// P-tuning's prompt encoder (`encoder_reparameterization_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PromptEncoderType {
    /// Three linear layers with ReLUs.
    #[serde(rename = "MLP")]
    Mlp,
    /// A bidirectional LSTM followed by a two-layer MLP.
    #[serde(rename = "LSTM")]
    Lstm,
}

/// Prompt tuning's initialisation (`prompt_tuning_init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PromptTuningInit {
    /// N(0, 1), as `nn.Embedding`.
    #[serde(rename = "RANDOM")]
    Random,
    /// Rows of the word embeddings at random token ids.
    #[serde(rename = "SAMPLE_VOCAB")]
    SampleVocab,
    /// The word embeddings of a tokenised text, cut or repeated to length.
    #[serde(rename = "TEXT")]
    Text,
}

/// PEFT's `PrefixTuningConfig`, `PromptTuningConfig` and `PromptEncoderConfig`
/// (P-tuning) as they appear in `adapter_config.json`. Fields that belong to
/// one method only are `None` for the others and are not written.
///
/// `token_dim`, `num_layers`, `num_attention_heads` and
/// `num_transformer_submodules` describe the model; they are filled from it
/// when the adapter is attached ([`fill_from_model`](Self::fill_from_model)).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptLearningConfig {
    /// The method.
    pub peft_type: PromptLearningType,
    /// Number of virtual tokens.
    pub num_virtual_tokens: usize,
    /// Width of one virtual token: the embedding width (prompt tuning,
    /// P-tuning) or `head_dim · kv_heads` (prefix tuning).
    #[serde(default)]
    pub token_dim: Option<usize>,
    /// 1 for decoder-only and encoder-only models.
    #[serde(default)]
    pub num_transformer_submodules: Option<usize>,
    /// Attention heads (for prefix tuning: key/value heads).
    #[serde(default)]
    pub num_attention_heads: Option<usize>,
    /// Transformer layers.
    #[serde(default)]
    pub num_layers: Option<usize>,
    /// Hidden width of the prefix projection or of P-tuning's encoder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_hidden_size: Option<usize>,
    /// Prefix tuning: reparameterise through Embedding → Linear → Tanh → Linear.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_projection: Option<bool>,
    /// Prefix tuning: `"zero"` starts the prefix (or the projection's last
    /// layer) at zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_weights: Option<String>,
    /// Prompt tuning: how the prompt starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tuning_init: Option<PromptTuningInit>,
    /// Prompt tuning with `TEXT` init: the text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tuning_init_text: Option<String>,
    /// Prompt tuning with `TEXT` init: the tokenizer, informational.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_name_or_path: Option<String>,
    /// P-tuning: the encoder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_reparameterization_type: Option<PromptEncoderType>,
    /// P-tuning: LSTM layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_num_layers: Option<usize>,
    /// P-tuning: dropout between LSTM layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_dropout: Option<f64>,
    /// PEFT task type (`CAUSAL_LM`, `SEQ_CLS`, ...), informational.
    #[serde(default)]
    pub task_type: Option<String>,
    /// The base model this adapter was trained on, informational.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Whether the adapter was saved for inference (reparameterisation folded).
    #[serde(default)]
    pub inference_mode: bool,
    /// Layers each adapter keeps a trainable full copy of (PEFT's
    /// `modules_to_save`: a SEQ_CLS adapter's classifier head), saved
    /// under `base_model.<path>.*`; linear layers only.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Keys this version does not model, kept and written back as they were.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

const KNOWN_UNMODELLED: &[&str] = &[
    "auto_mapping",
    "revision",
    "peft_version",
    "tokenizer_kwargs",
];

impl PromptLearningConfig {
    fn new(peft_type: PromptLearningType, num_virtual_tokens: usize) -> Self {
        PromptLearningConfig {
            peft_type,
            num_virtual_tokens,
            token_dim: None,
            num_transformer_submodules: None,
            num_attention_heads: None,
            num_layers: None,
            encoder_hidden_size: None,
            prefix_projection: None,
            init_weights: None,
            prompt_tuning_init: None,
            prompt_tuning_init_text: None,
            tokenizer_name_or_path: None,
            encoder_reparameterization_type: None,
            encoder_num_layers: None,
            encoder_dropout: None,
            task_type: None,
            base_model_name_or_path: None,
            inference_mode: false,
            modules_to_save: None,
            extra: Map::new(),
        }
    }

    /// Prefix tuning with `n` virtual tokens, no projection.
    pub fn prefix_tuning(n: usize) -> Self {
        let mut c = Self::new(PromptLearningType::PrefixTuning, n);
        c.prefix_projection = Some(false);
        c
    }

    /// Prefix tuning reparameterised through an MLP of width `hidden`.
    pub fn prefix_tuning_projected(n: usize, hidden: usize) -> Self {
        let mut c = Self::prefix_tuning(n);
        c.prefix_projection = Some(true);
        c.encoder_hidden_size = Some(hidden);
        c
    }

    /// Prompt tuning with `n` virtual tokens initialised per `init` (for
    /// `TEXT`, also set [`prompt_tuning_init_text`](Self::prompt_tuning_init_text)).
    pub fn prompt_tuning(n: usize, init: PromptTuningInit) -> Self {
        let mut c = Self::new(PromptLearningType::PromptTuning, n);
        c.prompt_tuning_init = Some(init);
        c
    }

    /// P-tuning with `n` virtual tokens and an encoder of width `hidden`
    /// (PEFT's defaults: 2 LSTM layers, no dropout).
    pub fn p_tuning(n: usize, encoder: PromptEncoderType, hidden: usize) -> Self {
        let mut c = Self::new(PromptLearningType::PTuning, n);
        c.encoder_reparameterization_type = Some(encoder);
        c.encoder_hidden_size = Some(hidden);
        c.encoder_num_layers = Some(2);
        c.encoder_dropout = Some(0.0);
        c
    }

    /// Parses `adapter_config.json` text of an adapter whose type is one of
    /// `expected`; `origin` names the source in errors.
    pub fn from_json_str(
        text: &str,
        origin: &Path,
        expected: &[PromptLearningType],
    ) -> Result<Self> {
        let value = parse_json(text, origin)?;
        let found = value.get("peft_type").and_then(Value::as_str).unwrap_or("");
        if !expected.iter().any(|t| t.as_str() == found) {
            let names: Vec<&str> = expected.iter().map(|t| t.as_str()).collect();
            return Err(PeftError::Config(format!(
                "{}: peft_type `{found}` is not {}",
                origin.display(),
                names.join(" or ")
            )));
        }
        let config: PromptLearningConfig = from_value(value, origin)?;
        warn_unknown_keys(&config.extra, KNOWN_UNMODELLED, origin);
        config
            .validate()
            .map_err(|e| PeftError::Config(format!("{}: {e}", origin.display())))?;
        Ok(config)
    }

    /// Reads `adapter_config.json` from a file.
    pub fn from_file(path: &Path, expected: &[PromptLearningType]) -> Result<Self> {
        Self::from_json_str(&read_text(path)?, path, expected)
    }

    /// The JSON text PEFT writes (pretty, keys sorted).
    pub fn to_json_string(&self) -> String {
        sorted_json(self)
    }

    /// Checks values a user can get wrong.
    pub fn validate(&self) -> Result<()> {
        let positive = |name: &str, v: Option<usize>| match v {
            Some(0) => Err(PeftError::Config(format!(
                "`{name}` must be positive, got 0"
            ))),
            _ => Ok(()),
        };
        positive("num_virtual_tokens", Some(self.num_virtual_tokens))?;
        positive("token_dim", self.token_dim)?;
        positive("num_layers", self.num_layers)?;
        positive("num_attention_heads", self.num_attention_heads)?;
        positive("encoder_hidden_size", self.encoder_hidden_size)?;
        positive("encoder_num_layers", self.encoder_num_layers)?;
        if let (Some(d), Some(h)) = (self.token_dim, self.num_attention_heads) {
            if d % h != 0 {
                return Err(PeftError::Config(format!(
                    "`token_dim` {d} is not a multiple of `num_attention_heads` {h}"
                )));
            }
        }
        match self.num_transformer_submodules {
            None | Some(1) => {}
            Some(n) => {
                return Err(PeftError::Config(format!(
                    "num_transformer_submodules {n} (encoder-decoder models) is not supported"
                )))
            }
        }
        if let Some(p) = self.encoder_dropout {
            if !(0.0..1.0).contains(&p) {
                return Err(PeftError::Config(format!(
                    "`encoder_dropout` must be in [0, 1), got {p}"
                )));
            }
        }
        if let Some(w) = &self.init_weights {
            if w != "zero" {
                return Err(PeftError::Config(format!(
                    "init_weights `{w}` is not supported (null or \"zero\")"
                )));
            }
        }
        match self.peft_type {
            PromptLearningType::PrefixTuning => {
                if self.projected() && self.encoder_hidden_size.is_none() {
                    return Err(PeftError::Config(
                        "prefix_projection needs `encoder_hidden_size`".into(),
                    ));
                }
            }
            PromptLearningType::PromptTuning => {
                if self.prompt_tuning_init == Some(PromptTuningInit::Text)
                    && self.prompt_tuning_init_text.is_none()
                {
                    return Err(PeftError::Config(
                        "prompt_tuning_init TEXT needs `prompt_tuning_init_text`".into(),
                    ));
                }
            }
            PromptLearningType::PTuning => {
                if self.encoder_reparameterization_type.is_none() {
                    return Err(PeftError::Config(
                        "P-tuning needs `encoder_reparameterization_type` (MLP or LSTM)".into(),
                    ));
                }
                if self.encoder_hidden_size.is_none() {
                    return Err(PeftError::Config(
                        "P-tuning needs `encoder_hidden_size`".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether prefix tuning trains through the projection MLP (and the
    /// adapter is not a saved, folded one).
    pub fn projected(&self) -> bool {
        self.prefix_projection == Some(true) && !self.inference_mode
    }

    /// Fills the model-describing fields from the model, as PEFT's
    /// `_prepare_prompt_learning_config` does, or checks them when the
    /// config (e.g. one read from a file) already has them.
    /// `layers`: attention layers; `d_model`: embedding width; `heads`,
    /// `head_dim`: of the keys/values (prefix tuning uses `kv_heads · head_dim`).
    pub fn fill_from_model(&mut self, layers: usize, token_dim: usize, heads: usize) -> Result<()> {
        let fill = |name: &str, slot: &mut Option<usize>, value: usize| match *slot {
            None => {
                *slot = Some(value);
                Ok(())
            }
            Some(v) if v == value => Ok(()),
            Some(v) => Err(PeftError::Shape {
                name: format!("{name} (adapter vs model)"),
                expected: vec![value],
                found: vec![v],
            }),
        };
        fill("num_layers", &mut self.num_layers, layers)?;
        fill("token_dim", &mut self.token_dim, token_dim)?;
        fill("num_attention_heads", &mut self.num_attention_heads, heads)?;
        fill(
            "num_transformer_submodules",
            &mut self.num_transformer_submodules,
            1,
        )?;
        self.validate()
    }

    /// The shape of the saved `prompt_embeddings` (model fields filled).
    pub fn embedding_shape(&self) -> [usize; 2] {
        let d = self.token_dim.unwrap_or(0);
        match self.peft_type {
            PromptLearningType::PrefixTuning => [
                self.num_virtual_tokens,
                self.num_layers.unwrap_or(0) * 2 * d,
            ],
            _ => [
                self.num_virtual_tokens * self.num_transformer_submodules.unwrap_or(1),
                d,
            ],
        }
    }
}

/// Writes a prompt-learning adapter: `config` (saved with
/// `inference_mode: true`, as PEFT does) and `prompt_embeddings`, each file
/// atomically, weights first so a config on disk always has its weights.
pub fn save_prompt_adapter(
    dir: &Path,
    config: &PromptLearningConfig,
    embeddings: HostTensor,
    copies: &[(String, HostTensor)],
) -> Result<()> {
    let expected = config.embedding_shape();
    if embeddings.shape != expected {
        return Err(PeftError::Shape {
            name: EMBEDDINGS_KEY.into(),
            expected: expected.to_vec(),
            found: embeddings.shape.clone(),
        });
    }
    let mut config = config.clone();
    config.inference_mode = true;
    let mut tensors = vec![(EMBEDDINGS_KEY.to_string(), embeddings)];
    tensors.extend_from_slice(copies);
    write_adapter_files(dir, &tensors, &config.to_json_string())
}

/// Reads a prompt-learning adapter folder of a type in `expected`: its config and
/// its `prompt_embeddings`, checked against the config (shape, finiteness,
/// no other tensors).
pub fn load_prompt_adapter(
    dir: &Path,
    expected: &[PromptLearningType],
) -> Result<(PromptLearningConfig, HostTensor)> {
    let (config, embeddings, rest) = load_prompt_adapter_parts(dir, expected)?;
    ensure_consumed(rest, &dir.join(WEIGHTS_FILE))?;
    Ok((config, embeddings))
}

/// [`load_prompt_adapter`], leaving the file's other tensors (the copies
/// of `modules_to_save`, finite) to the caller, which must consume them.
pub fn load_prompt_adapter_parts(
    dir: &Path,
    expected: &[PromptLearningType],
) -> Result<(
    PromptLearningConfig,
    HostTensor,
    HashMap<String, HostTensor>,
)> {
    let config = PromptLearningConfig::from_file(&dir.join(CONFIG_FILE), expected)?;
    let path = dir.join(WEIGHTS_FILE);
    let mut tensors = read_safetensors(&path)?;
    let embeddings = tensors
        .remove(EMBEDDINGS_KEY)
        .ok_or_else(|| PeftError::MissingTensor {
            path: path.clone(),
            key: EMBEDDINGS_KEY.into(),
        })?;
    for (k, t) in &tensors {
        t.check_finite(k, &path)?;
    }
    embeddings.check_finite(EMBEDDINGS_KEY, &path)?;
    let [rows, cols] = match embeddings.shape[..] {
        [r, c] => [r, c],
        _ => {
            return Err(PeftError::Checkpoint {
                path,
                message: format!(
                    "prompt_embeddings must be 2-D, has shape {:?}",
                    embeddings.shape
                ),
            })
        }
    };
    if rows != config.num_virtual_tokens * config.num_transformer_submodules.unwrap_or(1) {
        return Err(PeftError::Checkpoint {
            path,
            message: format!(
                "prompt_embeddings has {rows} rows but num_virtual_tokens is {}",
                config.num_virtual_tokens
            ),
        });
    }
    if config.token_dim.is_some() && config.embedding_shape() != [rows, cols] {
        return Err(PeftError::Checkpoint {
            path,
            message: format!(
                "prompt_embeddings has shape {:?} but the config says {:?}",
                embeddings.shape,
                config.embedding_shape()
            ),
        });
    }
    Ok((config, embeddings, tensors))
}

/// The trainable part of one prompt-learning adapter (a prefix, a soft
/// prompt, a P-tuning encoder): what a training loop, a checkpoint and
/// PEFT's file need from it, whichever method it belongs to.
///
/// Invariant: [`prompt_embeddings`](Self::prompt_embeddings) has the shape
/// [`PromptLearningConfig::embedding_shape`] of the config the encoder was
/// built for, and [`from_embeddings`](Self::from_embeddings) of it gives an
/// encoder with the same output.
pub trait VirtualTokenEncoder<B: burn::tensor::backend::Backend>:
    burn::module::Module<B> + Sized
{
    /// The `peft_type`s whose files this encoder reads.
    const PEFT_TYPES: &'static [PromptLearningType];

    /// Number of virtual tokens.
    fn num_virtual_tokens(&self) -> usize;

    /// `[n_virtual, width]`, through the reparameterisation when there is
    /// one: what PEFT saves as `prompt_embeddings`.
    fn prompt_embeddings(&self) -> burn::tensor::Tensor<B, 2>;

    /// Whether the encoder holds a reparameterisation (a prefix projection,
    /// a P-tuning MLP or LSTM) that the saved `prompt_embeddings` fold away:
    /// a run that is to continue must keep [`torch_state`](Self::torch_state).
    fn is_reparameterised(&self) -> bool;

    /// The encoder as PyTorch's `state_dict()` names and lays it out.
    fn torch_state(&self) -> Vec<(String, HostTensor)>;

    /// An encoder from [`torch_state`](Self::torch_state)'s tensors, every
    /// one used; `path` names their source in errors.
    fn from_torch_state(
        config: &PromptLearningConfig,
        tensors: HashMap<String, HostTensor>,
        path: &Path,
        device: &B::Device,
    ) -> Result<Self>;

    /// A folded encoder holding saved `prompt_embeddings`.
    fn from_embeddings(
        config: &PromptLearningConfig,
        embeddings: &HostTensor,
        device: &B::Device,
    ) -> Result<Self>;

    /// Writes PEFT's adapter files for this encoder into `dir` (folded), and
    /// beside them, when the encoder is reparameterised, its full state as
    /// [`ENCODER_STATE_FILE`] (PEFT's file cannot continue training).
    fn save(&self, dir: &Path, config: &PromptLearningConfig) -> Result<()> {
        if self.is_reparameterised() {
            write_atomic(
                &dir.join(ENCODER_STATE_FILE),
                &serialize_safetensors(&self.torch_state(), None),
            )?;
        }
        save_prompt_adapter(
            dir,
            config,
            HostTensor::from_tensor(self.prompt_embeddings()),
            &[],
        )
    }

    /// Reads an adapter folder written by [`save`](Self::save) (or by PEFT)
    /// to continue training: the full encoder from [`ENCODER_STATE_FILE`]
    /// when the folder has one, else the folded `prompt_embeddings` (which
    /// then train directly). `config` is the folder's, model fields filled.
    fn load_to_train(
        dir: &Path,
        config: &PromptLearningConfig,
        device: &B::Device,
    ) -> Result<Self> {
        let state = dir.join(ENCODER_STATE_FILE);
        if state.is_file() {
            let mut config = config.clone();
            config.inference_mode = false;
            return Self::from_torch_state(&config, read_safetensors(&state)?, &state, device);
        }
        // The file's copies of layers (modules_to_save) are the wrapper's.
        let (_, embeddings, _) = load_prompt_adapter_parts(dir, Self::PEFT_TYPES)?;
        Self::from_embeddings(config, &embeddings, device)
    }
}

/// Beside a reparameterised adapter's PEFT files: the unfolded encoder
/// (PyTorch's `state_dict` names), from which training continues. PEFT's own
/// file holds only the folded `prompt_embeddings`.
pub const ENCODER_STATE_FILE: &str = "encoder_state.safetensors";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_files_parse_and_round_trip() {
        let text = r#"{"auto_mapping": null, "base_model_name_or_path": null,
            "encoder_hidden_size": 12, "inference_mode": true, "init_weights": null,
            "modules_to_save": null, "num_attention_heads": 2, "num_layers": 2,
            "num_transformer_submodules": 1, "num_virtual_tokens": 3,
            "peft_type": "PREFIX_TUNING", "peft_version": "0.21.2",
            "prefix_projection": true, "revision": null, "task_type": "CAUSAL_LM",
            "token_dim": 8}"#;
        let origin = Path::new("adapter_config.json");
        let c =
            PromptLearningConfig::from_json_str(text, origin, &[PromptLearningType::PrefixTuning])
                .unwrap();
        assert_eq!(c.embedding_shape(), [3, 32]);
        assert!(!c.projected(), "a saved (inference-mode) prefix is folded");
        let back: Value = serde_json::from_str(&c.to_json_string()).unwrap();
        assert_eq!(back["peft_version"], "0.21.2", "unknown keys are kept");
        assert_eq!(back["peft_type"], "PREFIX_TUNING");
        assert!(back.get("prompt_tuning_init").is_none());

        let wrong =
            PromptLearningConfig::from_json_str(text, origin, &[PromptLearningType::PromptTuning]);
        assert!(wrong
            .unwrap_err()
            .to_string()
            .contains("is not PROMPT_TUNING"));
        let zero = text.replace("\"num_virtual_tokens\": 3", "\"num_virtual_tokens\": 0");
        let err =
            PromptLearningConfig::from_json_str(&zero, origin, &[PromptLearningType::PrefixTuning])
                .unwrap_err();
        assert!(err.to_string().contains("num_virtual_tokens"), "{err}");
    }

    #[test]
    fn model_fields_are_filled_or_checked() {
        let mut c = PromptLearningConfig::prefix_tuning(4);
        c.fill_from_model(2, 8, 2).unwrap();
        assert_eq!(c.embedding_shape(), [4, 32]);
        let err = c.fill_from_model(3, 8, 2).unwrap_err();
        assert!(err.to_string().contains("num_layers"), "{err}");
        let mut p = PromptLearningConfig::p_tuning(5, PromptEncoderType::Lstm, 6);
        p.fill_from_model(2, 16, 4).unwrap();
        assert_eq!(p.embedding_shape(), [5, 16]);
        let t = PromptLearningConfig::prompt_tuning(3, PromptTuningInit::Text);
        assert!(t.validate().is_err(), "TEXT without text");
    }
}
