//! LN tuning parity with Hugging Face PEFT 0.21 on the fixtures of
//! `scripts/make_method_fixtures.py ln` (tiny Llama's RMSNorms, GPT-2's and
//! BERT's LayerNorms; PEFT's default targets for Llama and GPT-2, named
//! ones with an exclusion for BERT): logits in every state (a mixed batch
//! with each row's own norms; two adapters active refused, as PEFT
//! refuses), gradients, files, two Adam steps and parameter counts, within
//! 1e-5 on every backend; and what PEFT refuses, refused by name.

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use peft_core::io::{read_safetensors, serialize_safetensors, HostTensor};
use peft_core::slot::{LnTuning, LnTuningConfig};
use peft_core::{autodiff_backend_tests, backend_tests, LnTuningModel, PeftError, TargetModules};
use peft_models::bert::Bert;
use peft_models::fixtures::{
    assert_close, temp_dir, tiny_bert, tiny_gpt2, tiny_llama, FixtureCase,
};
use peft_models::gpt2::Gpt2;
use peft_models::llama::Llama;
use peft_models::loss::{causal_lm_loss, cross_entropy};
use peft_models::slot_parity::{
    check_gradients, check_slot_method_case, check_training_steps, entry_count,
};

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> HostTensor {
    HostTensor::from_tensor(t)
}
fn lm<B: Backend>(m: &Llama<B>, ids: Tensor<B, 2, Int>) -> HostTensor {
    host(m.forward(ids, None))
}
fn gpt2_lm<B: Backend>(m: &Gpt2<B>, ids: Tensor<B, 2, Int>) -> HostTensor {
    host(m.forward(ids, None))
}
fn cls<B: Backend>(m: &Bert<B>, ids: Tensor<B, 2, Int>) -> HostTensor {
    host(m.classify(ids, None).unwrap())
}
fn labels<B: Backend>(d: &B::Device) -> Tensor<B, 1, Int> {
    Tensor::from_data(TensorData::new(vec![2i64, 0, 1], [3]), d)
}

fn llama_ln_tuning<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, LnTuning>("llama", "ln_tuning", tiny_llama::<B>(d), lm::<B>, d);
}
fn gpt2_ln_tuning<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, LnTuning>(
        "gpt2",
        "ln_tuning",
        tiny_gpt2::<B>(d),
        gpt2_lm::<B>,
        d,
    );
}
fn bert_ln_tuning<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, LnTuning>("bert", "ln_tuning", tiny_bert::<B>(d), cls::<B>, d);
}

/// A fresh adapter copies the norms (so it is the identity), targets PEFT's
/// defaults, counts PEFT's parameters; `unload` gives the base back, a
/// merge swaps the copies in; what PEFT refuses is refused by name.
fn fresh_adapters_unload_and_refusals<B: Backend>(d: &B::Device) {
    let base = tiny_llama::<B>(d);
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64, 5, 9, 2], [1, 4]), d);
    let want = lm(&base, ids.clone());
    let mut fresh = LnTuningModel::new(base.clone(), LnTuningConfig::default()).unwrap();
    assert_eq!(
        lm(&fresh.model, ids.clone()).data,
        want.data,
        "a fresh copy"
    );
    // Two layers' input and post-attention norms and the final norm, [16].
    assert_eq!(fresh.param_count().trainable, 5 * 16);
    let config = fresh.config("default").unwrap();
    assert_eq!(
        config.target_modules,
        Some(TargetModules::List(vec![
            "input_layernorm".into(),
            "post_attention_layernorm".into(),
            "norm".into()
        ]))
    );

    // Loaded from PEFT's files: `unload` is the base (PEFT's unload gives
    // the base norm back); merging swaps the active copy in.
    let c = FixtureCase::open("llama", "ln_tuning");
    let loaded = LnTuningModel::from_pretrained(base.clone(), &c.dir).unwrap();
    let unloaded = loaded.unload();
    assert_close(
        "unload",
        &lm(&unloaded, c.ints::<B, 2>("input_ids", d)),
        c.want("logits_base"),
    );
    assert_eq!(entry_count(&unloaded), 0);
    let mut loaded = LnTuningModel::from_pretrained(base.clone(), &c.dir).unwrap();
    let file = read_safetensors(&c.dir.join("adapter_model.safetensors")).unwrap();
    let key = "base_model.model.model.norm.ln_tuning_layers.weight";
    let err = loaded
        .merge(&["default".into(), "other".into()])
        .unwrap_err();
    assert!(err.to_string().contains("more than one adapter"), "{err}");
    assert!(!loaded.any_merged(), "a refused merge changed nothing");
    let plain = loaded.merge_and_unload().unwrap();
    assert_eq!(host(plain.norm.slot.weight.val()), file[key]);

    // Targets: BERT has no PEFT defaults; a rule matching no norm lists
    // the norms; a linear layer is not a norm.
    let err = LnTuningModel::new(tiny_bert::<B>(d), LnTuningConfig::default()).unwrap_err();
    assert!(err.to_string().contains("target_modules"), "{err}");
    for targets in [&["nothing"][..], &["q_proj"]] {
        let err = LnTuningModel::new(base.clone(), LnTuningConfig::new(targets)).unwrap_err();
        assert!(matches!(err, PeftError::NoTargetMatched { .. }), "{err}");
        assert!(
            err.to_string().contains("model.norm"),
            "lists the norms: {err}"
        );
    }

    // Two LN tuning adapters active at once: refused, as PEFT refuses.
    fresh
        .add_adapter("second", LnTuningConfig::new(&["norm"]))
        .unwrap();
    let err = fresh.set_adapter(&["default", "second"]).unwrap_err();
    assert!(err.to_string().contains("model.norm"), "{err}");
    assert_eq!(fresh.active_adapters(), ["second"]);
    // Only the final norm: 16 parameters train.
    assert_eq!(fresh.param_count().trainable, 16);
}

