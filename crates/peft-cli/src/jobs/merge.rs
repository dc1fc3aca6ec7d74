//! `peft merge`: an adapter folded into its base, written as a Hugging
//! Face model folder (safetensors, sharded, in the chosen precision).

use std::path::Path;

use burn::tensor::backend::Backend;
use peft_core::io::{read_safetensors, HostTensor};
use peft_core::{PeftError, Result};
use peft_models::bert::Bert;
use peft_models::gpt2::Gpt2;
use peft_models::llama::Llama;
use peft_models::seq_cls::ScoreHead;
use peft_models::tokenizer::Tokenizer;
use serde_json::json;

use crate::tasks::{self, Arch, Method};

/// The element type `peft merge` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeDtype {
    /// 32-bit floats.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
}

impl MergeDtype {
    /// `f32`, `f16` or `bf16`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" | "float32" => Ok(MergeDtype::F32),
            "f16" | "float16" => Ok(MergeDtype::F16),
            "bf16" | "bfloat16" => Ok(MergeDtype::Bf16),
            other => Err(PeftError::Config(format!(
                "unknown dtype `{other}` (f32, f16, bf16)"
            ))),
        }
    }

    /// Its name in messages.
    pub fn name(self) -> &'static str {
        match self {
            MergeDtype::F32 => "f32",
            MergeDtype::F16 => "f16",
            MergeDtype::Bf16 => "bf16",
        }
    }

    /// `t` as a safetensors dtype and little-endian bytes.
    fn encode(self, t: &HostTensor) -> (safetensors::Dtype, Vec<u8>) {
        match self {
            MergeDtype::F32 => (
                safetensors::Dtype::F32,
                t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            MergeDtype::F16 => (
                safetensors::Dtype::F16,
                t.data
                    .iter()
                    .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                    .collect(),
            ),
            MergeDtype::Bf16 => (
                safetensors::Dtype::BF16,
                t.data
                    .iter()
                    .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                    .collect(),
            ),
        }
    }
}

/// The weight files of a Hugging Face model folder: `model.safetensors`, or
/// the shards named by `model.safetensors.index.json` (with the index).
fn weight_files(model: &Path) -> Result<(Vec<String>, Option<serde_json::Value>)> {
    if model.join("model.safetensors").is_file() {
        return Ok((vec!["model.safetensors".into()], None));
    }
    let index_path = model.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index_path).map_err(|_| PeftError::Checkpoint {
        path: model.to_path_buf(),
        message: "merge needs a GGUF file or a Hugging Face folder with model.safetensors or model.safetensors.index.json".into(),
    })?;
    let index: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| PeftError::Json {
            path: index_path.clone(),
            source,
        })?;
    let mut files: Vec<String> = index["weight_map"]
        .as_object()
        .ok_or_else(|| PeftError::Checkpoint {
            path: index_path.clone(),
            message: "no `weight_map` object".into(),
        })?
        .values()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    files.sort();
    files.dedup();
    if let Some(f) = files.iter().find(|f| f.contains('/') || f.contains("..")) {
        return Err(PeftError::Checkpoint {
            path: index_path,
            message: format!("shard name `{f}` leaves the model directory"),
        });
    }
    Ok((files, Some(index)))
}

