//! VeRA parity with Hugging Face PEFT 0.21 on the fixtures of
//! `scripts/make_method_fixtures.py` (tiny Llama, BERT and GPT-2; PEFT's
//! default targets, a case whose layers take slices of larger projections,
//! one whose projections are not saved and must be drawn again from the
//! key, GPT-2's Conv1D): logits in every state, gradients, files, two Adam
//! steps and parameter counts, within 1e-5 on every backend.

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use peft_core::compare;
use peft_core::io::{read_safetensors, HostTensor};
use peft_core::slot::vera::{Vera, VeraConfig, VeraEntry, VeraProjection};
use peft_core::{
    autodiff_backend_tests, backend_tests, LinearSlot, PeftError, PeftModel, VeraModel,
};
use peft_models::bert::Bert;
use peft_models::fixtures::{max_diff, temp_dir, tiny_bert, tiny_gpt2, tiny_llama, FixtureCase};
use peft_models::gpt2::Gpt2;
use peft_models::llama::Llama;
use peft_models::loss::{causal_lm_loss, cross_entropy};
use peft_models::slot_parity::{
    check_gradients, check_slot_method_case, check_training_steps, EntryGradients,
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

fn llama_vera<B: Backend>(d: &B::Device) {
    for case in ["vera", "vera_custom", "vera_unsaved"] {
        check_slot_method_case::<B, _, Vera>("llama", case, tiny_llama::<B>(d), lm::<B>, d);
    }
}
fn bert_vera<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, Vera>("bert", "vera", tiny_bert::<B>(d), cls::<B>, d);
}
fn gpt2_vera<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, Vera>("gpt2", "vera", tiny_gpt2::<B>(d), gpt2_lm::<B>, d);
}

