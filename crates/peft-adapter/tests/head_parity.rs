//! AdapterHub prediction heads (`adapters` 1.3) on the fixtures of
//! `scripts/make_adapterhub_head_fixtures.py`: a tiny BERT with four
//! bottleneck adapters saved with their heads — classification (named
//! labels, AdapterHub's defaults), multi-label (3 layers, relu, the pooled
//! output, no last bias), tagging (per token) and a one-output regression
//! (gelu). Each loads from AdapterHub's own folder; its logits, loss and
//! every gradient (adapter and head) match AdapterHub's; the files we write
//! hold AdapterHub's tensors and config; a static BERT head converts.

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor};
use peft_adapter::head::{HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE};
use peft_adapter::{AdapterModel, HeadConfig, HeadLogits, HeadTargets, HeadType, Setup};
use peft_core::compare::{self, Tolerance};
use peft_core::io::{read_safetensors, serialize_safetensors, HostTensor};
use peft_core::{autodiff_backend_tests, backend_tests, PeftError};
use peft_models::bert::Bert;
use peft_models::fixtures::{assert_close, fixtures_dir, temp_dir, FixtureCase};
use serde_json::Value;

const HEADS: [&str; 4] = ["cls", "multi", "tag", "reg"];

fn case() -> FixtureCase {
    FixtureCase::open("bert", "bn_heads")
}

fn bert<B: Backend>(d: &B::Device) -> Bert<B> {
    Bert::load(&fixtures_dir().join("bert"), d).unwrap()
}

fn host<B: Backend>(logits: HeadLogits<B>) -> HostTensor {
    match logits {
        HeadLogits::PerSequence(x) => HostTensor::from_tensor(x),
        HeadLogits::PerToken(x) => HostTensor::from_tensor(x),
    }
}

fn targets<B: Backend>(c: &FixtureCase, name: &str, d: &B::Device) -> HeadTargets<B> {
    let key = format!("labels.{name}");
    match name {
        "cls" => HeadTargets::Classes(c.ints(&key, d)),
        "multi" => HeadTargets::MultiHot(c.floats(&key, d)),
        "tag" => HeadTargets::Tags(c.ints(&key, d)),
        _ => HeadTargets::Values(c.floats(&key, d)),
    }
}

/// Every head: loaded from AdapterHub's folder with its adapter, the
/// logits equal AdapterHub's; the counts are AdapterHub's; saving writes
/// AdapterHub's files; reloading ours gives the same logits.
fn heads_load_and_save<B: Backend>(d: &B::Device) {
    let c = case();
    let ids: Tensor<B, 2, Int> = c.ints("input_ids", d);
    let mask: Tensor<B, 2> = c.floats("attention_mask", d);
    let mut model = AdapterModel::wrap(bert::<B>(d));
    // The real tokens' hidden states (the plain model packs padding away,
    // so the padded positions' are not transformers').
    let real = |h: Tensor<B, 3>| HostTensor::from_tensor(h * mask.clone().unsqueeze_dim::<3>(2));
    let hidden = model.forward(ids.clone(), Some(mask.clone())).unwrap();
    let want: Tensor<B, 3> = c.floats("hidden_base", d);
    assert_close("base hidden", &real(hidden), &real(want));
    for name in HEADS {
        assert_eq!(model.load_adapter(&c.dir.join(name), None).unwrap(), name);
        assert_eq!(model.active_head(), None, "loading activates nothing");
    }
    let out = temp_dir("bn-heads");
    for name in HEADS {
        model.set_active(Setup::single(name)).unwrap();
        assert_eq!(
            model.active_head(),
            Some(name),
            "the head follows the adapter"
        );
        let logits = host(model.forward_head(ids.clone(), Some(mask.clone())).unwrap());
        assert_close(name, &logits, c.want(&format!("logits.{name}")));

        model.train_adapter(Setup::single(name)).unwrap();
        let want = c.meta["trainable_params"][name].as_u64().unwrap() as usize;
        assert_eq!(model.param_count().trainable, want, "{name}: trainable");

        let dir = out.join(name);
        model.save_adapter(name, &dir).unwrap();
        for file in ["adapter.safetensors", HEAD_WEIGHTS_FILE] {
            let theirs = read_safetensors(&c.dir.join(name).join(file)).unwrap();
            let ours = read_safetensors(&dir.join(file)).unwrap();
            assert_eq!(theirs, ours, "{name}/{file} differs from AdapterHub's");
        }
        let json = |p: std::path::PathBuf| -> Value {
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
        };
        let (theirs, ours) = (
            json(c.dir.join(name).join(HEAD_CONFIG_FILE)),
            json(dir.join(HEAD_CONFIG_FILE)),
        );
        for key in ["config", "hidden_size", "model_class", "model_type", "name"] {
            assert_eq!(theirs[key], ours[key], "{name}: head_config.json `{key}`");
        }

        let mut again = AdapterModel::wrap(bert::<B>(d));
        again.load_adapter(&dir, None).unwrap();
        again.set_active(Setup::single(name)).unwrap();
        let reloaded = host(again.forward_head(ids.clone(), Some(mask.clone())).unwrap());
        assert_eq!(reloaded.data, logits.data, "{name}: reloaded head differs");
    }
    // A head goes with its adapter; with none active, forward_head refuses.
    model.delete_adapter("cls").unwrap();
    assert_eq!(model.head_names(), ["multi", "tag", "reg"]);
    model.set_active_head(None).unwrap();
    assert!(matches!(
        model.forward_head(ids, Some(mask)),
        Err(PeftError::State(_))
    ));
    std::fs::remove_dir_all(&out).unwrap();
}

