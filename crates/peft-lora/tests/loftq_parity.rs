//! LoftQ (`init_lora_weights: "loftq"`) against PEFT 0.21's own
//! `loftq_init` with bitsandbytes 0.50.2 (`scripts/make_loftq_fixture.py` →
//! `fixtures/loftq/loftq.safetensors`), on the real all-MiniLM-L6-v2: layer
//! 0's query (square), intermediate (tall) and output (wide) projections,
//! with one and two LoftQ iterations.
//!
//! What must agree: the NF4 codes and block absmax values of the base, the
//! adapter's `B·A`, each rank component of `A` and `B` (up to the sign an
//! SVD leaves free), the error left, and the sentence embeddings of the
//! whole LoftQ model. The embeddings are also checked to differ from those
//! of the `f32` model and of the NF4 base alone, by far more than the
//! tolerance, so a LoftQ that skipped quantizing or left the adapter at zero
//! fails.

use std::collections::HashMap;
use std::path::Path;

mod common;

use burn::backend::NdArray;
use common::{check_components, embeddings, product, MODULES};
use peft_core::compare::{check_close_slices, max_abs, max_abs_diff, Tolerance};
use peft_core::config::InitLoraWeights;
use peft_core::io::{read_safetensors, HostTensor};
use peft_core::quant::Nf4Scales;
use peft_core::{LoraConfig, PeftModel};
use peft_lora::LoraModel;
use peft_models::assets;
use peft_models::bert::Bert;

type B = NdArray;

const RANK: usize = 8;

