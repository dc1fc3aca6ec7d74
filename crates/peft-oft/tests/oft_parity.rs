//! OFT parity with Hugging Face PEFT 0.21 on the fixtures of
//! `scripts/make_method_fixtures.py` (tiny Llama with PEFT's default targets
//! in 4 × 4 blocks; `r` = 2 blocks per layer with `block_share` and a
//! 3-term Neumann series on q/o/down_proj; the exact Cayley transform on
//! q/v/up_proj from a random start; BERT in 8 × 8 blocks;
//! generators trained a few steps in PyTorch): logits in every state
//! (mixed batches included), gradients, two training steps, files and
//! parameter counts, within 1e-5 on every backend.

use burn::module::Param;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use peft_core::io::HostTensor;
use peft_core::slot::OftEntry;
use peft_core::{autodiff_backend_tests, backend_tests, LinearSlot, PeftError, PeftModel};
use peft_models::bert::Bert;
use peft_models::fixtures::{fixtures_dir, max_diff, FixtureCase};
use peft_models::gpt2::Gpt2;
use peft_models::llama::Llama;
use peft_models::loss::{causal_lm_loss, cross_entropy};
use peft_models::slot_parity::{
    check_bad_shape_refused, check_gradients, check_slot_method_case, check_training_steps,
    EntryGradients,
};
use peft_oft::{MethodConfig, Oft, OftConfig, OftModel};

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> HostTensor {
    HostTensor::from_tensor(t)
}
fn llama<B: Backend>(d: &B::Device) -> Llama<B> {
    Llama::load(&fixtures_dir().join("llama"), d).unwrap()
}
fn bert<B: Backend>(d: &B::Device) -> Bert<B> {
    Bert::load(&fixtures_dir().join("bert"), d).unwrap()
}
fn lm<B: Backend>(m: &Llama<B>, ids: Tensor<B, 2, Int>) -> HostTensor {
    host(m.forward(ids, None))
}
fn cls<B: Backend>(m: &Bert<B>, ids: Tensor<B, 2, Int>) -> HostTensor {
    host(m.classify(ids, None).unwrap())
}

fn llama_oft<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, Oft>("llama", "oft", llama::<B>(d), lm::<B>, d);
}
fn llama_oft_custom<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, Oft>("llama", "oft_custom", llama::<B>(d), lm::<B>, d);
}
fn llama_oft_exact<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, Oft>("llama", "oft_exact", llama::<B>(d), lm::<B>, d);
}
fn bert_oft<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, Oft>("bert", "oft", bert::<B>(d), cls::<B>, d);
}

/// PEFT's `adjust_oft_parameters`: a block size or count that does not
/// divide the layer's inputs moves to the nearest divisor.
#[test]
fn layouts_are_peft_s() {
    let blocks_of = |b: usize| OftConfig::new(b, &["x"]);
    assert_eq!(blocks_of(4).layout(16, "x"), (4, 4));
    assert_eq!(blocks_of(32).layout(16, "x"), (1, 16));
    assert_eq!(blocks_of(6).layout(40, "x"), (8, 5));
    assert_eq!(blocks_of(7).layout(40, "x"), (5, 8));
    let count = OftConfig {
        r: 3,
        oft_block_size: 0,
        ..OftConfig::new(0, &["x"])
    };
    // 3 blocks do not divide 40: 2 and 4 are as near, and PEFT takes the
    // lower.
    assert_eq!(count.layout(40, "x"), (2, 20));
}

