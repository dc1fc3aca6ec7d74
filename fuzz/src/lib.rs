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
use std::sync::OnceLock;

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor};
use peft_adapter::model::{FUSION_CONFIG_FILE, FUSION_WEIGHTS_FILE};
use peft_adapter::{AdapterModel, Ia3Model, Setup};
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
    ("fusion", fusion),
    ("shard_index", shard_index),
    ("head", head),
    ("adapterhub_head", adapterhub_head),
    ("run_state", run_state),
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
/// fixture folder it starts from (whose first component names the tiny
/// model it loads onto).
const ADAPTERS: &[(&str, &str)] = &[
    ("lora", "llama/lora"),
    ("dora", "llama/dora_rslora"),
    ("ia3", "llama/ia3"),
    ("prefix", "llama/prefix_proj"),
    ("prompt", "llama/prompt_random"),
    ("ptuning", "llama/ptuning_mlp"),
    ("bottleneck", "bert/bn_seq/a"),
    ("lora", "gpt2/lora"),
    ("dora", "gpt2/dora"),
    ("ia3", "gpt2/ia3"),
    ("prefix", "gpt2/prefix"),
    ("prompt", "gpt2/prompt_vocab"),
    ("ptuning", "gpt2/ptuning_lstm"),
    ("lora", "bert/lora"),
    ("dora", "bert/dora"),
    ("ia3", "bert/ia3"),
    ("bottleneck", "gpt2/bn_seq_gpt2/a"),
];

/// Loads the slot-method (LoRA, DoRA, (IA)³) adapter folder `dir` onto
/// `model` and, when that succeeds, runs `forward` through it. Whether it
/// loaded.
fn load_slot_adapter<M: peft_core::PeftModel<B>>(
    method: &str,
    model: M,
    dir: &Path,
    forward: impl Fn(&M) -> bool,
) -> bool {
    match method {
        "lora" | "dora" => LoraModel::from_pretrained(model, dir)
            .map(|m| forward(&m.model))
            .is_ok(),
        "ia3" => Ia3Model::from_pretrained(model, dir)
            .map(|m| forward(&m.model))
            .is_ok(),
        other => unreachable!("no slot method {other}"),
    }
}

/// Loads the adapter folder `dir` as `method` onto the tiny model of
/// `arch` and, when that succeeds, runs a forward pass through it. Whether
/// it loaded.
fn load_adapter(method: &str, arch: &str, dir: &Path) -> bool {
    let d = dev();
    let gpt2 = || match Gpt2::<B>::load(&fixtures_dir().join("gpt2"), &d) {
        Ok(m) => m,
        Err(e) => panic!("the GPT-2 fixture loads: {e}"),
    };
    let bert = || match Bert::<B>::load(&fixtures_dir().join("bert"), &d) {
        Ok(m) => m,
        Err(e) => panic!("the BERT fixture loads: {e}"),
    };
    let encode = |m: &Bert<B>| {
        m.encode(Tensor::zeros([1, 2], &d), None);
        true
    };
    match (method, arch) {
        ("lora" | "dora" | "ia3", "llama") => {
            load_slot_adapter(method, tiny_llama::<B>(&d), dir, one_token)
        }
        ("lora" | "dora" | "ia3", "gpt2") => load_slot_adapter(method, gpt2(), dir, one_token),
        ("lora" | "dora" | "ia3", "bert") => load_slot_adapter(method, bert(), dir, encode),
        ("prefix", "llama") => PrefixTuningModel::from_pretrained(tiny_llama::<B>(&d), dir)
            .map(|m| m.forward(Tensor::zeros([1, 1], &d), None))
            .is_ok(),
        ("prefix", "gpt2") => PrefixTuningModel::from_pretrained(gpt2(), dir)
            .map(|m| m.forward(Tensor::zeros([1, 1], &d), None))
            .is_ok(),
        ("prompt" | "ptuning", "llama") => {
            PromptTuningModel::from_pretrained(tiny_llama::<B>(&d), dir)
                .map(|m| m.forward(Tensor::zeros([1, 1], &d), None))
                .is_ok()
        }
        ("prompt" | "ptuning", "gpt2") => PromptTuningModel::from_pretrained(gpt2(), dir)
            .map(|m| m.forward(Tensor::zeros([1, 1], &d), None))
            .is_ok(),
        ("bottleneck", "bert") => {
            let mut m = AdapterModel::wrap(bert());
            m.load_adapter(dir, None).is_ok() && m.forward(Tensor::zeros([1, 2], &d), None).is_ok()
        }
        ("bottleneck", "gpt2") => {
            let mut m = AdapterModel::wrap(gpt2());
            m.load_adapter(dir, None).is_ok() && m.forward(Tensor::zeros([1, 2], &d), None).is_ok()
        }
        other => unreachable!("no adapter case {other:?}"),
    }
}

