//! A corpus of malformed inputs — adapter files (PEFT, AdapterHub),
//! configs, model checkpoints, GGUF files, tokenizers and datasets — each
//! answered by a typed error whose message names the file (or key) and the
//! problem: never a panic, never an allocation sized by what a file claims.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use peft_adapter::{AdapterModel, Ia3Model};
use peft_core::io::{read_safetensors, serialize_safetensors, HostTensor};
use peft_core::prompt_learning::{load_prompt_adapter, PromptLearningType};
use peft_core::{LoraConfig, PeftError};
use peft_lora::LoraModel;
use peft_models::bert::Bert;
use peft_models::fixtures::{fixtures_dir, tiny_llama};
use peft_models::gguf::Gguf;
use peft_models::llama::Llama;
use peft_models::tokenizer::Tokenizer;

type B = NdArray;

fn dev() -> <B as burn::tensor::backend::BackendTypes>::Device {
    Default::default()
}

/// A copy of fixture folder `from` under a fresh temporary folder.
fn copy_dir(from: &Path, tag: &str) -> PathBuf {
    let to = std::env::temp_dir().join(format!("peft-malformed-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&to);
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
    to
}

fn edit_tensors(file: &Path, f: impl FnOnce(&mut Vec<(String, HostTensor)>)) {
    let mut list: Vec<(String, HostTensor)> = read_safetensors(file).unwrap().into_iter().collect();
    list.sort_by(|a, b| a.0.cmp(&b.0));
    f(&mut list);
    std::fs::write(file, serialize_safetensors(&list, None)).unwrap();
}

fn edit_json(file: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(file, v.to_string()).unwrap();
}

fn lora_load(dir: &Path) -> peft_core::Result<()> {
    LoraModel::from_pretrained(tiny_llama::<B>(&dev()), dir).map(|_| ())
}

const A_KEY: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
const B_KEY: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

struct Case {
    name: &'static str,
    run: Box<dyn Fn() -> peft_core::Result<()>>,
    /// Every one of these must appear in the message.
    says: Vec<&'static str>,
}

fn case(
    name: &'static str,
    says: &[&'static str],
    run: impl Fn() -> peft_core::Result<()> + 'static,
) -> Case {
    Case {
        name,
        run: Box::new(run),
        says: says.to_vec(),
    }
}

fn lora_case(name: &'static str, says: &[&'static str], corrupt: impl Fn(&Path) + 'static) -> Case {
    case(name, says, move || {
        let dir = copy_dir(&fixtures_dir().join("llama/lora"), name);
        corrupt(&dir);
        let r = lora_load(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        r
    })
}

fn corpus() -> Vec<Case> {
    let w = "adapter_model.safetensors";
    let c = "adapter_config.json";
    vec![
        lora_case("truncated safetensors", &[w], |d| {
            let b = std::fs::read(d.join("adapter_model.safetensors")).unwrap();
            std::fs::write(d.join("adapter_model.safetensors"), &b[..b.len() / 2]).unwrap();
        }),
        lora_case("huge claimed header", &[w], |d| {
            let mut b = u64::MAX.to_le_bytes().to_vec();
            b.extend(b"{}");
            std::fs::write(d.join("adapter_model.safetensors"), b).unwrap();
        }),
        lora_case("wrong dtype", &[w, A_KEY, "dtype U64"], |d| {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::U64,
                vec![4, 16],
                &[0u8; 512],
            )
            .unwrap();
            let bytes =
                safetensors::tensor::serialize(vec![(A_KEY.to_string(), view)], None).unwrap();
            std::fs::write(d.join("adapter_model.safetensors"), bytes).unwrap();
        }),
        lora_case("wrong shape", &[A_KEY, "shape"], |d| {
            edit_tensors(&d.join("adapter_model.safetensors"), |l| {
                let t = &mut l.iter_mut().find(|(k, _)| k == A_KEY).unwrap().1;
                t.shape = vec![t.shape[1], t.shape[0]];
            })
        }),
        lora_case("missing tensor", &[w, B_KEY], |d| {
            edit_tensors(&d.join("adapter_model.safetensors"), |l| {
                l.retain(|(k, _)| k != B_KEY)
            })
        }),
        lora_case("extra tensor", &[w, "unexpected", "lm_head.lora_A"], |d| {
            edit_tensors(&d.join("adapter_model.safetensors"), |l| {
                let t = l[0].1.clone();
                l.push(("base_model.model.lm_head.lora_A.weight".into(), t));
            })
        }),
        lora_case("rank mismatch between A and B", &[B_KEY, "shape"], |d| {
            edit_tensors(&d.join("adapter_model.safetensors"), |l| {
                let t = &mut l.iter_mut().find(|(k, _)| k == B_KEY).unwrap().1;
                let out = t.shape[0];
                *t = HostTensor {
                    shape: vec![out, 2],
                    data: vec![0.0; out * 2],
                };
            })
        }),
        lora_case("NaN weights", &[w, A_KEY], |d| {
            edit_tensors(&d.join("adapter_model.safetensors"), |l| {
                l.iter_mut().find(|(k, _)| k == A_KEY).unwrap().1.data[3] = f32::NAN;
            })
        }),
        lora_case("unknown method", &[c, "FOO"], |d| {
            edit_json(&d.join("adapter_config.json"), |v| {
                v["peft_type"] = "FOO".into()
            })
        }),
        lora_case("negative rank", &[c], |d| {
            edit_json(&d.join("adapter_config.json"), |v| v["r"] = (-3).into())
        }),
        lora_case("rank zero", &["`r` must be a positive"], |d| {
            edit_json(&d.join("adapter_config.json"), |v| v["r"] = 0.into())
        }),
        lora_case("JSON of the wrong type", &[c], |d| {
            edit_json(&d.join("adapter_config.json"), |v| {
                v["target_modules"] = 7.into()
            })
        }),
        lora_case("malformed JSON", &[c], |d| {
            std::fs::write(d.join("adapter_config.json"), "{\"r\": 4,").unwrap()
        }),
        lora_case("missing config", &[c], |d| {
            std::fs::remove_file(d.join("adapter_config.json")).unwrap()
        }),
        lora_case(
            "targets matching nothing",
            &["matched no module", "q_proj"],
            |d| {
                edit_json(&d.join("adapter_config.json"), |v| {
                    v["target_modules"] = serde_json::json!(["nothing"])
                })
            },
        ),
        case(
            "(IA)³ vector of the wrong shape",
            &["ia3_l", "shape"],
            || {
                let dir = copy_dir(&fixtures_dir().join("llama/ia3"), "ia3");
                edit_tensors(&dir.join("adapter_model.safetensors"), |l| {
                    let t = &mut l[0].1;
                    t.shape = vec![t.data.len() / 2, 2];
                });
                Ia3Model::from_pretrained(tiny_llama::<B>(&dev()), &dir).map(|_| ())
            },
        ),
        case(
            "AdapterHub adapter for another width",
            &["adapter_config.json", "hidden_size 32"],
            || {
                let dir = copy_dir(&fixtures_dir().join("bert/bn_seq/a"), "ah");
                edit_json(&dir.join("adapter_config.json"), |v| {
                    v["hidden_size"] = 32.into()
                });
                let bert = Bert::<B>::load(&fixtures_dir().join("bert"), &dev())?;
                AdapterModel::wrap(bert)
                    .load_adapter(&dir, None)
                    .map(|_| ())
            },
        ),
        case(
            "prompt embeddings of the wrong shape",
            &["prompt_embeddings"],
            || {
                let dir = copy_dir(&fixtures_dir().join("llama/prompt_random"), "prompt");
                edit_tensors(&dir.join("adapter_model.safetensors"), |l| {
                    let t = &mut l[0].1;
                    t.shape = vec![t.data.len(), 1];
                });
                load_prompt_adapter(&dir, &[PromptLearningType::PromptTuning]).map(|_| ())
            },
        ),
        case(
            "model config of another architecture",
            &["config.json"],
            || {
                let dir = copy_dir(&fixtures_dir().join("llama"), "arch");
                edit_json(&dir.join("config.json"), |v| v["model_type"] = "t5".into());
                Llama::<B>::load(&dir, &dev()).map(|_| ())
            },
        ),
        case(
            "model weights without a key",
            &["model.safetensors", "q_proj"],
            || {
                let dir = copy_dir(&fixtures_dir().join("llama"), "nokey");
                edit_tensors(&dir.join("model.safetensors"), |l| {
                    l.retain(|(k, _)| !k.contains("layers.1.self_attn.q_proj"))
                });
                Llama::<B>::load(&dir, &dev()).map(|_| ())
            },
        ),
        case("model weight of the wrong shape", &["embed_tokens"], || {
            let dir = copy_dir(&fixtures_dir().join("llama"), "wshape");
            edit_tensors(&dir.join("model.safetensors"), |l| {
                let t = &mut l
                    .iter_mut()
                    .find(|(k, _)| k.contains("embed_tokens"))
                    .unwrap()
                    .1;
                t.shape = vec![t.shape[1], t.shape[0]];
            });
            Llama::<B>::load(&dir, &dev()).map(|_| ())
        }),
        case(
            "model folder without weights",
            &["model.safetensors"],
            || {
                let dir = copy_dir(&fixtures_dir().join("llama"), "noweights");
                std::fs::remove_file(dir.join("model.safetensors")).unwrap();
                Llama::<B>::load(&dir, &dev()).map(|_| ())
            },
        ),
        case("GGUF with a bad magic", &["kquants.gguf", "magic"], || {
            let dir = copy_dir(&fixtures_dir().join("gguf"), "magic");
            let mut b = std::fs::read(dir.join("kquants.gguf")).unwrap();
            b[..4].copy_from_slice(b"NOPE");
            std::fs::write(dir.join("kquants.gguf"), b).unwrap();
            Gguf::open(&dir.join("kquants.gguf")).map(|_| ())
        }),
        case(
            "GGUF truncated: tensor past the end",
            &["kquants.gguf", "past the end"],
            || {
                let dir = copy_dir(&fixtures_dir().join("gguf"), "trunc");
                let b = std::fs::read(dir.join("kquants.gguf")).unwrap();
                std::fs::write(dir.join("kquants.gguf"), &b[..b.len() - 100]).unwrap();
                Gguf::open(&dir.join("kquants.gguf"))?
                    .tensor("q6k")
                    .map(|_| ())
            },
        ),
        case(
            "GGUF claiming 2^64 tensors",
            &["huge.gguf", "claims"],
            || {
                let dir = std::env::temp_dir()
                    .join(format!("peft-malformed-huge-{}", std::process::id()));
                std::fs::create_dir_all(&dir).unwrap();
                let mut b = b"GGUF\x03\0\0\0".to_vec();
                b.extend(u64::MAX.to_le_bytes());
                b.extend(0u64.to_le_bytes());
                std::fs::write(dir.join("huge.gguf"), b).unwrap();
                Gguf::open(&dir.join("huge.gguf")).map(|_| ())
            },
        ),
        case("malformed tokenizer.json", &["tokenizer.json"], || {
            let dir =
                std::env::temp_dir().join(format!("peft-malformed-tok-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("tokenizer.json"), "{\"model\": 3}").unwrap();
            Tokenizer::from_file(&dir.join("tokenizer.json")).map(|_| ())
        }),
        case(
            "dataset row without its label",
            &["rows.jsonl", "line 2", "label"],
            || {
                let dir = std::env::temp_dir()
                    .join(format!("peft-malformed-data-{}", std::process::id()));
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(
                    dir.join("rows.jsonl"),
                    "{\"text\":\"a\",\"label\":1}\n{\"text\":\"b\"}\n",
                )
                .unwrap();
                peft_cli::data::read_labelled(&dir.join("rows.jsonl"), "text", "label").map(|_| ())
            },
        ),
        case(
            "LoRA config whose modules_to_save names no layer",
            &["modules_to_save", "classifier"],
            || {
                let c = LoraConfig {
                    modules_to_save: Some(vec!["classifier".into()]),
                    ..LoraConfig::new(4, 8.0, &["q_proj"])
                };
                LoraModel::new(tiny_llama::<B>(&dev()), c).map(|_| ())
            },
        ),
    ]
}

#[test]
fn every_malformed_input_is_a_typed_error_naming_it() {
    let cases = corpus();
    assert!(cases.len() >= 20, "the corpus has {} cases", cases.len());
    let mut seen = HashMap::new();
    for c in cases {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (c.run)()));
        let err: PeftError = match outcome {
            Err(_) => panic!("{}: panicked instead of returning an error", c.name),
            Ok(Ok(())) => panic!("{}: was accepted", c.name),
            Ok(Err(e)) => e,
        };
        let msg = err.to_string();
        for needle in &c.says {
            assert!(
                msg.contains(needle),
                "{}: the message does not say `{needle}`:\n{msg}",
                c.name
            );
        }
        seen.insert(c.name, msg);
    }
    for (name, msg) in &seen {
        println!("{name}: {msg}");
    }
}
