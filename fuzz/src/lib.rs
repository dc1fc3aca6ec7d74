//! The bodies of the fuzz targets: each takes arbitrary bytes, writes them
//! where a user's file would be and runs the toolkit's own loader on them.
//! An `Err` is the right answer to a bad file; a panic, an abort or an
//! allocation sized by what a file claims is a bug. Each body says whether
//! the input was accepted, so that the regression test can check that the
//! seeds are valid inputs (and the fuzzer starts from the loaders' success
//! paths, not only their first error).
//!
//! The same file is compiled by `cargo fuzz` (through `fuzz_targets/*.rs`)
//! and by `crates/peft-cli/tests/fuzz_regressions.rs`, which replays every
//! seed and every minimised crash input under `fuzz/corpus/` and
//! `fuzz/regressions/` in the ordinary test suite. It may therefore use only
//! crates that `peft-cli`'s tests also have.

use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor};
use peft_adapter::{AdapterModel, Ia3Model};
use peft_core::generate::CausalLm;
use peft_lora::LoraModel;
use peft_models::bert::Bert;
use peft_models::fixtures::{fixtures_dir, tiny_llama};
use peft_models::gguf::Gguf;
use peft_models::gpt2::Gpt2;
use peft_models::llama::Llama;
use peft_models::tokenizer::Tokenizer;
use peft_prefix::PrefixTuningModel;
use peft_prompt::PromptTuningModel;

type B = NdArray;

/// A target's body: whether it accepted the input.
pub type Body = fn(&[u8]) -> bool;

/// Every target, by the name `cargo fuzz run` takes.
pub const TARGETS: &[(&str, Body)] = &[
    ("adapter_config", adapter_config),
    ("adapter_weights", adapter_weights),
    ("model_checkpoint", model_checkpoint),
    ("gguf", gguf),
    ("tokenizer", tokenizer),
    ("dataset", dataset),
];

/// Puts back the default panic hook in place of libfuzzer-sys's, which
/// aborts at every panic, even one the toolkit catches on purpose (the
/// tokenizer guard around the `tokenizers` crate). A panic that escapes the
/// target still aborts: libfuzzer-sys checks for it after each input.
pub fn unhook_abort() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| drop(std::panic::take_hook()));
}

fn dev() -> <B as burn::tensor::backend::BackendTypes>::Device {
    Default::default()
}