/// Replaces every parameter by its gradient (zeros where none), so the
/// model's own file writers name the gradients with AdapterHub's keys.
struct ToGradients<'a, B: AutodiffBackend>(&'a B::Gradients);

impl<B: AutodiffBackend> ModuleMapper<B> for ToGradients<'_, B> {
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let v = p.val();
        let g = match v.grad(self.0) {
            Some(g) => Tensor::from_inner(g),
            None => v.zeros_like(),
        };
        Param::from_tensor(g)
    }
}

/// Loss and every gradient of adapter + head equal AdapterHub's, and the
/// base and the other heads get none.
fn head_gradients<B: AutodiffBackend>(d: &B::Device) {
    let c = case();
    let tol = c.gradient_tolerance();
    let ids: Tensor<B, 2, Int> = c.ints("input_ids", d);
    let mask: Tensor<B, 2> = c.floats("attention_mask", d);
    let mut model = AdapterModel::wrap(bert::<B>(d));
    for name in HEADS {
        model.load_adapter(&c.dir.join(name), None).unwrap();
    }
    for name in HEADS {
        model.train_adapter(Setup::single(name)).unwrap();
        let logits = model.forward_head(ids.clone(), Some(mask.clone())).unwrap();
        let loss = logits
            .loss(targets(&c, name, d), Some(mask.clone()))
            .unwrap();
        assert_close(
            &format!("{name} loss"),
            &HostTensor::from_tensor(loss.clone()),
            c.want(&format!("loss.{name}")),
        );
        let grads = loss.backward();
        let as_grads = model.clone().map(&mut ToGradients::<B>(&grads));
        let mut got = as_grads.adapter_tensors(name).unwrap();
        let (head, _) = as_grads.set.heads.get(name).unwrap();
        got.extend(head.tensors(name));
        let prefix = format!("grad.{name}.");
        let want: Vec<&String> = c
            .expected
            .keys()
            .filter(|k| k.starts_with(&prefix))
            .collect();
        assert_eq!(want.len(), got.len(), "{name}: gradient count");
        for (key, g) in &got {
            let w = c.want(&format!("{prefix}{key}"));
            compare::assert_close(&format!("{name} grad {key}"), g, w, tol);
        }
        let quiet = |n: &str| {
            let (h, _) = as_grads.set.heads.get(n).unwrap();
            h.tensors(n)
                .iter()
                .all(|(_, t)| t.data.iter().all(|v| *v == 0.0))
        };
        for other in HEADS.iter().filter(|o| **o != name) {
            assert!(quiet(other), "{name}: head {other} got a gradient");
        }
    }
}

