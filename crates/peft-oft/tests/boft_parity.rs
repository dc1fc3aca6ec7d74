//! BOFT parity with Hugging Face PEFT 0.21 on the fixtures of
//! `scripts/make_method_fixtures.py` (tiny Llama with PEFT's default targets
//! in 4 × 4 blocks, one factor, random init; three butterfly factors of 4
//! blocks on q/o/down_proj, made with PEFT's CUDA-path definition; BERT in
//! 4 × 4 blocks from the identity, its biases unscaled; generators and scales trained a few
//! steps in PyTorch): logits in every state (both adapters active, mixed
//! batches, merged), gradients, two training steps, files and parameter
//! counts, within 1e-5 on every backend.

use burn::module::{AutodiffModule, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use peft_core::compare;
use peft_core::io::HostTensor;
use peft_core::slot::BoftEntry;
use peft_core::{autodiff_backend_tests, backend_tests, LinearSlot, PeftError, PeftModel};
use peft_models::bert::Bert;
use peft_models::fixtures::{fixtures_dir, max_diff, temp_dir, FixtureCase};
use peft_models::gpt2::Gpt2;
use peft_models::llama::Llama;
use peft_models::loss::{causal_lm_loss, cross_entropy};
use peft_models::slot_parity::{
    check_bad_shape_refused, check_gradients, check_slot_method_case, check_training_steps,
    EntryGradients,
};
use peft_oft::{Boft, BoftConfig, BoftModel, MethodConfig};

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
fn ids<B: Backend>(d: &B::Device) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(vec![1i64, 5, 9, 2], [1, 4]), d)
}

fn llama_boft<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, Boft>("llama", "boft", llama::<B>(d), lm::<B>, d);
}
fn llama_boft_butterfly<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, Boft>("llama", "boft_butterfly", llama::<B>(d), lm::<B>, d);
}
fn bert_boft<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, Boft>("bert", "boft", bert::<B>(d), cls::<B>, d);
}

/// PEFT's `update_layer` layouts: block count or size, the butterfly
/// factors' permutations (the first the identity).
#[test]
fn layouts_are_peft_s() {
    let by_size = BoftConfig::new(4, 2, &["x"]);
    let l = by_size.layout(16, 2, "x").unwrap();
    assert_eq!((l.blocks, l.block_size, l.perms.len()), (4, 4, 2));
    assert_eq!(l.perms[0], Some((0..16).collect()));
    assert_eq!(
        l.perms[1],
        Some(vec![0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15])
    );
    let one = by_size.layout(16, 1, "x").unwrap();
    assert_eq!((one.blocks, one.block_size, one.perms), (4, 4, vec![None]));
    let by_count = BoftConfig {
        boft_block_num: 4,
        boft_block_size: 0,
        ..BoftConfig::new(0, 2, &["x"])
    };
    let l = by_count.layout(40, 2, "x").unwrap();
    assert_eq!((l.blocks, l.block_size), (4, 10));
    for (config, d_in, factors, needle) in [
        (&by_count, 18, 2, "must be divisible by boft_block_num (4)"),
        (
            &by_count,
            16,
            4,
            "Invalid combination of boft_n_butterfly_factor (4)",
        ),
        (&by_size, 18, 1, "must be divisible by boft_block_size (4)"),
        (&by_size, 16, 4, "Invalid combination of in_features (16)"),
        (
            &by_count,
            12,
            2,
            "boft_block_size (3) must be an even number",
        ),
    ] {
        let err = config
            .layout(d_in, factors, "layer.x")
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle) && err.contains("layer.x"), "{err}");
    }
}