/// A fresh adapter is the identity rotation with PEFT's parameter count;
/// errors name what is wrong, and a refused file leaves the model as it was.
fn fresh_is_identity_and_errors_are_typed<B: Backend>(d: &B::Device) {
    let base = llama::<B>(d);
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64, 5, 9, 2], [1, 4]), d);
    let want = host(base.forward(ids.clone(), None));
    // PEFT's defaults: blocks of 32, adjusted to the 16 inputs of q_proj
    // and v_proj: one 16 × 16 block, 120 generator entries, per layer.
    let oft = OftModel::new(base.clone(), OftConfig::default()).unwrap();
    assert_eq!(host(oft.model.forward(ids.clone(), None)).data, want.data);
    assert_eq!(oft.param_count().trainable, 2 * 2 * 120);
    let random = OftConfig {
        init_weights: false,
        ..OftConfig::default()
    };
    let oft = OftModel::new(base.clone(), random).unwrap();
    let moved = max_diff(&host(oft.model.forward(ids, None)), &want);
    assert!(
        moved.is_finite() && moved > 1e-4,
        "init_weights: false is the identity ({moved:e})"
    );

    let origin = std::path::Path::new("adapter_config.json");
    for (json, needle) in [
        (r#"{"peft_type": "OFT", "r": 2}"#, "not both"),
        (
            r#"{"peft_type": "OFT", "oft_block_size": 0}"#,
            "must be non-zero",
        ),
        (r#"{"peft_type": "OFT", "coft": true}"#, "`coft`"),
        (r#"{"peft_type": "OFT", "bias": "all"}"#, "`bias`"),
        (r#"{"peft_type": "LORA"}"#, "not OFT"),
    ] {
        let err = OftConfig::from_json_str(json, origin).unwrap_err();
        assert!(err.to_string().contains(needle), "{json}: {err}");
    }
    let err = OftModel::new(base.clone(), OftConfig::new(4, &["nothing"])).unwrap_err();
    assert!(matches!(err, PeftError::NoTargetMatched { .. }), "{err}");
    let gpt2 = Gpt2::<B>::load(&fixtures_dir().join("gpt2"), d).unwrap();
    let err = OftModel::new(gpt2, OftConfig::new(4, &["c_attn"])).unwrap_err();
    assert!(err.to_string().contains("Conv1D"), "{err}");

    check_bad_shape_refused::<B, _, Oft>(
        "llama",
        "oft_custom",
        "base_model.model.model.layers.1.mlp.down_proj.oft_R.weight",
        base,
    );
}

/// A rotation with a singular block cannot be merged, since its merge
/// could not be undone (the series `(1 + Q)²(1 + Q²)` of 5 terms vanishes
/// where `Q` has the eigenvalues ±i, here `Q₀₁ = 1`): the error names the
/// layer, and nothing merges anywhere.
fn a_singular_rotation_is_not_merged<B: Backend>(d: &B::Device) {
    let c = FixtureCase::open("llama", "oft_custom");
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64, 5, 9, 2], [1, 4]), d);
    let mut oft = OftModel::from_pretrained(llama::<B>(d), &c.dir).unwrap();
    let target = "model.layers.1.mlp.down_proj";
    let mut found = false;
    oft.model.visit_linears_mut(&mut |path, slot| {
        if path != target {
            return;
        }
        let e = slot.entry_mut::<OftEntry<B>>("default").unwrap();
        let [rows, cols] = e.weight.val().dims();
        let mut v = vec![0f32; rows * cols];
        for r in 0..rows {
            v[r * cols] = 1.0;
        }
        e.weight = Param::from_tensor(Tensor::from_data(TensorData::new(v, [rows, cols]), d));
        e.meta.cayley_neumann = true;
        e.meta.neumann_terms = 5;
        found = true;
    });
    assert!(found, "{target} carries the adapter");
    let before = lm(&oft.model, ids.clone());
    let err = oft.merge_adapter().unwrap_err().to_string();
    assert!(err.contains(target) && err.contains("singular"), "{err}");
    let mut merged = false;
    oft.model
        .visit_linears(&mut |_, s| merged |= s.any_merged());
    assert!(!merged, "a refused merge merged some layers");
    assert_eq!(lm(&oft.model, ids).data, before.data);
}

backend_tests!(
    llama_oft,
    llama_oft_custom,
    llama_oft_exact,
    bert_oft,
    fresh_is_identity_and_errors_are_typed,
    a_singular_rotation_is_not_merged
);

/// `oft_R.weight`'s gradient (PEFT's generator vector).
fn oft_gradients<B: AutodiffBackend>(
    slot: &LinearSlot<B>,
    name: &str,
    grads: &B::Gradients,
) -> Option<EntryGradients> {
    let e = slot.entry::<OftEntry<B>>(name)?;
    Some(vec![("oft_R.weight", e.weight.grad(grads).map(host))])
}

fn causal<B: AutodiffBackend>(m: &Llama<B>, ids: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    causal_lm_loss(m.forward(ids.clone(), None), ids)
}
fn classify<B: AutodiffBackend>(
    m: &Bert<B>,
    ids: Tensor<B, 2, Int>,
    labels: Tensor<B, 1, Int>,
) -> Tensor<B, 1> {
    cross_entropy(m.classify(ids, None).unwrap(), labels)
}
fn fixture_labels<B: Backend>(d: &B::Device) -> Tensor<B, 1, Int> {
    Tensor::from_data(TensorData::new(vec![2i64, 0, 1], [3]), d)
}

fn gradients<B: AutodiffBackend>(d: &B::Device) {
    for case in ["oft", "oft_custom", "oft_exact"] {
        check_gradients::<B, _, Oft>("llama", case, llama::<B>(d), causal, d, Some(oft_gradients));
    }
    check_gradients::<B, _, Oft>(
        "bert",
        "oft",
        bert::<B>(d),
        |m, ids| classify(m, ids, fixture_labels(d)),
        d,
        Some(oft_gradients),
    );
}

fn training_steps<B: AutodiffBackend>(d: &B::Device) {
    for case in ["oft", "oft_custom", "oft_exact"] {
        check_training_steps::<B, _, Oft>(
            "llama",
            case,
            llama::<B>(d),
            |m, ids, _| causal(m, ids),
            d,
        );
    }
    check_training_steps::<B, _, Oft>(
        "bert",
        "oft",
        bert::<B>(d),
        |m, ids, labels| classify(m, ids, labels.expect("BERT's steps record labels")),
        d,
    );
}

autodiff_backend_tests!(gradients, training_steps);
