//! PEFT's sequence-classification adapters (`task_type: SEQ_CLS`), whose
//! `modules_to_save` keeps a trained copy of the head (`classifier`) beside
//! every method's tensors: PEFT's own files of LoRA, DoRA with rsLoRA,
//! (IA)³ and LoHa on the tiny BERT (`scripts/make_seqcls_fixtures.py`) load
//! and give PEFT's logits in every state (two adapters, mixed batch,
//! disabled, merged, `unload`), save byte-for-byte as PEFT's, and train as
//! PEFT trains (gradient of the copy, two Adam steps). A LoRA adapter of
//! the tiny Llama with `modules_to_save=["lm_head"]` does the same, and so do
//! LoRA adapters copying norm layers (the tiny Llama's RMSNorms, GPT-2's
//! final LayerNorm; their mixed batch beyond PEFT's). And adapters a PEFT
//! user trained on the real all-MiniLM-L6-v2
//! (`scripts/make_minilm_seqcls_fixtures.py`) give PEFT's logits through
//! `peft forward` and PEFT's accuracy through `peft eval`.

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use peft_adapter::Ia3;
use peft_cli::jobs::{self, Task};
use peft_core::compare;
use peft_core::io::HostTensor;
use peft_core::slot::ModuleCopyEntry;
use peft_core::{autodiff_backend_tests, backend_tests, SlotMethod, SlotModel};
use peft_core::{LoraConfig, PeftError, PeftModel};
use peft_lora::Lora;
use peft_lycoris::Loha;
use peft_models::assets;
use peft_models::bert::Bert;
use peft_models::fixtures::{fixtures_dir, FixtureCase};
use peft_models::gpt2::Gpt2;
use peft_models::llama::Llama;
use peft_models::loss::{causal_lm_loss, cross_entropy};
use peft_models::seq_cls::ScoreHead;
use peft_models::slot_parity::{
    check_gradients, check_slot_method_case, check_training_steps, lora_gradients,
};
use peft_prompt::PromptTuningModel;

/// The case's `input_ids` as the JSON rows `peft forward` reads, in
/// `dir/ids.json`.
fn write_ids(c: &FixtureCase, dir: &std::path::Path) -> std::path::PathBuf {
    let ids = c.want("input_ids");
    let rows: Vec<Vec<u32>> = ids
        .data
        .chunks(ids.shape[1])
        .map(|r| r.iter().map(|&v| v as u32).collect())
        .collect();
    let file = dir.join("ids.json");
    std::fs::write(&file, serde_json::to_string(&rows).unwrap()).unwrap();
    file
}

/// `peft forward` of `model` with `adapter` on `ids_file`: its output,
/// written to `dir/logits.safetensors` and read back.
fn peft_forward<B: Backend>(
    model: &std::path::Path,
    adapter: Option<&std::path::Path>,
    ids_file: &std::path::Path,
    dir: &std::path::Path,
    d: &B::Device,
) -> HostTensor {
    let out = dir.join("logits.safetensors");
    jobs::forward::<B>(model, adapter, ids_file, &out, d).unwrap();
    peft_core::io::read_safetensors(&out)
        .unwrap()
        .remove("output")
        .unwrap()
}

fn bert<B: Backend>(d: &B::Device) -> Bert<B> {
    Bert::load(&fixtures_dir().join("bert"), d).unwrap()
}
fn cls<B: Backend>(m: &Bert<B>, ids: Tensor<B, 2, Int>) -> HostTensor {
    HostTensor::from_tensor(m.classify(ids, None).unwrap())
}
fn loss<B: Backend>(
    m: &Bert<B>,
    ids: Tensor<B, 2, Int>,
    labels: Tensor<B, 1, Int>,
) -> Tensor<B, 1> {
    cross_entropy(m.classify(ids, None).unwrap(), labels)
}

fn seqcls_lora<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, Lora>("bert", "seqcls_lora", bert::<B>(d), cls::<B>, d);
}
fn seqcls_dora<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, Lora>("bert", "seqcls_dora", bert::<B>(d), cls::<B>, d);
}
fn seqcls_ia3<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, Ia3>("bert", "seqcls_ia3", bert::<B>(d), cls::<B>, d);
}
fn seqcls_loha<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, Loha>("bert", "seqcls_loha", bert::<B>(d), cls::<B>, d);
}

fn llama_seqcls<B: Backend>(d: &B::Device) -> Llama<B> {
    Llama::load(&fixtures_dir().join("llama_seqcls"), d).unwrap()
}
fn llama_cls<B: Backend>(m: &Llama<B>, ids: Tensor<B, 2, Int>) -> HostTensor {
    HostTensor::from_tensor(m.classify(ids, None).unwrap())
}
fn gpt2_seqcls<B: Backend>(d: &B::Device) -> Gpt2<B> {
    Gpt2::load(&fixtures_dir().join("gpt2_seqcls"), d).unwrap()
}
fn gpt2_cls<B: Backend>(m: &Gpt2<B>, ids: Tensor<B, 2, Int>) -> HostTensor {
    HostTensor::from_tensor(m.classify(ids, None).unwrap())
}

