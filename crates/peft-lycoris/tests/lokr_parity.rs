//! LoKr parity with Hugging Face PEFT 0.21 on the fixtures of
//! `scripts/make_lycoris_fixtures.py` (tiny Llama and BERT: PEFT's default
//! layout with full factors, `decompose_both` with rank-1 pairs, a
//! `decompose_factor`, rank/alpha patterns, the LyCORIS initialisation;
//! factors trained a few steps in PyTorch): logits in every state,
//! gradients, files and parameter counts, within 1e-5 on every backend.

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use peft_core::slot::{factorization, KronFactor, LokrEntry, LokrFactors};
use peft_core::{autodiff_backend_tests, backend_tests, PeftError, PeftModel};
use peft_lycoris::lokr::{LokrInitWeights, LycorisWay};
use peft_lycoris::{Lokr, LokrConfig, LokrModel, MethodConfig};
use peft_models::fixtures::{fixtures_dir, max_diff, temp_dir, FixtureCase};
use peft_models::gpt2::Gpt2;
use peft_models::loss::{causal_lm_loss, cross_entropy};
use peft_models::slot_parity::{
    check_bad_shape_refused, check_slot_method_case, check_training_steps,
};

mod common;
use common::{bert, check_gradients, cls, host, llama, lm};

fn llama_lokr<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, Lokr>("llama", "lokr", llama::<B>(d), lm::<B>, d);
}
fn llama_lokr_custom<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, Lokr>("llama", "lokr_custom", llama::<B>(d), lm::<B>, d);
}
fn bert_lokr<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, Lokr>("bert", "lokr", bert::<B>(d), cls::<B>, d);
}

/// PEFT's `factorization`, on its docstring's examples and the sizes of
/// the fixtures.
#[test]
fn factorization_is_peft_s() {
    assert_eq!(factorization(256, -1), (16, 16));
    assert_eq!(factorization(128, -1), (8, 16));
    assert_eq!(factorization(127, -1), (1, 127));
    assert_eq!(factorization(128, 4), (4, 32));
    assert_eq!(factorization(40, -1), (5, 8));
    assert_eq!(factorization(40, 2), (2, 20));
    // A factor that does not divide bounds the search instead.
    assert_eq!(factorization(40, 3), (2, 20));
    assert_eq!(factorization(16, 0), (1, 16));
}

/// Which factors are pairs follows PEFT's rule per layer (`decompose_both`,
/// `r` below half a side): read back from the fixture PEFT wrote.
fn layouts_follow_peft<B: Backend>(d: &B::Device) {
    let c = FixtureCase::open("llama", "lokr_custom");
    let mut lokr = LokrModel::wrap(llama::<B>(d));
    lokr.load_adapter(&c.dir, "default").unwrap();
    let mut seen = Vec::new();
    lokr.model.visit_linears(&mut |path, slot| {
        if let Some(e) = slot.entry::<LokrEntry<B>>("default") {
            let pair = |f: &KronFactor<B>| matches!(f, KronFactor::Product(_));
            seen.push((path.to_string(), pair(&e.factors.w1), pair(&e.factors.w2)));
        }
    });
    assert_eq!(seen.len(), 6, "{seen:?}");
    for (path, w1_pair, w2_pair) in seen {
        // o_proj has rank 2, not below half of its 4 × 4 sides.
        let want = !path.ends_with("o_proj");
        assert_eq!((w1_pair, w2_pair), (want, want), "{path}");
    }
}