/// The model a fixture adapter folder belongs to: its first component.
fn arch_of(fixture: &str) -> &str {
    fixture.split('/').next().unwrap_or(fixture)
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
    load_adapter(method, arch_of(fixture), &dir)
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
    load_adapter(method, arch_of(fixture), &dir)
}

/// Loads the Hugging Face folder `dir` as architecture `arch` (0 Llama,
/// 1 GPT-2, else BERT) and runs one token through it. Whether it loaded.
fn load_model(arch: usize, dir: &Path) -> bool {
    let d = dev();
    match arch {
        0 => Llama::<B>::load(dir, &d).map(|m| one_token(&m)).is_ok(),
        1 => Gpt2::<B>::load(dir, &d).map(|m| one_token(&m)).is_ok(),
        _ => Bert::<B>::load(dir, &d)
            .map(|m| m.encode(Tensor::zeros([1, 1], &d), None))
            .is_ok(),
    }
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
    load_model(arch, &dir)
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

/// An AdapterHub fusion folder over the fixture's adapters `a` and `b`
/// (`fixtures/bert/bn_compose`): byte 0 picks the file the rest replaces
/// (`adapter_fusion_config.json`, `model_adapter_fusion.safetensors`);
/// then the fusion is loaded and run.
pub fn fusion(data: &[u8]) -> bool {
    let Some((i, file)) = choose(data, 2) else {
        return false;
    };
    let root = fixtures_dir().join("bert/bn_compose");
    let dir = scratch_copy("fusion", &root.join("fusion"));
    write(
        &dir.join([FUSION_CONFIG_FILE, FUSION_WEIGHTS_FILE][i]),
        file,
    );
    let d = dev();
    let Ok(bert) = Bert::<B>::load(&fixtures_dir().join("bert"), &d) else {
        panic!("the BERT fixture loads");
    };
    let mut m = AdapterModel::wrap(bert);
    for name in ["a", "b"] {
        if m.load_adapter(&root.join(name), None).is_err() {
            panic!("fixture adapter {name} loads");
        }
    }
    let Ok(name) = m.load_fusion(&dir) else {
        return false;
    };
    let children = name.split(',').map(Setup::single).collect();
    m.set_active(Setup::Fuse(children)).is_ok()
        && m.forward(Tensor::zeros([1, 2], &d), None).is_ok()
}

/// Shard names of [`shard_index`]'s folders.
const SHARDS: [&str; 2] = [
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
];

/// A sharded Hugging Face checkpoint: byte 0 picks the architecture
/// (Llama, GPT-2, BERT); the rest is `model.safetensors.index.json`, beside
/// the fixture model's `config.json` and its tensors split into two shards
/// (alternately, in name order). Then the model loads and runs.
pub fn shard_index(data: &[u8]) -> bool {
    let Some((arch, index)) = choose(data, 3) else {
        return false;
    };
    let name = ["llama", "gpt2", "bert"][arch];
    let from = fixtures_dir().join(name);
    let dir = scratch("shard_index");
    std::fs::copy(from.join("config.json"), dir.join("config.json")).expect("copy config");
    let Ok(tensors) = peft_core::io::read_safetensors(&from.join("model.safetensors")) else {
        panic!("the {name} fixture reads");
    };
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for (k, shard) in SHARDS.iter().enumerate() {
        let part: Vec<(String, peft_core::io::HostTensor)> = names
            .iter()
            .skip(k)
            .step_by(2)
            .map(|n| (n.to_string(), tensors[*n].clone()))
            .collect();
        write(
            &dir.join(shard),
            &peft_core::io::serialize_safetensors(&part, None),
        );
    }
    write(&dir.join("model.safetensors.index.json"), index);
    load_model(arch, &dir)
}

/// The input width of [`head`]'s heads (the BERT fixture's hidden size).
const HEAD_INPUTS: usize = 16;

/// A sequence-classification run's head files: byte 0 picks the file the
/// rest replaces (`head.safetensors`, `labels.json`) in a folder holding a
/// valid pair (two labels); then both are read as `peft eval` reads them
/// and the head classifies one row.
pub fn head(data: &[u8]) -> bool {
    let Some((i, file)) = choose(data, 2) else {
        return false;
    };
    let dir = scratch("head");
    let d = dev();
    let valid = peft_cli::tasks::new_head::<B>(HEAD_INPUTS, 2, &d);
    if peft_cli::tasks::save_head(&valid, &dir).is_err() {
        panic!("a head saves");
    }
    write(&dir.join("labels.json"), br#"["negative", "positive"]"#);
    write(&dir.join(["head.safetensors", "labels.json"][i]), file);
    let Ok(labels) = peft_cli::tasks::read_labels(&dir) else {
        return false;
    };
    let Ok(head) = peft_cli::tasks::load_head::<B>(&dir, HEAD_INPUTS, labels.len(), &d) else {
        return false;
    };
    let logits = head.forward(Tensor::<B, 2>::zeros([1, HEAD_INPUTS], &d));
    let class = logits.argmax(1).into_scalar() as usize;
    class < labels.len()
}

/// The AdapterHub adapters with heads of `fixtures/bert/bn_heads`
/// (classification, multi-label through the pooler, tagging, regression).
const HUB_HEADS: [&str; 4] = ["cls", "multi", "tag", "reg"];

/// An AdapterHub adapter folder with a prediction head: byte 0 picks the
/// file the rest replaces (`head_config.json`, `model_head.safetensors`),
/// byte 1 the fixture folder ([`HUB_HEADS`]); then the adapter and its head
/// load onto the BERT fixture and the head's logits of one row are
/// computed: finite, of the config's width.
pub fn adapterhub_head(data: &[u8]) -> bool {
    use peft_adapter::head::{HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE};
    let Some((i, rest)) = choose(data, 2) else {
        return false;
    };
    let Some((k, file)) = choose(rest, HUB_HEADS.len()) else {
        return false;
    };
    let name = HUB_HEADS[k];
    let from = fixtures_dir().join("bert/bn_heads").join(name);
    let dir = scratch_copy("adapterhub_head", &from);
    write(&dir.join([HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE][i]), file);
    let d = dev();
    let Ok(bert) = Bert::<B>::load(&fixtures_dir().join("bert"), &d) else {
        panic!("the BERT fixture loads");
    };
    let mut m = AdapterModel::wrap(bert);
    let Ok(loaded) = m.load_adapter(&dir, None) else {
        return false;
    };
    if m.set_active(Setup::single(&loaded)).is_err() || m.active_head().is_none() {
        return false;
    }
    let Ok(config) = m.head_config(&loaded).cloned() else {
        return false;
    };
    let ids = Tensor::<B, 2, Int>::zeros([1, 3], &d);
    let logits = match m.forward_head(ids, None) {
        Ok(peft_adapter::HeadLogits::PerSequence(x)) => x.into_data(),
        Ok(peft_adapter::HeadLogits::PerToken(x)) => x.into_data(),
        Err(_) => return false,
    };
    let values = logits.to_vec::<f32>().unwrap_or_default();
    let width = match config.head_type {
        peft_adapter::HeadType::Tagging => 3 * config.num_labels,
        _ => config.num_labels,
    };
    values.len() == width && values.iter().all(|v| v.is_finite())
}

/// The files of a run's folder that `--resume` reads, in the order byte 0
/// of a [`run_state`] input picks them.
const RUN_FILES: [&str; 3] = [
    "train_config.json",
    "last/trainer_state.json",
    "last/optimizer.bin",
];

/// A run halted after its first of three steps (LoRA on the tiny GGUF
/// Llama, causal LM), made once per process: what [`run_state`] resumes.
/// Also what `fuzz_regressions.rs` writes the run-state seeds from.
pub fn halted_run() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = scratch("run_state-base");
        let text = dir.join("text.txt");
        write(
            &text,
            b"Call me Ishmael. Some years ago, never mind how long precisely, having little or no \
              money in my purse, and nothing particular to interest me on shore, I thought I would \
              sail about a little and see the watery part of the world.",
        );
        let job = peft_cli::jobs::TrainJob {
            model: fixtures_dir().join("gguf/tiny_llama.gguf"),
            data: text,
            task: peft_cli::jobs::Task::CausalLm,
            method: peft_cli::tasks::Method::slot(peft_core::LoraConfig::new(
                2,
                4.0,
                &["q_proj", "v_proj"],
            )),
            out: dir.join("run"),
            train: peft_cli::train::TrainConfig {
                batch: 1,
                max_steps: Some(3),
                stop_after: Some(1),
                ..Default::default()
            },
            text_column: "text".into(),
            label_column: "label".into(),
            problem_type: None,
            held_out: 0.25,
            max_train: Some(4),
            block_size: 8,
            resume: false,
            quantize: None,
        };
        let trained = peft_cli::jobs::train::<peft_core::backends::CpuTrainBackend>(
            &job,
            &indicatif::ProgressBar::hidden(),
            &Default::default(),
        );
        if let Err(e) = trained {
            panic!("the run to resume trains: {e}");
        }
        dir.join("run")
    })
}

