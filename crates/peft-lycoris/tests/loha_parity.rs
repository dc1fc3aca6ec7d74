//! LoHa parity with Hugging Face PEFT 0.21 on the fixtures of
//! `scripts/make_lycoris_fixtures.py` (tiny Llama and BERT, PEFT's default
//! targets and a regex case with rank/alpha patterns, factors trained a few
//! steps in PyTorch): logits in every state, gradients, files and parameter
//! counts, within 1e-5 on every backend.

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use peft_core::slot::{LohaFactors, ModuleCopyEntry};
use peft_core::{autodiff_backend_tests, backend_tests, PeftError};
use peft_lycoris::{Loha, LohaConfig, LohaModel};
use peft_models::fixtures::{fixtures_dir, max_diff};
use peft_models::gpt2::Gpt2;
use peft_models::loss::{causal_lm_loss, cross_entropy};
use peft_models::slot_parity::{
    check_bad_shape_refused, check_slot_method_case, check_training_steps,
};

mod common;
use common::{bert, check_gradients, cls, host, llama, lm};

fn llama_loha<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, Loha>("llama", "loha", llama::<B>(d), lm::<B>, d);
}
fn llama_loha_custom<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, Loha>("llama", "loha_custom", llama::<B>(d), lm::<B>, d);
}
fn bert_loha<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, Loha>("bert", "loha", bert::<B>(d), cls::<B>, d);
}

/// A fresh adapter is the identity (`hada_w2_b` starts at zero) with
/// PEFT's parameter count; errors name what is wrong, and a refused file
/// leaves the model as it was.
fn fresh_is_identity_and_errors_are_typed<B: Backend>(d: &B::Device) {
    let base = llama::<B>(d);
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64, 5, 9, 2], [1, 4]), d);
    let want = host(base.forward(ids.clone(), None));
    let loha = LohaModel::new(base.clone(), LohaConfig::default()).unwrap();
    assert_eq!(host(loha.model.forward(ids.clone(), None)).data, want.data);
    // Default targets q_proj (16 → 16) and v_proj (16 → 8), r = 8: four
    // factors each, two layers.
    let per_layer = 2 * (8 * 16 + 16 * 8) + 2 * (8 * 8 + 16 * 8);
    assert_eq!(loha.param_count().trainable, 2 * per_layer);
    // init_weights: false starts away from the identity.
    let random = LohaConfig {
        init_weights: false,
        ..LohaConfig::default()
    };
    let loha = LohaModel::new(base.clone(), random).unwrap();
    let got = host(loha.model.forward(ids, None));
    let moved = max_diff(&got, &want);
    assert!(
        moved.is_finite() && moved > 1e-4,
        "init_weights: false is the identity ({moved:e})"
    );

    let err = LohaModel::new(base.clone(), LohaConfig::new(4, 8.0, &["nothing"])).unwrap_err();
    assert!(matches!(err, PeftError::NoTargetMatched { .. }), "{err}");
    assert!(
        err.to_string().contains("q_proj") && err.to_string().contains("\"nothing\""),
        "names the rule and lists the modules: {err}"
    );
    let err = LohaModel::new(base.clone(), LohaConfig::new(0, 8.0, &["q_proj"])).unwrap_err();
    assert!(err.to_string().contains("`r`"), "{err}");
    // modules_to_save: a trainable copy of the (linear) head, or of the
    // embedding table, as for every method; a name that matches no layer
    // is refused naming it.
    let keeps_heads = LohaConfig {
        modules_to_save: Some(vec!["lm_head".into()]),
        ..LohaConfig::new(4, 8.0, &["q_proj"])
    };
    let with_head = LohaModel::new(base.clone(), keeps_heads).unwrap();
    let head = with_head.model.lm_head.as_ref().unwrap();
    assert!(head.entry::<ModuleCopyEntry<B>>("default").is_some());
    let keeps_embeddings = LohaConfig {
        modules_to_save: Some(vec!["embed_tokens".into()]),
        ..LohaConfig::new(4, 8.0, &["q_proj"])
    };
    let with_table = LohaModel::new(base.clone(), keeps_embeddings).unwrap();
    assert!(with_table.model.embed_tokens.copy("default").is_some());
    let keeps_nothing = LohaConfig {
        modules_to_save: Some(vec!["embed".into()]),
        ..LohaConfig::new(4, 8.0, &["q_proj"])
    };
    let err = LohaModel::new(base.clone(), keeps_nothing).unwrap_err();
    assert!(
        err.to_string().contains("modules_to_save") && err.to_string().contains("embed_tokens"),
        "{err}"
    );
    let gpt2 = Gpt2::<B>::load(&fixtures_dir().join("gpt2"), d).unwrap();
    let err = LohaModel::new(gpt2, LohaConfig::new(4, 8.0, &["c_attn"])).unwrap_err();
    assert!(
        err.to_string().contains("Conv1D"),
        "GPT-2 refused as PEFT does: {err}"
    );

    check_bad_shape_refused::<B, _, Loha>(
        "llama",
        "loha",
        "base_model.model.model.layers.1.self_attn.v_proj.hada_w2_b",
        base,
    );
}

backend_tests!(
    llama_loha,
    llama_loha_custom,
    bert_loha,
    fresh_is_identity_and_errors_are_typed
);

fn llama_gradients<B: AutodiffBackend>(d: &B::Device) {
    for case in ["loha", "loha_custom"] {
        check_gradients::<B, _, Loha, LohaFactors<B>>(
            "llama",
            case,
            llama::<B>(d),
            |m, ids| causal_lm_loss(m.forward(ids.clone(), None), ids),
            d,
        );
    }
}
fn bert_gradients<B: AutodiffBackend>(d: &B::Device) {
    check_gradients::<B, _, Loha, LohaFactors<B>>(
        "bert",
        "loha",
        bert::<B>(d),
        |m, ids| {
            let labels = Tensor::<B, 1, Int>::from_data(
                TensorData::new(vec![2i64, 0, 1], [3]),
                &ids.device(),
            );
            cross_entropy(m.classify(ids, None).unwrap(), labels)
        },
        d,
    );
}

/// Two Adam steps from the saved `default` give PEFT's tensors.
fn training_steps<B: AutodiffBackend>(d: &B::Device) {
    for case in ["loha", "loha_custom"] {
        check_training_steps::<B, _, Loha>(
            "llama",
            case,
            llama::<B>(d),
            |m, ids, _| causal_lm_loss(m.forward(ids.clone(), None), ids),
            d,
        );
    }
    check_training_steps::<B, _, Loha>(
        "bert",
        "loha",
        bert::<B>(d),
        |m, ids, labels| cross_entropy(m.classify(ids, None).unwrap(), labels.expect("labels")),
        d,
    );
}

autodiff_backend_tests!(llama_gradients, bert_gradients, training_steps);