/// A fresh adapter is the identity (`W1` at zero; `W2` with `"lycoris"`)
/// with PEFT's parameter count; errors name what is wrong, and a refused
/// file leaves the model as it was.
fn fresh_is_identity_and_errors_are_typed<B: Backend>(d: &B::Device) {
    let base = llama::<B>(d);
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64, 5, 9, 2], [1, 4]), d);
    let want = host(base.forward(ids.clone(), None));
    for init in [
        LokrInitWeights::Bool(true),
        LokrInitWeights::Named(LycorisWay::Lycoris),
    ] {
        let config = LokrConfig {
            init_weights: init,
            ..LokrConfig::default()
        };
        let lokr = LokrModel::new(base.clone(), config).unwrap();
        assert_eq!(
            host(lokr.model.forward(ids.clone(), None)).data,
            want.data,
            "{init:?}"
        );
        // The zero factor is PEFT's: `W1` by default, `W2` the LyCORIS way.
        let mut zero_sides = Vec::new();
        lokr.model.visit_linears(&mut |_, slot| {
            if let Some(e) = slot.entry::<LokrEntry<B>>("default") {
                let zero = |f: &KronFactor<B>| match f {
                    KronFactor::Full(w) => w.val().abs().max().into_scalar().elem::<f32>() == 0.0,
                    KronFactor::Product(_) => false,
                };
                zero_sides.push((zero(&e.factors.w1), zero(&e.factors.w2)));
            }
        });
        let want = match init {
            LokrInitWeights::Bool(true) => (true, false),
            _ => (false, true),
        };
        assert!(
            zero_sides.len() == 4 && zero_sides.iter().all(|z| *z == want),
            "{init:?}: zero factors (w1, w2) {zero_sides:?}"
        );
        // Default targets q_proj (16 → 16: 4·4 by 4·4) and v_proj
        // (16 → 8: 4·4 in, 2·4 out), r = 8 is no side's half: full factors.
        let per_layer = (4 * 4 + 4 * 4) + (2 * 4 + 4 * 4);
        assert_eq!(lokr.param_count().trainable, 2 * per_layer);
    }
    // Saved as PEFT saves (`inference_mode: true`), and read back.
    let lokr = LokrModel::new(base.clone(), LokrConfig::new(2, 4.0, &["up_proj"])).unwrap();
    let dir = temp_dir("lokr-fresh-saved");
    lokr.save_pretrained(&dir).unwrap();
    let text = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    let saved: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(saved["inference_mode"], true, "{text}");
    assert_eq!(saved["peft_type"], "LOKR", "{text}");
    assert_eq!(LokrConfig::from_json_str(&text, &dir).unwrap().r, 2);
    std::fs::remove_dir_all(&dir).unwrap();
    let random = LokrConfig {
        init_weights: LokrInitWeights::Bool(false),
        ..LokrConfig::default()
    };
    let lokr = LokrModel::new(base.clone(), random).unwrap();
    let moved = max_diff(&host(lokr.model.forward(ids, None)), &want);
    assert!(
        moved.is_finite() && moved > 1e-4,
        "init_weights: false is the identity ({moved:e})"
    );

    let err = LokrModel::new(base.clone(), LokrConfig::new(4, 8.0, &["nothing"])).unwrap_err();
    assert!(matches!(err, PeftError::NoTargetMatched { .. }), "{err}");
    let err = LokrModel::new(base.clone(), LokrConfig::new(0, 8.0, &["q_proj"])).unwrap_err();
    assert!(err.to_string().contains("`r`"), "{err}");
    let origin = std::path::Path::new("adapter_config.json");
    let err =
        LokrConfig::from_json_str(r#"{"peft_type": "LOKR", "init_weights": "pissa"}"#, origin)
            .unwrap_err();
    assert!(matches!(err, PeftError::Json { .. }), "{err}");
    let err = LokrConfig::from_json_str(r#"{"peft_type": "LOHA"}"#, origin).unwrap_err();
    assert!(err.to_string().contains("not LOKR"), "{err}");
    let gpt2 = Gpt2::<B>::load(&fixtures_dir().join("gpt2"), d).unwrap();
    let err = LokrModel::new(gpt2, LokrConfig::new(4, 8.0, &["c_attn"])).unwrap_err();
    assert!(
        err.to_string().contains("Conv1D"),
        "GPT-2 refused as PEFT does: {err}"
    );

    check_bad_shape_refused::<B, _, Lokr>(
        "llama",
        "lokr_custom",
        "base_model.model.model.layers.1.mlp.up_proj.lokr_w2_b",
        base,
    );
}

backend_tests!(
    llama_lokr,
    llama_lokr_custom,
    bert_lokr,
    layouts_follow_peft,
    fresh_is_identity_and_errors_are_typed
);

fn llama_gradients<B: AutodiffBackend>(d: &B::Device) {
    for case in ["lokr", "lokr_custom"] {
        check_gradients::<B, _, Lokr, LokrFactors<B>>(
            "llama",
            case,
            llama::<B>(d),
            |m, ids| causal_lm_loss(m.forward(ids.clone(), None), ids),
            d,
        );
    }
}
fn bert_gradients<B: AutodiffBackend>(d: &B::Device) {
    check_gradients::<B, _, Lokr, LokrFactors<B>>(
        "bert",
        "lokr",
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
    for case in ["lokr", "lokr_custom"] {
        check_training_steps::<B, _, Lokr>(
            "llama",
            case,
            llama::<B>(d),
            |m, ids, _| causal_lm_loss(m.forward(ids.clone(), None), ids),
            d,
        );
    }
    check_training_steps::<B, _, Lokr>(
        "bert",
        "lokr",
        bert::<B>(d),
        |m, ids, labels| cross_entropy(m.classify(ids, None).unwrap(), labels.expect("labels")),
        d,
    );
}

autodiff_backend_tests!(llama_gradients, bert_gradients, training_steps);