/// `GPT2ForSequenceClassification` (its `score` on each row's last token
/// that is not padding) with PEFT's SEQ_CLS LoRA on the Conv1D `c_attn`.
fn gpt2_seqcls_lora<B: Backend>(d: &B::Device) {
    let model = gpt2_seqcls::<B>(d);
    check_slot_method_case::<B, _, Lora>("gpt2_seqcls", "seqcls_lora", model, gpt2_cls::<B>, d);
}

/// `LlamaForSequenceClassification` (`score` on each row's last token that
/// is not padding; row 1 of the fixture is right-padded) with PEFT's
/// SEQ_CLS LoRA, whose copy of `score` trains.
fn llama_seqcls_lora<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, Lora>(
        "llama_seqcls",
        "seqcls_lora",
        llama_seqcls::<B>(d),
        llama_cls::<B>,
        d,
    );
}

/// `peft forward` on `LlamaForSequenceClassification` gives PEFT's class
/// logits, with the SEQ_CLS adapter and without.
fn llama_seqcls_forward<B: Backend>(d: &B::Device) {
    let c = FixtureCase::open("llama_seqcls", "seqcls_lora");
    let tmp = peft_models::fixtures::temp_dir("llama-seqcls-forward");
    std::fs::create_dir_all(&tmp).unwrap();
    let ids_file = write_ids(&c, &tmp);
    let model = fixtures_dir().join("llama_seqcls");
    for (adapter, want) in [
        (None, "logits_base"),
        (Some(c.dir.as_path()), "logits_unmerged"),
    ] {
        let out = tmp.join("logits.safetensors");
        jobs::forward::<B>(&model, adapter, &ids_file, &out, d).unwrap();
        let got = peft_core::io::read_safetensors(&out)
            .unwrap()
            .remove("output")
            .unwrap();
        peft_models::fixtures::assert_close(want, &got, c.want(want));
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// `peft forward`'s logits of the merged model in `merged` on the case's
/// ids.
fn forward_logits<B: Backend>(
    merged: &std::path::Path,
    c: &FixtureCase,
    tmp: &std::path::Path,
    d: &B::Device,
) -> HostTensor {
    let ids_file = write_ids(c, tmp);
    let out = tmp.join("logits.safetensors");
    jobs::forward::<B>(merged, None, &ids_file, &out, d).unwrap();
    peft_core::io::read_safetensors(&out)
        .unwrap()
        .remove("output")
        .unwrap()
}

/// `peft merge` of PEFT's SEQ_CLS adapters onto task models that have
/// their head (BERT's `classifier`, the decoders' `score`): the merged
/// checkpoint's logits are the adapter's (its head's copy written in place
/// of the head).
fn merge_writes_the_heads_copy<B: Backend>(d: &B::Device) {
    let tmp = peft_models::fixtures::temp_dir("seqcls-merge");
    for (arch, case) in [
        ("bert", "seqcls_lora"),
        ("bert", "seqcls_ia3"),
        ("llama_seqcls", "seqcls_lora"),
        ("gpt2_seqcls", "seqcls_lora"),
    ] {
        let c = FixtureCase::open(arch, case);
        let model = fixtures_dir().join(arch);
        let merged = tmp.join(format!("{arch}-{case}"));
        let changed = jobs::merge::<B>(&model, &c.dir, &merged, jobs::MergeDtype::F32, d).unwrap();
        let head = if arch == "bert" {
            "classifier"
        } else {
            "score"
        };
        assert!(
            changed.contains(&format!("{head}.weight")),
            "{arch}/{case}: {changed:?}"
        );
        let got = forward_logits::<B>(&merged, &c, &tmp, d);
        peft_models::fixtures::assert_close(
            &format!("{arch}/{case} merged"),
            &got,
            c.want("logits_unmerged"),
        );
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// `peft merge` of PEFT's SEQ_CLS LoRA over MiniLM, a bare `BertModel`
/// checkpoint: the merged folder is the task model
/// (`BertForSequenceClassification`: the base's keys under `bert.`, the
/// head's copy as `classifier`, `config.json` naming the architecture,
/// classes and problem type) and gives PEFT's logits; a run's
/// `labels.json` and `task.json` name the classes and the problem.
fn merge_onto_a_headless_base<B: Backend>(d: &B::Device) {
    let tmp = peft_models::fixtures::temp_dir("seqcls-merge-headless");
    let minilm = assets::fetch("minilm").unwrap();
    let c = FixtureCase::open("minilm_seqcls", "lora");
    // The same adapter as one of our runs would leave it.
    let run = tmp.join("run");
    std::fs::create_dir_all(&run).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(c.dir.join(f), run.join(f)).unwrap();
    }
    std::fs::write(run.join("labels.json"), r#"["negative", "positive"]"#).unwrap();
    peft_cli::tasks::write_problem_type(&run, peft_cli::tasks::ProblemType::MultiLabel).unwrap();
    for (adapter, labels, problem) in [
        (
            &c.dir,
            ["LABEL_0", "LABEL_1"],
            "single_label_classification",
        ),
        (&run, ["negative", "positive"], "multi_label_classification"),
    ] {
        let merged = tmp.join("merged");
        let changed =
            jobs::merge::<B>(&minilm, adapter, &merged, jobs::MergeDtype::F32, d).unwrap();
        for key in [
            "classifier.weight",
            "classifier.bias",
            "bert.encoder.layer.0.attention.self.query.weight",
        ] {
            assert!(changed.iter().any(|k| k == key), "{key} not in {changed:?}");
        }
        let saved = peft_core::io::read_safetensors(&merged.join("model.safetensors")).unwrap();
        assert!(saved.contains_key("bert.pooler.dense.weight"));
        assert!(
            !saved.keys().any(|k| k.starts_with("encoder.")),
            "unprefixed keys left"
        );
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(
            config["architectures"],
            serde_json::json!(["BertForSequenceClassification"])
        );
        assert_eq!(
            config["id2label"],
            serde_json::json!({"0": labels[0], "1": labels[1]})
        );
        assert_eq!(config["label2id"][labels[1]], 1);
        assert_eq!(config["problem_type"], problem);
        assert_eq!(config["hidden_size"], 384, "the base's fields stay");
        let got = forward_logits::<B>(&merged, &c, &tmp, d);
        peft_models::fixtures::assert_close("merged MiniLM", &got, c.want("logits"));
        std::fs::remove_dir_all(&merged).unwrap();
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// `peft merge` of PEFT's SEQ_CLS LoRA over a decoder's causal-LM
/// checkpoint (the tiny Llama and GPT-2 fixtures' weights without their
/// `score`, the Llama with an `lm_head`): the merged folder is the
/// `*ForSequenceClassification` (the adapter's `score`, no `lm_head`,
/// `config.json` naming the architecture) and gives PEFT's logits.
fn merge_onto_a_causal_checkpoint<B: Backend>(d: &B::Device) {
    let tmp = peft_models::fixtures::temp_dir("seqcls-merge-causal");
    for (arch, causal, task) in [
        (
            "llama_seqcls",
            "LlamaForCausalLM",
            "LlamaForSequenceClassification",
        ),
        (
            "gpt2_seqcls",
            "GPT2LMHeadModel",
            "GPT2ForSequenceClassification",
        ),
    ] {
        let c = FixtureCase::open(arch, "seqcls_lora");
        let from = fixtures_dir().join(arch);
        let base = tmp.join(format!("{arch}-causal"));
        std::fs::create_dir_all(&base).unwrap();
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(from.join("config.json")).unwrap())
                .unwrap();
        config["architectures"] = serde_json::json!([causal]);
        std::fs::write(base.join("config.json"), config.to_string()).unwrap();
        let mut tensors: Vec<(String, HostTensor)> =
            peft_core::io::read_safetensors(&from.join("model.safetensors"))
                .unwrap()
                .into_iter()
                .filter(|(k, _)| k != "score.weight")
                .collect();
        if arch == "llama_seqcls" {
            // The tiny Llama's head is not tied to its embeddings.
            tensors.push((
                "lm_head.weight".into(),
                HostTensor {
                    data: vec![0.5; 64 * 16],
                    shape: vec![64, 16],
                },
            ));
        }
        std::fs::write(
            base.join("model.safetensors"),
            peft_core::io::serialize_safetensors(&tensors, None),
        )
        .unwrap();
        let merged = tmp.join(format!("{arch}-merged"));
        let changed = jobs::merge::<B>(&base, &c.dir, &merged, jobs::MergeDtype::F32, d).unwrap();
        assert!(
            changed.iter().any(|k| k == "score.weight"),
            "{arch}: {changed:?}"
        );
        let saved = peft_core::io::read_safetensors(&merged.join("model.safetensors")).unwrap();
        assert!(
            !saved.contains_key("lm_head.weight"),
            "{arch}: the causal head stays"
        );
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["architectures"], serde_json::json!([task]));
        assert_eq!(config["id2label"]["2"], "LABEL_2");
        let got = forward_logits::<B>(&merged, &c, &tmp, d);
        peft_models::fixtures::assert_close(
            &format!("{arch} merged"),
            &got,
            c.want("logits_unmerged"),
        );
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// What `peft train` / `peft eval` compute on a decoder: each row read at
/// the last token its attention mask marks real, PEFT's logits for the
/// right-padded fixture (whose padding is the model's `pad_token_id`).
fn llama_seqcls_by_mask<B: Backend>(d: &B::Device) {
    let c = FixtureCase::open("llama_seqcls", "seqcls_lora");
    let ids = c.ints::<B, 2>("input_ids", d);
    let mask = ids.clone().not_equal_elem(0).float();
    let adapted = peft_cli::tasks::load_adapted(llama_seqcls::<B>(d), Some(&c.dir)).unwrap();
    let got = HostTensor::from_tensor(adapted.classify_masked(ids, mask).unwrap());
    peft_models::fixtures::assert_close("classified by the mask", &got, c.want("logits_unmerged"));
}

fn lora_lm_head<B: Backend>(d: &B::Device) {
    let llama = Llama::load(&fixtures_dir().join("llama"), d).unwrap();
    let logits = |m: &Llama<B>, ids| HostTensor::from_tensor(m.forward(ids, None));
    check_slot_method_case::<B, _, Lora>("llama", "lora_lm_head", llama, logits, d);
}

fn gpt2<B: Backend>(d: &B::Device) -> Gpt2<B> {
    Gpt2::load(&fixtures_dir().join("gpt2"), d).unwrap()
}

/// LoRA adapters keeping copies of norm layers (`modules_to_save`: the
/// tiny Llama's five RMSNorms by PEFT's suffix rule, GPT-2's final
/// LayerNorm with its shift), in every state; the mixed batch, which PEFT
/// refuses through norm copies, routes each row through its own copies.
fn lora_norms<B: Backend>(d: &B::Device) {
    let llama = Llama::load(&fixtures_dir().join("llama"), d).unwrap();
    let logits = |m: &Llama<B>, ids| HostTensor::from_tensor(m.forward(ids, None));
    check_slot_method_case::<B, _, Lora>("llama", "lora_norms", llama, logits, d);
    let logits = |m: &Gpt2<B>, ids| HostTensor::from_tensor(m.forward(ids, None));
    check_slot_method_case::<B, _, Lora>("gpt2", "lora_norms", gpt2::<B>(d), logits, d);
}

/// PEFT's prompt-tuning and P-tuning SEQ_CLS adapters of the tiny BERT
/// (`scripts/make_seqcls_fixtures.py`): each keeps a copy of the
/// classifier under PEFT's prompt-learning key
/// (`base_model.classifier.weight`), switched with its soft prompt; the
/// pooler reads the first virtual token, as in PEFT. Logits of each
/// adapter, a mixed batch (each row's prompt and head), disabled (the base
/// with its own head), the files saved as PEFT's and loading back, `peft
/// forward`'s class logits.
fn prompt_learning_seqcls_from_peft<B: Backend>(d: &B::Device) {
    for case in ["seqcls_prompt", "seqcls_ptuning"] {
        let c = FixtureCase::open("bert", case);
        let ids = c.ints::<B, 2>("input_ids", d);
        let classify = |m: &PromptTuningModel<B, Bert<B>>| {
            HostTensor::from_tensor(
                m.model
                    .classify_hidden(m.forward(ids.clone(), None))
                    .unwrap(),
            )
        };
        let close = peft_models::fixtures::assert_close;
        let mut adapted = PromptTuningModel::from_pretrained(bert::<B>(d), &c.dir).unwrap();
        close(
            &format!("{case} default"),
            &classify(&adapted),
            c.want("logits_unmerged"),
        );
        adapted.set_adapter("other").unwrap();
        close(
            &format!("{case} other"),
            &classify(&adapted),
            c.want("logits_other"),
        );
        adapted.disable();
        close(
            &format!("{case} disabled"),
            &classify(&adapted),
            c.want("logits_base"),
        );
        adapted.enable();
        // Rows 0 and 2 through `other`, row 1 through `default`.
        let names = ["other", "default", "other"];
        // The head after the model runs in the rows' routing too.
        let rows: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mixed = peft_core::routing::with_row_adapters(&rows, || {
            let hidden = adapted.forward_mixed(&names, ids.clone(), None).unwrap();
            HostTensor::from_tensor(adapted.model.classify_hidden(hidden).unwrap())
        });
        let (other, default) = (c.want("logits_other"), c.want("logits_unmerged"));
        let cols = other.shape[1];
        let want = HostTensor {
            shape: other.shape.clone(),
            data: (0..3)
                .flat_map(|r| {
                    let from = if r == 1 { default } else { other };
                    from.data[r * cols..(r + 1) * cols].to_vec()
                })
                .collect(),
        };
        close(&format!("{case} mixed batch"), &mixed, &want);

        // Our files hold PEFT's tensors and load back.
        let out = peft_models::fixtures::temp_dir(&format!("prompt-seqcls-{case}"));
        adapted.save_pretrained(&out).unwrap();
        for sub in ["", "other"] {
            let read = |dir: &std::path::Path| {
                peft_core::io::read_safetensors(&dir.join(sub).join("adapter_model.safetensors"))
                    .unwrap()
            };
            assert_eq!(
                read(&c.dir),
                read(&out),
                "{case}: saved `{sub}` differs from PEFT's"
            );
        }
        let reloaded = PromptTuningModel::from_pretrained(bert::<B>(d), &out).unwrap();
        close(
            &format!("{case} reloaded"),
            &classify(&reloaded),
            c.want("logits_unmerged"),
        );

        // `peft forward` on the BERT folder: PEFT's class logits.
        let ids_file = write_ids(&c, &out);
        let bert_dir = fixtures_dir().join("bert");
        let got = peft_forward::<B>(&bert_dir, Some(&c.dir), &ids_file, &out, d);
        close(
            &format!("{case} peft forward"),
            &got,
            c.want("logits_unmerged"),
        );
        std::fs::remove_dir_all(&out).unwrap();

        // PEFT counts `default` alone (its soft prompt and its head's
        // copy); a P-tuning adapter loads folded, without PEFT's encoder.
        adapted.set_adapter("default").unwrap();
        adapted.delete_adapter("other").unwrap();
        let count = adapted.param_count();
        if case == "seqcls_prompt" {
            assert_eq!(count.trainable, c.meta_usize("trainable_params"), "{count}");
            assert_eq!(count.all, c.meta_usize("all_params"), "{count}");
        }
        assert_eq!(count.trainable, 4 * 16 + 3 * 16 + 3, "{case}: {count}");
    }
}

/// A prompt-learning adapter's copy of a layer inside the model (BERT's
/// first feed-forward output) routes per row in `forward_mixed` by itself:
/// each row equals its adapter's own forward pass.
fn prompt_learning_copies_route_per_row<B: Backend>(d: &B::Device) {
    use peft_core::prompt_learning::{PromptLearningConfig, PromptTuningInit};
    let dense = "bert.encoder.layer.0.output.dense";
    let config = || {
        let mut c = PromptLearningConfig::prompt_tuning(4, PromptTuningInit::Random);
        c.modules_to_save = Some(vec![dense.to_string()]);
        c
    };
    let mut m = PromptTuningModel::new(bert::<B>(d), config()).unwrap();
    m.add_adapter("b", config()).unwrap();
    m.model.visit_linears_mut(&mut |path, slot| {
        if path == dense {
            for (name, k) in [("default", 2.0), ("b", -1.5)] {
                let e = slot.entry_mut::<ModuleCopyEntry<B>>(name).unwrap();
                e.weight = e.weight.clone().map(|w| w * k);
            }
        }
    });
    let ids = Tensor::<B, 2, Int>::from_data(
        TensorData::new(vec![5i64, 9, 2, 7, 1, 3, 8, 4, 6], [3, 3]),
        d,
    );
    let mut alone = Vec::new();
    for name in ["default", "b"] {
        m.set_adapter(name).unwrap();
        alone.push(HostTensor::from_tensor(m.forward(ids.clone(), None)));
    }
    let mixed = HostTensor::from_tensor(
        m.forward_mixed(&["default", "b", "default"], ids, None)
            .unwrap(),
    );
    let row = mixed.data.len() / 3;
    for (r, from) in [(0, 0), (1, 1), (2, 0)] {
        let (got, want) = (
            &mixed.data[r * row..][..row],
            &alone[from].data[r * row..][..row],
        );
        compare::check_close_slices(
            &format!("row {r}"),
            got,
            want,
            compare::Tolerance::new(1e-5, 1e-6),
        )
        .unwrap();
    }
    let (a, b) = (&alone[0].data[row..2 * row], &alone[1].data[row..2 * row]);
    assert!(
        a.iter().zip(b).any(|(x, y)| (x - y).abs() > 1e-3),
        "the two copies give the same output"
    );
}

/// What a user can get wrong is a typed error naming it, and leaves the
/// model as it was: `modules_to_save` naming no linear layer (listing
/// them), a layer both targeted and copied, a copy of the wrong shape or
/// missing from the file.
fn bad_modules_to_save_are_typed_errors<B: Backend>(d: &B::Device) {
    let config = |targets: &[&str], copies: &[&str]| LoraConfig {
        modules_to_save: Some(copies.iter().map(|s| s.to_string()).collect()),
        ..LoraConfig::new(4, 8.0, targets)
    };
    let bert = bert::<B>(d);
    let err = SlotModel::<B, _, Lora>::new(bert.clone(), config(&["query"], &["embeddings"]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("modules_to_save") && err.contains("pooler.dense"),
        "{err}"
    );
    let err = SlotModel::<B, _, Lora>::new(bert.clone(), config(&["classifier"], &["classifier"]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("`classifier` is both a target"), "{err}");

    let c = FixtureCase::open("bert", "seqcls_lora");
    let dir = peft_models::fixtures::temp_dir("seqcls-bad-copy");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        c.dir.join("adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap();
    let mut tensors =
        peft_core::io::read_safetensors(&c.dir.join("adapter_model.safetensors")).unwrap();
    let key = "base_model.model.classifier.weight";
    let write = |t: &std::collections::HashMap<String, HostTensor>| {
        let t: Vec<(String, HostTensor)> = t.clone().into_iter().collect();
        let bytes = peft_core::io::serialize_safetensors(&t, None);
        std::fs::write(dir.join("adapter_model.safetensors"), bytes).unwrap();
    };
    let mut wrong = tensors.clone();
    wrong.get_mut(key).unwrap().shape = vec![16, 3];
    write(&wrong);
    let mut adapted = SlotModel::<B, _, Lora>::wrap(bert.clone());
    match adapted.load_adapter(&dir, "bad") {
        Err(PeftError::Shape { name, .. }) => assert_eq!(name, key),
        other => panic!("a transposed copy: {other:?}"),
    }
    tensors.remove(key);
    write(&tensors);
    match adapted.load_adapter(&dir, "bad") {
        Err(PeftError::MissingTensor { key: k, .. }) => assert_eq!(k, key),
        other => panic!("a missing copy: {other:?}"),
    }
    let mut entries = 0;
    adapted
        .model
        .visit_linears(&mut |_, s| entries += s.entries.len());
    assert_eq!(entries, 0, "a refused file left entries behind");
    assert!(adapted.adapter_names().is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

backend_tests!(
    seqcls_lora,
    seqcls_dora,
    seqcls_ia3,
    seqcls_loha,
    lora_lm_head,
    lora_norms,
    prompt_learning_seqcls_from_peft,
    prompt_learning_copies_route_per_row,
    llama_seqcls_lora,
    llama_seqcls_forward,
    gpt2_seqcls_lora,
    merge_writes_the_heads_copy,
    merge_onto_a_headless_base,
    merge_onto_a_causal_checkpoint,
    llama_seqcls_by_mask,
    bad_modules_to_save_are_typed_errors
);

/// The training loss and the gradient of `default`'s copy of the head
/// equal PEFT's; the frozen head and `other`'s copy get none.
fn check_head_gradients<B: AutodiffBackend, K: SlotMethod>(case: &str, d: &B::Device) {
    let c = FixtureCase::open("bert", case);
    let mut adapted = SlotModel::<B, Bert<B>, K>::wrap(bert::<B>(d));
    adapted.load_adapter(&c.dir, "default").unwrap();
    adapted.load_adapter(&c.dir.join("other"), "other").unwrap();
    adapted.set_adapter(&["default"]).unwrap();
    let labels = Tensor::<B, 1, Int>::from_data(TensorData::new(vec![2i64, 0, 1], [3]), d);
    let loss = loss(&adapted.model, c.ints::<B, 2>("input_ids", d), labels);
    let got = loss.clone().into_scalar().elem::<f32>();
    compare::check_close_slices(
        &format!("{case}: loss"),
        &[got],
        &c.want("train_loss").data,
        compare::Tolerance::new(1e-5, 0.0),
    )
    .unwrap();
    let grads = loss.backward();
    let head = adapted
        .model
        .classifier
        .as_ref()
        .expect("the fixture has a head");
    assert!(
        head.base.weight.grad(&grads).is_none(),
        "the frozen head got a gradient"
    );
    let other = head.entry::<ModuleCopyEntry<B>>("other").unwrap();
    assert!(
        other.weight.grad(&grads).is_none(),
        "`other`'s copy got a gradient"
    );
    let copy = head.entry::<ModuleCopyEntry<B>>("default").unwrap();
    let tol = c.gradient_tolerance();
    let weight = HostTensor::from_tensor(copy.weight.grad(&grads).unwrap()).transposed();
    let bias = HostTensor::from_tensor(copy.bias.as_ref().unwrap().grad(&grads).unwrap());
    let key = "grad.base_model.model.classifier";
    compare::assert_close(
        &format!("{case}: copy weight"),
        &weight,
        c.want(&format!("{key}.weight")),
        tol,
    );
    compare::assert_close(
        &format!("{case}: copy bias"),
        &bias,
        c.want(&format!("{key}.bias")),
        tol,
    );
}

fn head_gradients<B: AutodiffBackend>(d: &B::Device) {
    // The norm copies' gradients beside LoRA's.
    let causal =
        |m: &Llama<B>, ids: Tensor<B, 2, Int>| causal_lm_loss(m.forward(ids.clone(), None), ids);
    let llama = Llama::load(&fixtures_dir().join("llama"), d).unwrap();
    check_gradients::<B, _, Lora>(
        "llama",
        "lora_norms",
        llama,
        causal,
        d,
        Some(lora_gradients),
    );
    let causal =
        |m: &Gpt2<B>, ids: Tensor<B, 2, Int>| causal_lm_loss(m.forward(ids.clone(), None), ids);
    check_gradients::<B, _, Lora>(
        "gpt2",
        "lora_norms",
        gpt2::<B>(d),
        causal,
        d,
        Some(lora_gradients),
    );
    check_head_gradients::<B, Lora>("seqcls_lora", d);
    check_head_gradients::<B, Lora>("seqcls_dora", d);
    check_head_gradients::<B, Ia3>("seqcls_ia3", d);
    check_head_gradients::<B, Loha>("seqcls_loha", d);
}

/// Two Adam steps from PEFT's saved `default` give PEFT's tensors, the
/// head's copy among them.
fn training_steps<B: AutodiffBackend>(d: &B::Device) {
    let step = |m: &Bert<B>, ids, labels: Option<_>| loss(m, ids, labels.expect("labels"));
    check_training_steps::<B, _, Lora>("bert", "seqcls_lora", bert::<B>(d), step, d);
    check_training_steps::<B, _, Lora>("bert", "seqcls_dora", bert::<B>(d), step, d);
    check_training_steps::<B, _, Ia3>("bert", "seqcls_ia3", bert::<B>(d), step, d);
    check_training_steps::<B, _, Loha>("bert", "seqcls_loha", bert::<B>(d), step, d);
    let llama = Llama::load(&fixtures_dir().join("llama"), d).unwrap();
    let lm_step =
        |m: &Llama<B>, ids: Tensor<B, 2, Int>, _| causal_lm_loss(m.forward(ids.clone(), None), ids);
    check_training_steps::<B, _, Lora>("llama", "lora_lm_head", llama, lm_step, d);
    let llama = Llama::load(&fixtures_dir().join("llama"), d).unwrap();
    check_training_steps::<B, _, Lora>("llama", "lora_norms", llama, lm_step, d);
    let gpt2_lm_step =
        |m: &Gpt2<B>, ids: Tensor<B, 2, Int>, _| causal_lm_loss(m.forward(ids.clone(), None), ids);
    check_training_steps::<B, _, Lora>("gpt2", "lora_norms", gpt2::<B>(d), gpt2_lm_step, d);
    let cls_step = |m: &Llama<B>, ids, labels: Option<_>| {
        cross_entropy(m.classify(ids, None).unwrap(), labels.expect("labels"))
    };
    check_training_steps::<B, _, Lora>(
        "llama_seqcls",
        "seqcls_lora",
        llama_seqcls::<B>(d),
        cls_step,
        d,
    );
    let gpt2_step = |m: &Gpt2<B>, ids, labels: Option<_>| {
        cross_entropy(m.classify(ids, None).unwrap(), labels.expect("labels"))
    };
    let model = gpt2_seqcls::<B>(d);
    check_training_steps::<B, _, Lora>("gpt2_seqcls", "seqcls_lora", model, gpt2_step, d);
}

autodiff_backend_tests!(head_gradients, training_steps);

/// PEFT's LoRA and (IA)³ SEQ_CLS adapters of MiniLM (the head's copy in
/// them, the base without a head): `peft forward` gives PEFT's logits,
/// `peft eval` PEFT's accuracy on 48 held-out sentences.
fn minilm_adapters_from_peft<B: Backend>(d: &B::Device) {
    let minilm = assets::fetch("minilm").unwrap();
    for method in ["lora", "ia3"] {
        let c = FixtureCase::open("minilm_seqcls", method);
        let dir = c.dir.clone();
        let tmp = peft_models::fixtures::temp_dir(&format!("minilm-seqcls-{method}"));
        std::fs::create_dir_all(&tmp).unwrap();
        let ids_file = write_ids(&c, &tmp);
        let out = tmp.join("logits.safetensors");
        jobs::forward::<B>(&minilm, Some(&dir), &ids_file, &out, d).unwrap();
        let ours = peft_core::io::read_safetensors(&out)
            .unwrap()
            .remove("output")
            .unwrap();
        let tol = compare::Tolerance::new(1e-4, 1e-5);
        compare::assert_close(&format!("{method}: logits"), &ours, c.want("logits"), tol);
        let accuracy = jobs::eval::<B>(
            &minilm,
            Some(&dir),
            &dir.join("held.jsonl"),
            Task::SeqCls,
            ("text", "label"),
            32,
            d,
        )
        .unwrap();
        let held = c.meta_usize("held") as f64;
        let want = c.meta["held_accuracy"].as_f64().unwrap();
        assert_eq!(
            (accuracy.value * held).round(),
            (want * held).round(),
            "{method}: right answers of peft eval and PEFT"
        );
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}

backend_tests!(minilm_adapters_from_peft);

/// `peft forward` with AdapterHub's own adapter-with-head folders
/// (`scripts/make_adapterhub_head_fixtures.py`) gives AdapterHub's head
/// logits: classification `[b, 3]`, multi-label through the pooler
/// `[b, 4]`, tagging `[b, t, 5]`, regression `[b, 1]`. The rows without
/// padding are compared (`peft forward` runs without a mask).
fn adapterhub_heads_through_peft_forward<B: Backend>(d: &B::Device) {
    let c = FixtureCase::open("bert", "bn_heads");
    let dir = peft_models::fixtures::temp_dir("ah-heads-forward");
    std::fs::create_dir_all(&dir).unwrap();
    let ids = c.want("input_ids");
    let t = ids.shape[1];
    let rows: Vec<Vec<u32>> = [0, 2]
        .iter()
        .map(|&r| {
            ids.data[r * t..(r + 1) * t]
                .iter()
                .map(|&x| x as u32)
                .collect()
        })
        .collect();
    let ids_file = dir.join("ids.json");
    std::fs::write(&ids_file, serde_json::to_string(&rows).unwrap()).unwrap();
    for name in ["cls", "multi", "tag", "reg"] {
        let (model, adapter) = (fixtures_dir().join("bert"), c.dir.join(name));
        let got = peft_forward::<B>(&model, Some(&adapter), &ids_file, &dir, d);
        let want = c.want(&format!("logits.{name}"));
        let per_row: usize = want.shape[1..].iter().product();
        let rows_of = |r: usize| want.data[r * per_row..(r + 1) * per_row].to_vec();
        let mut expected_shape = want.shape.clone();
        expected_shape[0] = 2;
        let expected = HostTensor {
            shape: expected_shape.clone(),
            data: [rows_of(0), rows_of(2)].concat(),
        };
        assert_eq!(got.shape, expected_shape, "{name}");
        peft_models::fixtures::assert_close(name, &got, &expected);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

backend_tests!(adapterhub_heads_through_peft_forward);

/// PEFT's prompt-tuning SEQ_CLS adapter of `LlamaForSequenceClassification`
/// and P-tuning one of `GPT2ForSequenceClassification`
/// (`scripts/make_seqcls_fixtures.py`): `peft forward` with each adapter
/// folder gives PEFT's class logits, each row read at its last real token
/// after the soft prompt, with the adapter's copy of `score`. Row 1 is
/// right-padded: PEFT passes the soft prompt as embeddings, so transformers
/// cannot see its padding and reads it at the last (pad) position; ours
/// reads its last real token, so only rows 0 and 2 (no padding) are PEFT's.
fn decoder_prompt_learning_seqcls_from_peft<B: Backend>(d: &B::Device) {
    for (arch, case) in [
        ("llama_seqcls", "seqcls_prompt"),
        ("gpt2_seqcls", "seqcls_ptuning"),
    ] {
        let c = FixtureCase::open(arch, case);
        let out = peft_models::fixtures::temp_dir(&format!("decoder-prompt-{case}"));
        std::fs::create_dir_all(&out).unwrap();
        let ids_file = write_ids(&c, &out);
        for (adapter, want) in [("", "logits_unmerged"), ("other", "logits_other")] {
            let (model, adapter_dir) = (fixtures_dir().join(arch), c.dir.join(adapter));
            let got = peft_forward::<B>(&model, Some(&adapter_dir), &ids_file, &out, d);
            let want = c.want(want);
            assert_eq!(got.shape, want.shape, "{case} {adapter}");
            let cols = want.shape[1];
            let rows = |t: &HostTensor| HostTensor {
                shape: vec![2, cols],
                data: [0, 2]
                    .iter()
                    .flat_map(|&r| t.data[r * cols..(r + 1) * cols].to_vec())
                    .collect(),
            };
            peft_models::fixtures::assert_close(
                &format!("{arch} {case} `{adapter}`"),
                &rows(&got),
                &rows(want),
            );
            // The head's copy is the adapter's: not the base's logits.
            let base = rows(c.want("logits_base"));
            assert!(peft_models::fixtures::max_diff(&rows(&got), &base) > 1e-2);
        }
        std::fs::remove_dir_all(&out).unwrap();
    }
}

backend_tests!(decoder_prompt_learning_seqcls_from_peft);