/// A fresh adapter is the identity with PEFT's parameter count; errors
/// name what is wrong, and a refused file leaves the model as it was.
fn fresh_is_identity_and_errors_are_typed<B: Backend>(d: &B::Device) {
    let base = llama::<B>(d);
    let want = host(base.forward(ids::<B>(d), None));
    // PEFT's defaults: blocks of 4 on q_proj (16 → 16) and v_proj (16 →
    // 8): 4 blocks of 4 × 4 and one scale per output, per layer.
    let boft = BoftModel::new(base.clone(), BoftConfig::default()).unwrap();
    assert_eq!(host(boft.model.forward(ids::<B>(d), None)).data, want.data);
    assert_eq!(boft.param_count().trainable, 2 * (64 + 16 + 64 + 8));
    let random = BoftConfig {
        init_weights: false,
        ..BoftConfig::default()
    };
    let boft = BoftModel::new(base.clone(), random).unwrap();
    let moved = max_diff(&host(boft.model.forward(ids::<B>(d), None)), &want);
    assert!(
        moved.is_finite() && moved > 1e-4,
        "init_weights: false is the identity ({moved:e})"
    );

    let origin = std::path::Path::new("adapter_config.json");
    for (json, needle) in [
        (r#"{"peft_type": "BOFT", "boft_block_num": 2}"#, "not both"),
        (
            r#"{"peft_type": "BOFT", "boft_block_size": 0}"#,
            "must be non-zero",
        ),
        (
            r#"{"peft_type": "BOFT", "boft_n_butterfly_factor": 0}"#,
            "positive integer",
        ),
        (
            r#"{"peft_type": "BOFT", "boft_dropout": 1.5}"#,
            "`boft_dropout`",
        ),
        (r#"{"peft_type": "BOFT", "bias": "all"}"#, "`bias`"),
        (r#"{"peft_type": "OFT"}"#, "not BOFT"),
    ] {
        let err = BoftConfig::from_json_str(json, origin).unwrap_err();
        assert!(err.to_string().contains(needle), "{json}: {err}");
    }
    let err = BoftModel::new(base.clone(), BoftConfig::new(4, 1, &["nothing"])).unwrap_err();
    assert!(matches!(err, PeftError::NoTargetMatched { .. }), "{err}");
    // down_proj has 40 inputs: no blocks of 16.
    let err = BoftModel::new(base.clone(), BoftConfig::new(16, 1, &["down_proj"])).unwrap_err();
    assert!(
        err.to_string().contains("mlp.down_proj") && err.to_string().contains("divisible"),
        "{err}"
    );
    let gpt2 = Gpt2::<B>::load(&fixtures_dir().join("gpt2"), d).unwrap();
    let err = BoftModel::new(gpt2, BoftConfig::new(4, 1, &["c_attn"])).unwrap_err();
    assert!(err.to_string().contains("Conv1D"), "{err}");

    check_bad_shape_refused::<B, _, Boft>(
        "llama",
        "boft_butterfly",
        "base_model.model.model.layers.1.mlp.down_proj.boft_s",
        base,
    );
}

/// PEFT without its CUDA extension trains one factor whatever the config
/// says, and saves `boft_R` `[1, D, H, H]`: such a file (the one-factor
/// fixture, its config claiming two) loads as the one factor it holds.
fn a_one_factor_file_loads_as_peft_wrote_it<B: Backend>(d: &B::Device) {
    let c = FixtureCase::open("llama", "boft");
    let dir = temp_dir("boft-cpu-file");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        c.dir.join("adapter_model.safetensors"),
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    let text = std::fs::read_to_string(c.dir.join("adapter_config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    config["boft_n_butterfly_factor"] = 2.into();
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let boft = BoftModel::from_pretrained(llama::<B>(d), &dir).unwrap();
    let got = lm(&boft.model, c.ints::<B, 2>("input_ids", d));
    compare::assert_close(
        "one-factor file",
        &got,
        c.want("logits_unmerged"),
        compare::Tolerance::new(1e-5, 1e-5),
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A zero in `boft_s` would erase a column of the weight for good: the
/// merge is refused by name, and nothing merges anywhere.
fn a_zero_scale_is_not_merged<B: Backend>(d: &B::Device) {
    let c = FixtureCase::open("llama", "boft");
    let mut boft = BoftModel::from_pretrained(llama::<B>(d), &c.dir).unwrap();
    let target = "model.layers.1.self_attn.v_proj";
    let mut found = false;
    boft.model.visit_linears_mut(&mut |path, slot| {
        if path != target {
            return;
        }
        let e = slot.entry_mut::<BoftEntry<B>>("default").unwrap();
        let [rows, _] = e.scale.val().dims();
        let mut s = vec![1f32; rows];
        s[3] = 0.0;
        e.scale = Param::from_tensor(Tensor::from_data(TensorData::new(s, [rows, 1]), d));
        found = true;
    });
    assert!(found, "{target} carries the adapter");
    let before = lm(&boft.model, ids::<B>(d));
    let err = boft.merge_adapter().unwrap_err().to_string();
    assert!(err.contains(target) && err.contains("boft_s[3]"), "{err}");
    let mut merged = false;
    boft.model
        .visit_linears(&mut |_, s| merged |= s.any_merged());
    assert!(!merged, "a refused merge merged some layers");
    assert_eq!(lm(&boft.model, ids::<B>(d)).data, before.data);
}

backend_tests!(
    llama_boft,
    llama_boft_butterfly,
    bert_boft,
    fresh_is_identity_and_errors_are_typed,
    a_one_factor_file_loads_as_peft_wrote_it,
    a_zero_scale_is_not_merged
);

/// The gradients of `boft_R` and `boft_s`.
fn boft_gradients<B: AutodiffBackend>(
    slot: &LinearSlot<B>,
    name: &str,
    grads: &B::Gradients,
) -> Option<EntryGradients> {
    let e = slot.entry::<BoftEntry<B>>(name)?;
    Some(vec![
        ("boft_R", e.rotation.grad(grads).map(host)),
        ("boft_s", e.scale.grad(grads).map(host)),
    ])
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
    for case in ["boft", "boft_butterfly"] {
        check_gradients::<B, _, Boft>(
            "llama",
            case,
            llama::<B>(d),
            causal,
            d,
            Some(boft_gradients),
        );
    }
    check_gradients::<B, _, Boft>(
        "bert",
        "boft",
        bert::<B>(d),
        |m, ids| classify(m, ids, fixture_labels(d)),
        d,
        Some(boft_gradients),
    );
}

fn training_steps<B: AutodiffBackend>(d: &B::Device) {
    for case in ["boft", "boft_butterfly"] {
        check_training_steps::<B, _, Boft>(
            "llama",
            case,
            llama::<B>(d),
            |m, ids, _| causal(m, ids),
            d,
        );
    }
    check_training_steps::<B, _, Boft>(
        "bert",
        "boft",
        bert::<B>(d),
        |m, ids, labels| classify(m, ids, labels.expect("BERT's steps record labels")),
        d,
    );
}

/// `boft_dropout` 1 in training sets every block of the (one) factor to
/// the identity, leaving only `boft_s`: the training forward pass equals
/// the adapter with its generators zeroed, and inference keeps them.
fn dropout_acts_in_training_only<B: AutodiffBackend>(d: &B::Device) {
    let config = BoftConfig {
        init_weights: false,
        boft_dropout: 1.0,
        ..BoftConfig::default()
    };
    let boft = BoftModel::new(llama::<B>(d), config).unwrap();
    let training = lm(&boft.model, ids::<B>(d));
    let inference = lm(&boft.model.valid(), ids::<B::InnerBackend>(d));
    let mut unrotated = boft.clone();
    unrotated.model.visit_linears_mut(&mut |_, slot| {
        if let Some(e) = slot.entry_mut::<BoftEntry<B>>("default") {
            e.rotation = Param::from_tensor(e.rotation.val().zeros_like());
        }
    });
    let want = lm(&unrotated.model, ids::<B>(d));
    let tol = compare::Tolerance::new(1e-5, 1e-5);
    compare::assert_close("dropped rotations", &training, &want, tol);
    let kept = max_diff(&inference, &want);
    assert!(
        kept.is_finite() && kept > 1e-4,
        "inference dropped the rotation ({kept:e})"
    );
}

autodiff_backend_tests!(gradients, training_steps, dropout_acts_in_training_only);