/// `peft merge`: folds a LoRA / DoRA / (IA)³ adapter into a Hugging Face
/// model folder (one `model.safetensors` or shards with their index) and
/// writes the merged model to `out`: the same files, every tensor that did
/// not change as it was (converted to `dtype`), `config.json` and the
/// tokenizer copied. A GGUF model (Llama) is written as a Hugging Face
/// folder. Returns the names of the tensors that changed.
pub fn merge<B: Backend>(
    model: &Path,
    adapter: &Path,
    out: &Path,
    dtype: MergeDtype,
    device: &B::Device,
) -> Result<Vec<String>> {
    if model.extension().is_some_and(|e| e == "gguf") {
        return merge_gguf::<B>(model, adapter, out, dtype, device);
    }
    let (files, index) = weight_files(model)?;
    let mut target = MergeTarget {
        model,
        adapter,
        out,
        files: &files,
        index: index.as_ref(),
        dtype,
        new_head: None,
    };
    // A SEQ_CLS adapter over a base without its head (MiniLM's bare
    // BertModel, a causal LM's checkpoint): the merged folder is the task
    // model its training ran.
    match tasks::arch_of(model)? {
        Arch::Llama => {
            let (llama, head) =
                with_adapters_score(Llama::load(model, device)?, model, adapter, "Llama")?;
            target.new_head = head;
            merge_into::<B, Llama<B>>(llama, &target, |_| true)
        }
        Arch::Bert => {
            let mut bert = Bert::load(model, device)?;
            if let (None, Some(n)) = (&bert.classifier, tasks::head_labels(adapter, "classifier")?)
            {
                bert = bert.with_classifier(n)?;
                target.new_head = Some(NewHead::new(adapter, n, "BertForSequenceClassification")?);
            }
            merge_into::<B, Bert<B>>(bert, &target, |_| true)
        }
        // GPT-2's Conv1D stores [in, out], as Burn does; its `score` head
        // (GPT2ForSequenceClassification) is an nn.Linear, [out, in].
        Arch::Gpt2 => {
            let (gpt2, head) =
                with_adapters_score(Gpt2::load(model, device)?, model, adapter, "GPT2")?;
            target.new_head = head;
            merge_into::<B, Gpt2<B>>(gpt2, &target, |path| path == "score")
        }
    }
}

/// What [`merge`] reads and writes.
struct MergeTarget<'a> {
    model: &'a Path,
    adapter: &'a Path,
    out: &'a Path,
    files: &'a [String],
    index: Option<&'a serde_json::Value>,
    dtype: MergeDtype,
    /// The head a SEQ_CLS adapter brings to a base without one.
    new_head: Option<NewHead>,
}

/// `decoder` with the `score` head of the SEQ_CLS adapter in `adapter`,
/// and the head it gains as a `{family}ForSequenceClassification`, when
/// the decoder has no `score` of its own and the adapter a copy of one;
/// else `decoder` as it is.
///
/// Where the base names no `pad_token_id`, the new config names the
/// tokenizer's padding id (the one our batches are padded with): without
/// one, transformers (and `peft eval`) refuse to classify more than one row.
fn with_adapters_score<B: Backend, M: ScoreHead<B>>(
    decoder: M,
    model: &Path,
    adapter: &Path,
    family: &str,
) -> Result<(M, Option<NewHead>)> {
    match (decoder.score(), tasks::head_labels(adapter, "score")?) {
        (None, Some(n)) => {
            let architecture = format!("{family}ForSequenceClassification");
            let mut head = NewHead::new(adapter, n, &architecture)?;
            if decoder.pad_token_id().is_none() {
                let pad = tasks::tokenizer_of(model)?.pad_id();
                head.config.insert("pad_token_id".into(), json!(pad));
            }
            Ok((decoder.with_score(n)?, Some(head)))
        }
        _ => Ok((decoder, None)),
    }
}

/// A classification head that the merged model gains (a SEQ_CLS adapter's
/// copy of it, over a base checkpoint that has none): the base's keys move
/// under the task model's prefix where they lack it, a causal LM's
/// `lm_head` is left out, the head's tensors join the last file, and
/// `config.json` names the task model, its classes and its problem type,
/// so that transformers' `AutoModelForSequenceClassification` loads the
/// folder as it is.
struct NewHead {
    /// The task model's prefix for the base's keys (`bert.`,
    /// `transformer.`; a Llama's `model.` keys stay as they are).
    prefix: &'static str,
    /// The head's module name (`classifier`, `score`).
    module: &'static str,
    /// Fields set in `config.json`.
    config: serde_json::Map<String, serde_json::Value>,
}