/// A fresh adapter draws PEFT's projections (compared with the ones PEFT
/// saved for the same key and sizes), is the identity, counts PEFT's
/// parameters; errors name what is wrong, and a refused file leaves the
/// model as it was.
fn fresh_draws_peft_projections_and_errors_are_typed<B: Backend>(d: &B::Device) {
    let c = FixtureCase::open("llama", "vera_custom");
    let file = read_safetensors(&c.dir.join("adapter_model.safetensors")).unwrap();
    let drawn = VeraProjection::draw(7, 6, 40, 40);
    for (key, ours) in [
        ("base_model.vera_A", &drawn.a),
        ("base_model.vera_B", &drawn.b),
    ] {
        let theirs = &file[key];
        assert_eq!(theirs.shape, ours.shape, "{key}");
        compare::assert_close(key, ours, theirs, compare::Tolerance::new(1e-6, 0.0));
    }

    let base = tiny_llama::<B>(d);
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64, 5, 9, 2], [1, 4]), d);
    let want = host(base.forward(ids.clone(), None));
    let fresh = VeraModel::new(base.clone(), VeraConfig::new(6, &["q_proj", "v_proj"])).unwrap();
    assert_eq!(host(fresh.model.forward(ids.clone(), None)).data, want.data);
    // q_proj (16 → 16) and v_proj (16 → 8), two layers: λd [6] and λb
    // [d_out] each; the projections are constants, not parameters.
    assert_eq!(fresh.param_count().trainable, 2 * ((6 + 16) + (6 + 8)));
    let random = VeraConfig {
        init_weights: false,
        ..VeraConfig::new(6, &["q_proj"])
    };
    let moved = max_diff(
        &host(
            VeraModel::new(base.clone(), random)
                .unwrap()
                .model
                .forward(ids, None),
        ),
        &want,
    );
    assert!(
        moved.is_finite() && moved > 1e-4,
        "init_weights: false is the identity ({moved:e})"
    );

    let err = VeraModel::new(base.clone(), VeraConfig::new(4, &["nothing"])).unwrap_err();
    assert!(matches!(err, PeftError::NoTargetMatched { .. }), "{err}");
    assert!(
        err.to_string().contains("q_proj"),
        "lists the modules: {err}"
    );
    for (bad, field) in [
        (VeraConfig::new(0, &["q_proj"]), "`r`"),
        (
            VeraConfig {
                bias: "all".into(),
                ..VeraConfig::new(4, &["q_proj"])
            },
            "`bias`",
        ),
        (
            VeraConfig {
                vera_dropout: 1.0,
                ..VeraConfig::new(4, &["q_proj"])
            },
            "`vera_dropout`",
        ),
    ] {
        let err = VeraModel::new(base.clone(), bad).unwrap_err();
        assert!(err.to_string().contains(field), "{err}");
    }

    // As PEFT, every VeRA adapter of a model shares the projection key and
    // save_projection; a second adapter with the same ones is welcome.
    let mut two = VeraModel::new(base.clone(), VeraConfig::new(6, &["q_proj"])).unwrap();
    two.add_adapter("same", VeraConfig::new(6, &["v_proj"]))
        .unwrap();
    for (other, field) in [
        (
            VeraConfig {
                projection_prng_key: 3,
                ..VeraConfig::new(6, &["q_proj"])
            },
            "projection_prng_key",
        ),
        (
            VeraConfig {
                save_projection: false,
                ..VeraConfig::new(6, &["q_proj"])
            },
            "save_projection",
        ),
    ] {
        let err = two.add_adapter("other", other).unwrap_err().to_string();
        assert!(err.contains(field), "{err}");
        assert_eq!(two.adapter_names(), ["default", "same"]);
    }

    // A file whose projections are missing though the config says they are
    // saved, or of the wrong size, is refused by name.
    for (case, edit) in [("missing", 0), ("resized", 1)] {
        let dir = temp_dir(&format!("vera-bad-{case}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(
            c.dir.join("adapter_config.json"),
            dir.join("adapter_config.json"),
        )
        .unwrap();
        let mut tensors = file.clone();
        if edit == 0 {
            tensors.remove("base_model.vera_B");
        } else {
            tensors.get_mut("base_model.vera_A").unwrap().shape = vec![40, 6];
        }
        let list: Vec<(String, HostTensor)> = tensors.into_iter().collect();
        std::fs::write(
            dir.join("adapter_model.safetensors"),
            peft_core::io::serialize_safetensors(&list, None),
        )
        .unwrap();
        let mut vera = VeraModel::wrap(base.clone());
        let err = vera.load_adapter(&dir, "bad").unwrap_err();
        assert!(err.to_string().contains("vera_"), "{case}: {err}");
        assert!(vera.adapter_names().is_empty());
        let mut entries = 0;
        vera.model
            .visit_linears(&mut |_, s| entries += s.entries.len());
        assert_eq!(entries, 0, "{case}: a refused file left entries behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

backend_tests!(
    llama_vera,
    bert_vera,
    gpt2_vera,
    fresh_draws_peft_projections_and_errors_are_typed
);

/// The gradients of `vera_lambda_b` and `vera_lambda_d` (the projections
/// are buffers: they have none).
fn vera_gradients<B: AutodiffBackend>(
    slot: &LinearSlot<B>,
    name: &str,
    grads: &B::Gradients,
) -> Option<EntryGradients> {
    let e = slot.entry::<VeraEntry<B>>(name)?;
    let grad = |p: &burn::module::Param<Tensor<B, 1>>| p.grad(grads).map(HostTensor::from_tensor);
    Some(vec![
        ("vera_lambda_b", grad(&e.lambda_b)),
        ("vera_lambda_d", grad(&e.lambda_d)),
    ])
}

fn gradients<B: AutodiffBackend>(d: &B::Device) {
    for case in ["vera", "vera_custom", "vera_unsaved"] {
        check_gradients::<B, _, Vera>(
            "llama",
            case,
            tiny_llama::<B>(d),
            |m, ids| causal_lm_loss(m.forward(ids.clone(), None), ids),
            d,
            Some(vera_gradients),
        );
    }
    check_gradients::<B, _, Vera>(
        "gpt2",
        "vera",
        tiny_gpt2::<B>(d),
        |m, ids| causal_lm_loss(m.forward(ids.clone(), None), ids),
        d,
        Some(vera_gradients),
    );
    check_gradients::<B, _, Vera>(
        "bert",
        "vera",
        tiny_bert::<B>(d),
        |m, ids| {
            let labels = Tensor::<B, 1, Int>::from_data(
                TensorData::new(vec![2i64, 0, 1], [3]),
                &ids.device(),
            );
            cross_entropy(m.classify(ids, None).unwrap(), labels)
        },
        d,
        Some(vera_gradients),
    );
}

/// Two Adam steps from the saved `default` give PEFT's tensors.
fn training_steps<B: AutodiffBackend>(d: &B::Device) {
    for case in ["vera", "vera_custom", "vera_unsaved"] {
        check_training_steps::<B, _, Vera>(
            "llama",
            case,
            tiny_llama::<B>(d),
            |m, ids, _| causal_lm_loss(m.forward(ids.clone(), None), ids),
            d,
        );
    }
    check_training_steps::<B, _, Vera>(
        "bert",
        "vera",
        tiny_bert::<B>(d),
        |m, ids, labels| cross_entropy(m.classify(ids, None).unwrap(), labels.expect("labels")),
        d,
    );
}

autodiff_backend_tests!(gradients, training_steps);