/// A fresh scratch folder for one target in this process.
fn scratch(target: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("peft-fuzz-{target}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

/// `scratch(target)` holding a copy of the files of fixture folder `from`.
fn scratch_copy(target: &str, from: &Path) -> PathBuf {
    let dir = scratch(target);
    for e in std::fs::read_dir(from).expect("fixture folder") {
        let e = e.expect("fixture entry");
        if e.file_type().expect("file type").is_file() {
            std::fs::copy(e.path(), dir.join(e.file_name())).expect("copy fixture");
        }
    }
    dir
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("write fuzz input");
}

/// One token through a causal LM: what a user does right after loading.
fn one_token(model: &impl CausalLm<B>) -> bool {
    let ids = Tensor::<B, 2, Int>::zeros([1, 1], &model.device());
    let _ = model.logits(ids);
    true
}

/// The adapter folders the first input byte chooses between: method, the
/// fixture folder it starts from.
const ADAPTERS: &[(&str, &str)] = &[
    ("lora", "llama/lora"),
    ("dora", "llama/dora_rslora"),
    ("ia3", "llama/ia3"),
    ("prefix", "llama/prefix_proj"),
    ("prompt", "llama/prompt_random"),
    ("ptuning", "llama/ptuning_mlp"),
    ("bottleneck", "bert/bn_seq/a"),
];

/// Loads the adapter folder `dir` as `method` onto its tiny model and, when
/// that succeeds, runs a forward pass through it. Whether it loaded.
fn load_adapter(method: &str, dir: &Path) -> bool {
    let d = dev();
    match method {
        "lora" | "dora" => LoraModel::from_pretrained(tiny_llama::<B>(&d), dir)
            .map(|m| one_token(&m.model))
            .is_ok(),
        "ia3" => Ia3Model::from_pretrained(tiny_llama::<B>(&d), dir)
            .map(|m| one_token(&m.model))
            .is_ok(),
        "prefix" => PrefixTuningModel::from_pretrained(tiny_llama::<B>(&d), dir)
            .map(|m| m.forward(Tensor::zeros([1, 1], &d), None))
            .is_ok(),
        "prompt" | "ptuning" => PromptTuningModel::from_pretrained(tiny_llama::<B>(&d), dir)
            .map(|m| m.forward(Tensor::zeros([1, 1], &d), None))
            .is_ok(),
        "bottleneck" => {
            let Ok(bert) = Bert::<B>::load(&fixtures_dir().join("bert"), &d) else {
                panic!("the BERT fixture loads");
            };
            let mut m = AdapterModel::wrap(bert);
            m.load_adapter(dir, None).is_ok() && m.forward(Tensor::zeros([1, 2], &d), None).is_ok()
        }
        other => unreachable!("no adapter method {other}"),
    }
}

/// Splits off the first byte as a choice among `n`.
fn choose(data: &[u8], n: usize) -> Option<(usize, &[u8])> {
    let (&first, rest) = data.split_first()?;
    Some((first as usize % n, rest))
}

/// `adapter_config.json` (PEFT's or AdapterHub's): byte 0 picks the method,
/// the rest replaces the config of a valid fixture adapter of that method.
pub fn adapter_config(data: &[u8]) -> bool {
    let Some((i, config)) = choose(data, ADAPTERS.len()) else {
        return false;
    };
    let (method, fixture) = ADAPTERS[i];
    let dir = scratch_copy("adapter_config", &fixtures_dir().join(fixture));
    write(&dir.join("adapter_config.json"), config);
    load_adapter(method, &dir)
}

/// Adapter weights (`adapter_model.safetensors`, AdapterHub's
/// `adapter.safetensors`): byte 0 picks the method, the rest replaces the
/// weights of a valid fixture adapter of that method.
pub fn adapter_weights(data: &[u8]) -> bool {
    let Some((i, weights)) = choose(data, ADAPTERS.len()) else {
        return false;
    };
    let (method, fixture) = ADAPTERS[i];
    let dir = scratch_copy("adapter_weights", &fixtures_dir().join(fixture));
    let file = if method == "bottleneck" {
        "adapter.safetensors"
    } else {
        "adapter_model.safetensors"
    };
    write(&dir.join(file), weights);
    load_adapter(method, &dir)
}

/// A Hugging Face model folder: byte 0 picks the architecture (Llama,
/// GPT-2, BERT), bytes 1–2 (little-endian) the length of `config.json`,
/// which follows; the rest is `model.safetensors`.
pub fn model_checkpoint(data: &[u8]) -> bool {
    let Some((arch, rest)) = choose(data, 3) else {
        return false;
    };
    if rest.len() < 2 {
        return false;
    }
    let n = (u16::from_le_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
    let (config, weights) = rest[2..].split_at(n);
    let dir = scratch("model_checkpoint");
    write(&dir.join("config.json"), config);
    write(&dir.join("model.safetensors"), weights);
    let d = dev();
    match arch {
        0 => Llama::<B>::load(&dir, &d).map(|m| one_token(&m)).is_ok(),
        1 => Gpt2::<B>::load(&dir, &d).map(|m| one_token(&m)).is_ok(),
        _ => Bert::<B>::load(&dir, &d)
            .map(|m| m.encode(Tensor::zeros([1, 1], &d), None))
            .is_ok(),
    }
}

/// A GGUF file: the header, metadata and tensor directory, every tensor
/// dequantised, the tokenizer in its metadata, and a Llama built from it
/// (dense, and with its blocks kept quantized).
/// Accepted when every tensor dequantises (and, for a Llama file, the
/// model and its tokenizer load).
pub fn gguf(data: &[u8]) -> bool {
    let dir = scratch("gguf");
    let path = dir.join("model.gguf");
    write(&path, data);
    let Ok(g) = Gguf::open(&path) else {
        return false;
    };
    let names: Vec<String> = g.tensors.iter().map(|t| t.name.clone()).collect();
    let mut accepted = names.iter().all(|name| g.tensor(name).is_ok());
    let is_llama = g.metadata.contains_key("llama.block_count");
    if is_llama {
        accepted &= match Tokenizer::from_gguf(&g) {
            Ok(tok) => tok
                .encode("Call me Ishmael.")
                .and_then(|ids| tok.decode(&ids))
                .is_ok(),
            Err(_) => false,
        };
    }
    drop(g);
    if is_llama {
        accepted &= Llama::<B>::from_gguf(&path, &dev())
            .map(|m| one_token(&m))
            .is_ok();
        // QLoRA's loader: the blocks kept as stored, q/k rows moved whole.
        accepted &= Llama::<B>::from_gguf_quantized(&path, &dev())
            .map(|m| one_token(&m))
            .is_ok();
    }
    accepted
}

/// A `tokenizer.json`, then encoding and decoding text with it.
pub fn tokenizer(data: &[u8]) -> bool {
    let dir = scratch("tokenizer");
    let path = dir.join("tokenizer.json");
    write(&path, data);
    let Ok(tok) = Tokenizer::from_file(&path) else {
        return false;
    };
    let mut accepted = true;
    for text in ["Call me Ishmael.", "", "naïve café — 東京 🙂"] {
        accepted &= tok.encode(text).and_then(|ids| tok.decode(&ids)).is_ok();
    }
    accepted && tok.batch::<B>(&["a b c", "d"], &dev()).is_ok()
}

/// A dataset file for `peft train`: byte 0 picks the format (JSONL, CSV,
/// TSV, plain text), the rest is the file; then labels and the split.
pub fn dataset(data: &[u8]) -> bool {
    let Some((i, body)) = choose(data, 4) else {
        return false;
    };
    let dir = scratch("dataset");
    let ext = ["jsonl", "csv", "tsv", "txt"][i];
    let path = dir.join(format!("data.{ext}"));
    write(&path, body);
    if ext == "txt" {
        return peft_cli::data::read_text(&path)
            .map(|text| {
                let ids: Vec<u32> = text.bytes().map(u32::from).collect();
                peft_cli::data::blocks(&ids, 7)
            })
            .is_ok();
    }
    match peft_cli::data::read_labelled(&path, "text", "label") {
        Ok(examples) => {
            let labels = peft_cli::data::label_set(&examples);
            let _ = peft_cli::data::split(&examples, 0.1, 7);
            peft_cli::data::label_ids(&examples, &labels, &path).is_ok()
        }
        Err(_) => false,
    }
}