fn fixture() -> HashMap<String, HostTensor> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/loftq/loftq.safetensors");
    read_safetensors(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// MiniLM with LoftQ on the three modules: rank 8, `lora_alpha`, and
/// `iterations` rounds.
fn loftq_minilm(base: &Bert<B>, lora_alpha: f64, iterations: usize) -> LoraModel<B, Bert<B>> {
    let targets: Vec<&str> = MODULES.iter().map(|(_, p)| *p).collect();
    let mut config = LoraConfig::new(RANK, lora_alpha, &targets);
    config.init_lora_weights = InitLoraWeights::Named("loftq".into());
    config.extra.insert(
        "loftq_config".into(),
        serde_json::json!({"loftq_bits": 4, "loftq_iter": iterations}),
    );
    LoraModel::new(base.clone(), config).unwrap()
}

/// Every targeted module of `model` (LoftQ applied to `base`): `(key, the
/// original weight [out, in], its quantized form, A [r, in], B [out, r],
/// s·B·A [out, in])`, PyTorch's layouts.
type Module = (
    String,
    HostTensor,
    peft_core::quant::QuantizedMatrix,
    HostTensor,
    HostTensor,
    HostTensor,
);

fn modules(base: &Bert<B>, model: &Bert<B>) -> Vec<Module> {
    let mut original = HashMap::new();
    base.visit_linears(&mut |path, slot| {
        original.insert(
            path.to_string(),
            HostTensor::from_tensor(slot.base_weight()),
        );
    });
    let mut out = Vec::new();
    model.visit_linears(&mut |path, slot| {
        let Some(entry) = slot.entry::<peft_core::LoraEntry<_>>("default") else {
            assert!(!slot.is_quantized(), "{path}: untargeted but quantized");
            return;
        };
        let key = MODULES.iter().find(|(_, p)| *p == path).unwrap().0;
        let q = slot.quantized.as_ref().expect("a LoftQ base is quantized");
        out.push((
            key.to_string(),
            original[path].transposed(),
            (**q).clone(),
            HostTensor::from_tensor(entry.a.val()).transposed(),
            HostTensor::from_tensor(entry.b.val()).transposed(),
            HostTensor::from_tensor(entry.delta_weight()).transposed(),
        ));
    });
    assert_eq!(out.len(), MODULES.len());
    out
}

fn frobenius(v: impl Iterator<Item = f32>) -> f32 {
    v.map(|x| (x as f64).powi(2)).sum::<f64>().sqrt() as f32
}

#[test]
fn loftq_is_peft_loftq_on_minilm() {
    let t = fixture();
    let device = Default::default();
    let base = Bert::<B>::load(&assets::fetch("minilm").unwrap(), &device).unwrap();
    let emb_tol = Tolerance::new(1e-5, 0.0);
    for iterations in [1, 2] {
        let model = loftq_minilm(&base, RANK as f64, iterations);
        for (key, w, q, a, b, delta) in modules(&base, &model.model) {
            let name = |k: &str| format!("{key}.iter{iterations}.{k}");
            let what = format!(
                "{key} ({} × {}), loftq_iter {iterations}",
                w.shape[0], w.shape[1]
            );
            // The base: the same NF4 codes and exact block absmax values.
            let codes = &t[&name("codes")].data;
            assert_eq!(q.data.len(), codes.len(), "{what}: code bytes");
            let differ = q
                .data
                .iter()
                .zip(codes)
                .filter(|(x, y)| **x as f32 != **y)
                .count();
            let Some(Nf4Scales::Exact(absmax)) = q.nf4.as_ref() else {
                panic!("{what}: a LoftQ base keeps exact block absmax values");
            };
            if iterations == 1 {
                // NF4 of the weight itself: bit for bit.
                assert_eq!(differ, 0, "{what}: {differ} code bytes differ");
                assert_eq!(
                    absmax.as_slice(),
                    t[&name("absmax")].data.as_slice(),
                    "{what}"
                );
            } else {
                // NF4 of W − L·R, whose f32 rounding (ours from an f64 SVD,
                // PEFT's from an f32 one) may move a value across a level's
                // midpoint: allow one byte in 10,000.
                assert!(
                    differ * 10_000 <= codes.len(),
                    "{what}: {differ} code bytes differ"
                );
                check_close_slices(
                    &what,
                    absmax,
                    &t[&name("absmax")].data,
                    Tolerance::new(1e-5, 0.0),
                )
                .unwrap();
            }
            // The adapter: B·A, then each rank component up to its sign.
            let (peft_a, peft_b) = (&t[&name("lora_A")], &t[&name("lora_B")]);
            assert_eq!(
                (&a.shape, &b.shape),
                (&peft_a.shape, &peft_b.shape),
                "{what}"
            );
            let want = product(peft_b, peft_a);
            let d = check_close_slices(
                &format!("{what}: B·A"),
                &delta.data,
                &want,
                Tolerance::new(1e-4, 0.0),
            )
            .unwrap();
            check_components(
                &what,
                (&a, &b),
                (peft_a, peft_b),
                true,
                Tolerance::new(1e-3, 0.0),
            );
            // What LoftQ leaves: ‖W − deq(Q) − B·A‖, and less than NF4 alone.
            let deq = q.dequantize();
            let err = frobenius((0..w.data.len()).map(|i| w.data[i] - deq[i] - delta.data[i]));
            let peft_err = t[&name("error")].data[0];
            assert!(
                (err - peft_err).abs() <= 1e-4 * peft_err,
                "{what}: error {err} vs PEFT's {peft_err}"
            );
            assert!(err < t[&format!("{key}.nf4_error")].data[0], "{what}");
            eprintln!("{what}: B·A within {d:e} of PEFT's (max {:e}); {differ} code bytes differ; error {err:.5} (PEFT {peft_err:.5})", max_abs(&want));
        }
        // The whole model: PEFT's embeddings, and not those of the f32
        // model or of the quantized base without its adapter.
        let ours = embeddings(&model.model, &t);
        let want = &t[&format!("embeddings.iter{iterations}")];
        let d = check_close_slices(
            &format!("embeddings, loftq_iter {iterations}"),
            &ours.data,
            &want.data,
            emb_tol,
        )
        .unwrap();
        let bound = emb_tol.bound(&want.data);
        for other in [
            format!("embeddings.iter{iterations}.nf4_only"),
            "embeddings.f32".to_string(),
        ] {
            let apart = max_abs_diff(&want.data, &t[&other].data);
            assert!(
                apart > 20.0 * bound,
                "{other} is only {apart:e} from the LoftQ embeddings"
            );
        }
        eprintln!("embeddings, loftq_iter {iterations}: within {d:e} of PEFT's (bound {bound:e})");
    }
}

/// With `lora_alpha ≠ r` the factors are divided by `√s`, so the adapter's
/// `s·B·A` (not `B·A`) equals PEFT's `L·R` and the model still starts at
/// `deq(Q) + L·R ≈ W` (PEFT assigns `L`, `R` unscaled, which leaves
/// `deq(Q) + s·L·R`: the same when `lora_alpha = r`, documented in
/// `loftq.rs`).
#[test]
fn loftq_with_another_scaling_keeps_peft_approximation() {
    let t = fixture();
    let device = Default::default();
    let base = Bert::<B>::load(&assets::fetch("minilm").unwrap(), &device).unwrap();
    let model = loftq_minilm(&base, 4.0 * RANK as f64, 1);
    for (key, _, _, a, b, delta) in modules(&base, &model.model) {
        let want = product(
            &t[&format!("{key}.iter1.lora_B")],
            &t[&format!("{key}.iter1.lora_A")],
        );
        check_close_slices(
            &format!("{key}: s·B·A"),
            &delta.data,
            &want,
            Tolerance::new(1e-4, 0.0),
        )
        .unwrap();
        // And B·A itself is a quarter of it (s = 4), not PEFT's L·R.
        let unscaled = product(&b, &a);
        let d = max_abs_diff(&unscaled, &want);
        assert!(
            d > 0.5 * max_abs(&want),
            "{key}: B·A is PEFT's L·R unscaled ({d:e})"
        );
    }
}