/// A fresh head: AdapterHub's keys and initialisation, trained with its
/// adapter, refused where it cannot be.
fn fresh_heads<B: Backend>(d: &B::Device) {
    let mut model = AdapterModel::wrap(bert::<B>(d));
    model
        .add_adapter("x", peft_adapter::BnConfig::seq_bn())
        .unwrap();
    let labels = ["a".to_string(), "b".into(), "c".into()];
    let config = HeadConfig::classification(3).with_labels(&labels).unwrap();
    model.add_head("x", config).unwrap();
    model.train_adapter(Setup::single("x")).unwrap();
    let (head, config) = model.set.heads.get("x").unwrap();
    assert_eq!(config.labels(), labels);
    // Without names, AdapterHub's LABEL_i in output order.
    let mut unnamed = HeadConfig::classification(12);
    unnamed.label2id = None;
    assert_eq!(unnamed.labels()[10], "LABEL_10");
    assert_eq!(unnamed.labels()[2], "LABEL_2");
    let tensors = head.tensors("x");
    let keys: Vec<&str> = tensors.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "heads.x.1.weight",
            "heads.x.1.bias",
            "heads.x.4.weight",
            "heads.x.4.bias"
        ]
    );
    let w = &tensors[0].1.data;
    let std = (w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32).sqrt();
    assert!((0.01..0.04).contains(&std), "init std {std}, want ~0.02");
    assert!(tensors[1].1.data.iter().all(|v| *v == 0.0), "zero bias");
    // Head (16·16 + 16 + 16·3 + 3) plus adapter.
    let adapter = model.param_count().trainable - (16 * 16 + 16 + 16 * 3 + 3);
    assert!(adapter > 0);
    assert!(matches!(
        model.add_head("x", HeadConfig::tagging(2)),
        Err(PeftError::DuplicateAdapter(_))
    ));
    let mut bad = HeadConfig::multi_label(2);
    bad.activation_function = Some("softsign".into());
    let err = model.add_head("y", bad).unwrap_err().to_string();
    assert!(
        err.contains("activation_function") && err.contains("softsign"),
        "{err}"
    );
    let mut bad = HeadConfig::tagging(2);
    bad.use_pooler = Some(true);
    assert!(model.add_head("y", bad).is_err());
    let ids = Tensor::<B, 2, Int>::from_ints([[3, 4, 5]], d);
    let logits = model.forward_head(ids.clone(), None).unwrap();
    assert!(matches!(logits, HeadLogits::PerSequence(ref x) if x.dims() == [1, 3]));
    // The wrong labels for a head are refused.
    let err = logits
        .loss(HeadTargets::Tags(Tensor::zeros([1, 3], d)), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("per-token"), "{err}");
    model.add_head("t", HeadConfig::tagging(5)).unwrap();
    let tags = model.forward_head(ids, None).unwrap();
    assert!(matches!(tags, HeadLogits::PerToken(ref x) if x.dims() == [1, 3, 5]));
}