impl NewHead {
    /// `architecture` (a `*ForSequenceClassification`) with `n` classes:
    /// named by the adapter folder's `labels.json` (our runs), else
    /// `LABEL_i`; its problem type the run's `task.json`, else
    /// transformers' inference.
    fn new(adapter: &Path, n: usize, architecture: &str) -> Result<Self> {
        let names = tasks::class_names(Some(adapter), n)?;
        let problem =
            tasks::ProblemType::of_adapter(Some(adapter), n, tasks::ProblemType::SingleLabel)?;
        let id2label: serde_json::Map<String, serde_json::Value> = names
            .iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), json!(l)))
            .collect();
        let label2id: serde_json::Map<String, serde_json::Value> = names
            .iter()
            .enumerate()
            .map(|(i, l)| (l.clone(), json!(i)))
            .collect();
        let config = json!({
            "architectures": [architecture],
            "id2label": id2label,
            "label2id": label2id,
            "problem_type": problem.name(),
        });
        let (prefix, module) = match architecture {
            "BertForSequenceClassification" => ("bert.", "classifier"),
            "GPT2ForSequenceClassification" => ("transformer.", "score"),
            _ => ("", "score"),
        };
        Ok(NewHead {
            prefix,
            module,
            config: config.as_object().cloned().unwrap_or_default(),
        })
    }

    /// A base checkpoint's key in the task model; `None` for the causal
    /// LM's head, which the task model does not have.
    fn key(&self, key: String) -> Option<String> {
        if key.starts_with("lm_head.") {
            return None;
        }
        Some(match key.starts_with(self.prefix) {
            true => key,
            false => format!("{}{key}", self.prefix),
        })
    }
}

/// `base` with the LoRA / DoRA / (IA)³ adapter in `adapter` folded in.
fn merged_model<B: Backend, M: peft_core::PeftModel<B> + Clone>(
    base: M,
    adapter: &Path,
) -> Result<M> {
    let merged = match Method::detect(adapter)? {
        Method::Slot(_) => tasks::Slots::from_pretrained(base, adapter)?.merge_and_unload()?,
        other => {
            return Err(PeftError::Config(format!(
                "{} adds modules or inputs; it cannot be merged into the base weights",
                other.name()
            )))
        }
    };
    // A copy of a tied embedding that leaves the head on the base table
    // makes two matrices where the checkpoint's format has one.
    let mut split = None;
    merged.visit_embeddings(&mut |path, slot| {
        if slot.head_base.is_some() {
            split.get_or_insert(path.to_string());
        }
    });
    match split {
        Some(path) => Err(PeftError::Config(format!(
            "{}: the adapter's copy of `{path}` replaces the input embedding but not the output \
             head tied to it (modules_to_save without ensure_weight_tying), so the merged model \
             has two tables where the checkpoint ties one; keep it as an adapter",
            adapter.display()
        ))),
        None => Ok(merged),
    }
}