/// `--resume` of a halted run: byte 0 picks the file the rest replaces
/// (`train_config.json`, `last/trainer_state.json`, `last/optimizer.bin`);
/// then the run continues to its end. The run's model and data paths are
/// put back after `train_config.json` is read (the input's own would point
/// anywhere on the machine).
pub fn run_state(data: &[u8]) -> bool {
    let Some((i, file)) = choose(data, RUN_FILES.len()) else {
        return false;
    };
    let base = halted_run();
    let dir = scratch("run_state");
    copy_run(base, &dir);
    write(&dir.join(RUN_FILES[i]), file);
    let Ok(mut job) = peft_cli::jobs::TrainJob::resume_from(&dir) else {
        return false;
    };
    let Ok(original) = peft_cli::jobs::TrainJob::resume_from(base) else {
        panic!("the halted run resumes");
    };
    job.model = original.model;
    job.data = original.data;
    job.train.stop_after = None;
    peft_cli::jobs::train::<peft_core::backends::CpuTrainBackend>(
        &job,
        &indicatif::ProgressBar::hidden(),
        &Default::default(),
    )
    .is_ok()
}

/// Copies a run folder: its checkpoint links (`last`, `best`, relative)
/// as links to the copied versions, so that the copy's files can be
/// replaced without touching the original.
pub fn copy_run(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).expect("run folder") {
        let e = e.expect("run entry");
        let name = e.file_name();
        let path = e.path();
        if e.file_type().expect("file type").is_symlink() {
            let target = std::fs::read_link(&path).expect("checkpoint link");
            std::os::unix::fs::symlink(target, to.join(&name)).expect("copy link");
        } else if path.is_dir() {
            std::fs::create_dir_all(to.join(&name)).expect("copy folder");
            copy_run(&path, &to.join(&name));
        } else {
            std::fs::copy(&path, to.join(&name)).expect("copy run file");
        }
    }
}