/// A head folder that is not AdapterHub's is refused, naming what is
/// wrong, and leaves the model as it was.
fn malformed_heads<B: Backend>(d: &B::Device) {
    let c = case();
    let out = temp_dir("bn-heads-bad");
    let copy = |tag: &str| {
        let dir = out.join(tag);
        std::fs::create_dir_all(&dir).unwrap();
        for f in std::fs::read_dir(c.dir.join("cls")).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
        }
        dir
    };
    let edit_config = |dir: &std::path::Path, f: &dyn Fn(&mut Value)| {
        let p = dir.join(HEAD_CONFIG_FILE);
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, v.to_string()).unwrap();
    };
    let load = |dir: &std::path::Path| {
        let mut model = AdapterModel::wrap(bert::<B>(d));
        let err = model.load_adapter(dir, None).unwrap_err().to_string();
        assert!(model.adapter_names().is_empty() && model.head_names().is_empty());
        err
    };
    let dir = copy("qa");
    edit_config(&dir, &|v| {
        v["config"]["head_type"] = "question_answering".into()
    });
    let err = load(&dir);
    assert!(
        err.contains("head_type") && err.contains("question_answering"),
        "{err}"
    );

    let dir = copy("labels");
    edit_config(&dir, &|v| v["config"]["num_labels"] = 4.into());
    let err = load(&dir);
    assert!(err.contains("label2id"), "{err}");

    let dir = copy("shape");
    let mut t = read_safetensors(&dir.join(HEAD_WEIGHTS_FILE)).unwrap();
    t.insert(
        "heads.cls.4.weight".into(),
        HostTensor {
            shape: vec![2, 16],
            data: vec![0.1; 32],
        },
    );
    let t: Vec<(String, HostTensor)> = t.into_iter().collect();
    std::fs::write(dir.join(HEAD_WEIGHTS_FILE), serialize_safetensors(&t, None)).unwrap();
    let err = load(&dir);
    assert!(err.contains("heads.cls.4.weight"), "{err}");

    let dir = copy("missing");
    std::fs::remove_file(dir.join(HEAD_WEIGHTS_FILE)).unwrap();
    let err = load(&dir);
    assert!(err.contains(HEAD_WEIGHTS_FILE), "{err}");
    std::fs::remove_dir_all(&out).unwrap();
}

/// A static head (`BertForSequenceClassification`'s pooler + classifier,
/// saved with `config: null`) loads converted, as AdapterHub's
/// `convert_to_flex_head`: its logits equal the model's own head.
fn static_head_converts<B: Backend>(d: &B::Device) {
    let c = case();
    let out = temp_dir("bn-static-head");
    let dir = out.join("cls");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["adapter.safetensors", "adapter_config.json"] {
        std::fs::copy(c.dir.join("cls").join(f), dir.join(f)).unwrap();
    }
    let base = read_safetensors(&fixtures_dir().join("bert/model.safetensors")).unwrap();
    let classifier: Vec<(String, HostTensor)> = ["weight", "bias"]
        .iter()
        .map(|p| {
            (
                format!("classifier.{p}"),
                base[&format!("classifier.{p}")].clone(),
            )
        })
        .collect();
    std::fs::write(
        dir.join(HEAD_WEIGHTS_FILE),
        serialize_safetensors(&classifier, None),
    )
    .unwrap();
    let meta = serde_json::json!({
        "config": null, "hidden_size": 16, "model_class": "BertForSequenceClassification",
        "model_type": "bert", "name": null, "num_labels": 3,
        "label2id": {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}, "version": "adapters.1.3.0",
    });
    std::fs::write(dir.join(HEAD_CONFIG_FILE), meta.to_string()).unwrap();
    let mut model = AdapterModel::wrap(bert::<B>(d));
    model.load_adapter(&dir, Some("cls")).unwrap();
    let config = model.head_config("cls").unwrap();
    assert_eq!(
        (config.head_type, config.layers, config.reads_pooler()),
        (HeadType::Classification, 1, true)
    );
    model.set_active(Setup::single("cls")).unwrap();
    let ids: Tensor<B, 2, Int> = c.ints("input_ids", d);
    let mask: Tensor<B, 2> = c.floats("attention_mask", d);
    let got = host(model.forward_head(ids.clone(), Some(mask.clone())).unwrap());
    let hidden = model.forward(ids, Some(mask)).unwrap();
    let own = HostTensor::from_tensor(model.model.classify_hidden(hidden).unwrap());
    compare::assert_close("static head", &got, &own, Tolerance::new(1e-6, 1e-7));
    std::fs::remove_dir_all(&out).unwrap();
}

backend_tests!(
    heads_load_and_save,
    fresh_heads,
    malformed_heads,
    static_head_converts
);
autodiff_backend_tests!(head_gradients);