/// Writes `tensors` to `path` as a safetensors file of `dtype`; returns the
/// size of the tensor data in bytes (an index's `total_size`).
fn write_weights(
    path: &Path,
    tensors: &[(String, HostTensor)],
    dtype: MergeDtype,
) -> Result<usize> {
    let encoded: Vec<(safetensors::Dtype, Vec<u8>)> =
        tensors.iter().map(|(_, x)| dtype.encode(x)).collect();
    let views = tensors
        .iter()
        .zip(&encoded)
        .map(|((k, x), (dt, bytes))| {
            safetensors::tensor::TensorView::new(*dt, x.shape.clone(), bytes)
                .map(|v| (k.clone(), v))
                .map_err(|e| PeftError::State(format!("{k}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::tensor::serialize(views, Some(metadata))
        .map_err(|e| PeftError::State(format!("serialising {}: {e}", path.display())))?;
    peft_core::io::write_atomic(path, &bytes)?;
    Ok(encoded.iter().map(|(_, b)| b.len()).sum())
}

/// The base's `config.json` with the task model's fields set.
fn task_config(bytes: &[u8], head: &NewHead, path: &Path) -> Result<Vec<u8>> {
    let mut config: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|source| PeftError::Json {
            path: path.to_path_buf(),
            source,
        })?;
    let Some(fields) = config.as_object_mut() else {
        return Err(PeftError::Checkpoint {
            path: path.to_path_buf(),
            message: "not a JSON object".into(),
        });
    };
    fields.extend(head.config.clone());
    Ok(serde_json::to_string_pretty(&config)
        .expect("a config serialises")
        .into_bytes())
}

/// A Llama's tensors under Hugging Face's names and layout (`[out, in]`).
fn llama_hf_tensors<B: Backend>(m: &Llama<B>) -> Vec<(String, HostTensor)> {
    use peft_core::PeftModel;
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        HostTensor::from_tensor(m.embed_tokens.weight.val()),
    )];
    m.visit_norms(&mut |path, slot| out.extend(norm_tensors(path, slot)));
    m.visit_linears(&mut |path, slot| {
        out.push((
            format!("{path}.weight"),
            HostTensor::from_tensor(slot.base_weight()).transposed(),
        ));
        if let Some(b) = &slot.base.bias {
            out.push((format!("{path}.bias"), HostTensor::from_tensor(b.val())));
        }
    });
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// `peft merge` of a GGUF model: the adapter folded into the dequantised
/// weights, written as a Hugging Face folder (`model.safetensors` of
/// `dtype` and a `config.json` from the GGUF metadata, the tokenizer as
/// `tokenizer.json`); with a SEQ_CLS adapter's `score`, the
/// `LlamaForSequenceClassification` it trained.
fn merge_gguf<B: Backend>(
    gguf: &Path,
    adapter: &Path,
    out: &Path,
    dtype: MergeDtype,
    device: &B::Device,
) -> Result<Vec<String>> {
    // A SEQ_CLS adapter's `score` copy makes the folder the
    // LlamaForSequenceClassification its training ran.
    let (base, new_head) =
        with_adapters_score(Llama::<B>::from_gguf(gguf, device)?, gguf, adapter, "Llama")?;
    let before = llama_hf_tensors(&base);
    let merged = merged_model(base, adapter)?;
    let after = llama_hf_tensors(&merged);
    let changed: Vec<String> = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| b.1 != a.1)
        .map(|(_, a)| a.0.clone())
        .collect();
    if changed.is_empty() {
        return Err(PeftError::State(format!(
            "merging {} changed no weight of {}",
            adapter.display(),
            gguf.display()
        )));
    }
    let c = &merged.config;
    let theta = c
        .rope_theta
        .or(c.rope_parameters.as_ref().map(|r| r.rope_theta))
        .unwrap_or(10_000.0);
    let context = peft_models::gguf::Gguf::open(gguf)?
        .meta_u64("llama.context_length")
        .unwrap_or(2048);
    let mut config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.kv_heads(),
        "head_dim": c.head_dim(),
        "hidden_act": "silu",
        "max_position_embeddings": context,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.attention_bias,
        "mlp_bias": c.mlp_bias,
        "torch_dtype": match dtype {
            MergeDtype::F32 => "float32",
            MergeDtype::F16 => "float16",
            MergeDtype::Bf16 => "bfloat16",
        },
    });
    if let (Some(h), Some(fields)) = (&new_head, config.as_object_mut()) {
        fields.extend(h.config.clone());
    }
    std::fs::create_dir_all(out).map_err(|source| PeftError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    write_weights(&out.join("model.safetensors"), &after, dtype)?;
    // The tokenizer lives in the GGUF metadata; the folder gets its own.
    let tokenizer = Tokenizer::from_gguf(&peft_models::gguf::Gguf::open(gguf)?)?;
    peft_core::io::write_atomic(&out.join("tokenizer.json"), tokenizer.to_json()?.as_bytes())?;
    peft_core::io::write_atomic(
        &out.join("config.json"),
        serde_json::to_string_pretty(&config)
            .expect("a config serialises")
            .as_bytes(),
    )?;
    Ok(changed)
}

/// [`merge`] into a Hugging Face folder: the merged linears replace their
/// keys in the checkpoint's files; `transpose(path)` says which layers the
/// file stores `[out, in]` (not GPT-2's Conv1D).
fn merge_into<B: Backend, M: peft_core::PeftModel<B> + Clone>(
    base: M,
    t: &MergeTarget<'_>,
    transpose: impl Fn(&str) -> bool,
) -> Result<Vec<String>> {
    let merged = merged_model(base, t.adapter)?;
    // The merged linears, under their checkpoint keys.
    let mut updates = std::collections::HashMap::new();
    merged.visit_linears(&mut |path, slot| {
        let mut w = HostTensor::from_tensor(slot.base_weight());
        if transpose(path) {
            w = w.transposed();
        }
        updates.insert(format!("{path}.weight"), w);
        if let Some(b) = &slot.base.bias {
            updates.insert(format!("{path}.bias"), HostTensor::from_tensor(b.val()));
        }
    });
    // Norm layers (an LN tuning adapter's merge swaps its copies in) and
    // embedding tables (copies, retrained tokens).
    merged.visit_norms(&mut |path, slot| updates.extend(norm_tensors(path, slot)));
    merged.visit_embeddings(&mut |path, slot| {
        updates.insert(
            format!("{path}.weight"),
            HostTensor::from_tensor(slot.weight.val()),
        );
    });
    std::fs::create_dir_all(t.out).map_err(|source| PeftError::Io {
        path: t.out.to_path_buf(),
        source,
    })?;
    let mut changed = Vec::new();
    let mut total_size = 0usize;
    let key_of = |key: String| match &t.new_head {
        Some(h) => h.key(key),
        None => Some(key),
    };
    // The new head's tensors, written into the last file.
    let head_keys: Vec<String> = match &t.new_head {
        Some(h) => ["weight", "bias"]
            .iter()
            .map(|p| format!("{}.{p}", h.module))
            .filter(|k| updates.contains_key(k))
            .collect(),
        None => Vec::new(),
    };
    for (i, name) in t.files.iter().enumerate() {
        let file = t.model.join(name);
        let mut tensors: Vec<(String, HostTensor)> = read_safetensors(&file)?
            .into_iter()
            .filter_map(|(k, v)| Some((key_of(k)?, v)))
            .collect();
        if i + 1 == t.files.len() {
            for k in &head_keys {
                tensors.push((k.clone(), updates[k].clone()));
                changed.push(k.clone());
            }
        }
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, tensor) in &mut tensors {
            // Keys absent from the model (e.g. a head tied to the embeddings) stay.
            let Some(new) = updates.get(key) else {
                continue;
            };
            if new.shape != tensor.shape {
                return Err(PeftError::Shape {
                    name: key.clone(),
                    expected: tensor.shape.clone(),
                    found: new.shape.clone(),
                });
            }
            if new != tensor {
                changed.push(key.clone());
                *tensor = new.clone();
            }
        }
        total_size += write_weights(&t.out.join(name), &tensors, t.dtype)?;
    }
    if changed.is_empty() {
        return Err(PeftError::State(format!(
            "merging {} changed no tensor of {}: the adapter's module names do not match the checkpoint's keys",
            t.adapter.display(),
            t.model.display()
        )));
    }
    if let Some(index) = t.index {
        let mut index = index.clone();
        index["metadata"]["total_size"] = json!(total_size);
        if let (Some(map), Some(last)) = (index["weight_map"].as_object(), t.files.last()) {
            let mut renamed: serde_json::Map<String, serde_json::Value> = map
                .iter()
                .filter_map(|(k, v)| Some((key_of(k.clone())?, v.clone())))
                .collect();
            for k in &head_keys {
                renamed.insert(k.clone(), json!(last));
            }
            index["weight_map"] = serde_json::Value::Object(renamed);
        }
        peft_core::io::write_atomic(
            &t.out.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index)
                .expect("an index serialises")
                .as_bytes(),
        )?;
    }
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ] {
        if t.model.join(f).is_file() {
            let mut bytes = std::fs::read(t.model.join(f)).map_err(|source| PeftError::Io {
                path: t.model.join(f),
                source,
            })?;
            if let (Some(head), "config.json") = (&t.new_head, f) {
                bytes = task_config(&bytes, head, &t.model.join(f))?;
            }
            peft_core::io::write_atomic(&t.out.join(f), &bytes)?;
        }
    }
    changed.sort();
    Ok(changed)
}

/// A norm layer's base parameters under Hugging Face's names
/// (`<path>.weight`, and `<path>.bias` for a LayerNorm).
fn norm_tensors<B: Backend>(
    path: &str,
    slot: &peft_core::NormSlot<B>,
) -> Vec<(String, HostTensor)> {
    let mut out = vec![(
        format!("{path}.weight"),
        HostTensor::from_tensor(slot.weight.val()),
    )];
    if let Some(b) = &slot.bias {
        out.push((format!("{path}.bias"), HostTensor::from_tensor(b.val())));
    }
    out
}