/// A file whose copy does not fit the layer (a short scale, a LayerNorm's
/// missing shift) is refused naming the key, and leaves nothing behind.
fn bad_files_are_refused<B: Backend>(d: &B::Device) {
    let c = FixtureCase::open("gpt2", "ln_tuning");
    let file = read_safetensors(&c.dir.join("adapter_model.safetensors")).unwrap();
    let key = "base_model.model.transformer.h.1.ln_2.ln_tuning_layers";
    let short = |t: &HostTensor| HostTensor {
        shape: vec![8],
        data: t.data[..8].to_vec(),
    };
    for (what, edit) in [
        ("weight", Some(short as fn(&HostTensor) -> HostTensor)),
        ("bias", None),
    ] {
        let full_key = format!("{key}.{what}");
        let mut tensors = file.clone();
        match edit {
            Some(f) => {
                let t = f(&tensors[&full_key]);
                tensors.insert(full_key.clone(), t);
            }
            None => {
                tensors.remove(&full_key);
            }
        }
        let dir = temp_dir(&format!("ln-tuning-bad-{what}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(
            c.dir.join("adapter_config.json"),
            dir.join("adapter_config.json"),
        )
        .unwrap();
        let list: Vec<(String, HostTensor)> = tensors.into_iter().collect();
        std::fs::write(
            dir.join("adapter_model.safetensors"),
            serialize_safetensors(&list, None),
        )
        .unwrap();
        let mut adapted = LnTuningModel::wrap(tiny_gpt2::<B>(d));
        let err = adapted.load_adapter(&dir, "bad").unwrap_err();
        assert!(err.to_string().contains(&full_key), "{err}");
        assert!(adapted.adapter_names().is_empty());
        assert_eq!(entry_count(&adapted.model), 0, "a refused file left copies");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

fn gradients<B: AutodiffBackend>(d: &B::Device) {
    let causal =
        |m: &Llama<B>, ids: Tensor<B, 2, Int>| causal_lm_loss(m.forward(ids.clone(), None), ids);
    check_gradients::<B, _, LnTuning>("llama", "ln_tuning", tiny_llama::<B>(d), causal, d, None);
    check_gradients::<B, _, LnTuning>(
        "gpt2",
        "ln_tuning",
        tiny_gpt2::<B>(d),
        |m, ids| causal_lm_loss(m.forward(ids.clone(), None), ids),
        d,
        None,
    );
    check_gradients::<B, _, LnTuning>(
        "bert",
        "ln_tuning",
        tiny_bert::<B>(d),
        |m, ids| cross_entropy(m.classify(ids, None).unwrap(), labels::<B>(d)),
        d,
        None,
    );
}

/// Two Adam steps from the saved `default` give PEFT's tensors.
fn training_steps<B: AutodiffBackend>(d: &B::Device) {
    check_training_steps::<B, _, LnTuning>(
        "llama",
        "ln_tuning",
        tiny_llama::<B>(d),
        |m, ids, _| causal_lm_loss(m.forward(ids.clone(), None), ids),
        d,
    );
    check_training_steps::<B, _, LnTuning>(
        "gpt2",
        "ln_tuning",
        tiny_gpt2::<B>(d),
        |m, ids, _| causal_lm_loss(m.forward(ids.clone(), None), ids),
        d,
    );
    check_training_steps::<B, _, LnTuning>(
        "bert",
        "ln_tuning",
        tiny_bert::<B>(d),
        |m, ids, labels| cross_entropy(m.classify(ids, None).unwrap(), labels.expect("labels")),
        d,
    );
}

backend_tests!(
    llama_ln_tuning,
    gpt2_ln_tuning,
    bert_ln_tuning,
    fresh_adapters_unload_and_refusals,
    bad_files_are_refused
);
autodiff_backend_tests!(gradients, training_steps);
