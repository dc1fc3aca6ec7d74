//! PiSSA and OLoRA (`init_lora_weights` `"pissa"` / `"olora"`) against PEFT
//! 0.21's own `pissa_init` / `olora_init` on the real all-MiniLM-L6-v2
//! (`scripts/make_base_split_fixtures.py` → `fixtures/base_split/`): layer
//! 0's query (square), intermediate (tall) and output (wide) projections,
//! rank 8, `lora_alpha` 16 (scaling 2, so a split that ignored the scaling
//! fails).
//!
//! What must agree: each factor (OLoRA's directly; PiSSA's up to the sign
//! each singular pair leaves free), the residual `W − s·B·A` (and it must be
//! far from `W`), the embeddings right after the init (the base's), after
//! moving the factors (PEFT's "trained" adapter, loaded from its folder on
//! the untouched base, which PEFT splits again on load), the conversion to a
//! plain rank-16 LoRA (PEFT's `path_initial_model_for_weight_conversion`
//! file: config and `B'·A'`) and that converted adapter's embeddings on the
//! untouched base. Deleting the adapter gives the original weights back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

mod common;

use burn::backend::NdArray;
use common::{check_components, embeddings, product, MODULES};
use peft_core::compare::{check_close_slices, max_abs, max_abs_diff, Tolerance};
use peft_core::config::InitLoraWeights;
use peft_core::io::{read_safetensors, HostTensor};
use peft_core::{LoraConfig, LoraEntry, PeftModel};
use peft_lora::{ConvertToLora, InitialFactors, LoraModel};
use peft_models::assets;
use peft_models::bert::Bert;

type B = NdArray;

const RANK: usize = 8;
const ALPHA: f64 = 16.0;
const SCALING: f32 = 2.0;
const INITS: [&str; 2] = ["pissa", "olora"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/base_split")
}

fn fixture() -> HashMap<String, HostTensor> {
    let path = fixtures().join("base_split.safetensors");
    read_safetensors(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn minilm() -> Bert<B> {
    Bert::<B>::load(&assets::fetch("minilm").unwrap(), &Default::default()).unwrap()
}

fn split_minilm(base: &Bert<B>, init: &str) -> LoraModel<B, Bert<B>> {
    let targets: Vec<&str> = MODULES.iter().map(|(_, p)| *p).collect();
    let mut config = LoraConfig::new(RANK, ALPHA, &targets);
    config.init_lora_weights = InitLoraWeights::Named(init.into());
    LoraModel::new(base.clone(), config).unwrap()
}

/// Each module's base weight `[out, in]` (PyTorch's layout).
fn weights(model: &Bert<B>) -> HashMap<String, HostTensor> {
    let mut out = HashMap::new();
    model.visit_linears(&mut |path, slot| {
        out.insert(
            path.to_string(),
            HostTensor::from_tensor(slot.base_weight()).transposed(),
        );
    });
    out
}

/// `ours` within the embedding tolerance of the fixture's `key`.
fn check_embeddings(what: &str, ours: &[f32], t: &HashMap<String, HostTensor>, key: &str) {
    let d = check_close_slices(what, ours, &t[key].data, Tolerance::new(1e-5, 0.0)).unwrap();
    eprintln!("{what}: within {d:e} of PEFT's {key}");
}

#[test]
fn pissa_and_olora_split_minilm_as_peft_does() {
    let t = fixture();
    let base = minilm();
    let original = weights(&base);
    for init in INITS {
        let model = split_minilm(&base, init);
        let residuals = weights(&model.model);
        for (key, path) in MODULES {
            let what = format!("{init} {key}");
            let entry_of = |m: &Bert<B>| {
                let mut found = None;
                m.visit_linears(&mut |p, slot| {
                    if p == path {
                        let e = slot.entry::<LoraEntry<B>>("default").unwrap();
                        found = Some((
                            HostTensor::from_tensor(e.a.val()).transposed(),
                            HostTensor::from_tensor(e.b.val()).transposed(),
                        ));
                    }
                });
                found.unwrap()
            };
            let (a, b) = entry_of(&model.model);
            let (peft_a, peft_b) = (
                &t[&format!("{init}.{key}.lora_A")],
                &t[&format!("{init}.{key}.lora_B")],
            );
            assert_eq!(
                (&a.shape, &b.shape),
                (&peft_a.shape, &peft_b.shape),
                "{what}"
            );
            // OLoRA's QR has LAPACK's signs, so its factors are PEFT's as
            // they are; an SVD's pair signs are free.
            check_components(
                &what,
                (&a, &b),
                (peft_a, peft_b),
                init == "pissa",
                Tolerance::new(1e-4, 0.0),
            );
            // The residual is W − s·B·A with PEFT's factors, and far from W.
            let w = &original[path];
            let taken: Vec<f32> = product(peft_b, peft_a)
                .iter()
                .map(|v| v * SCALING)
                .collect();
            let want: Vec<f32> = w.data.iter().zip(&taken).map(|(w, d)| w - d).collect();
            let d = check_close_slices(
                &format!("{what}: residual"),
                &residuals[path].data,
                &want,
                Tolerance::new(1e-5, 0.0),
            )
            .unwrap();
            let norm = residuals[path]
                .data
                .iter()
                .map(|v| (*v as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            let peft_norm = t[&format!("{init}.{key}.residual_norm")].data[0] as f64;
            assert!(
                (norm - peft_norm).abs() < 1e-5 * peft_norm,
                "{what}: |W_res| {norm} vs {peft_norm}"
            );
            assert!(
                max_abs(&taken) > 1000.0 * d,
                "{what}: the split took next to nothing"
            );
        }
        check_embeddings(
            &format!("{init}: right after the init"),
            &embeddings(&model.model, &t).data,
            &t,
            &format!("embeddings.{init}.init"),
        );
        // Deleting the adapter adds the split part back.
        let mut model = model;
        model.delete_adapter("default").unwrap();
        let back = weights(&model.model);
        for (_, path) in MODULES {
            check_close_slices(
                &format!("{init} {path}: after delete"),
                &back[path].data,
                &original[path].data,
                Tolerance::new(1e-6, 0.0),
            )
            .unwrap();
        }
    }
}

#[test]
fn a_moved_split_adapter_loads_and_converts_as_peft_does() {
    let t = fixture();
    let base = minilm();
    let base_emb = embeddings(&base, &t).data;
    let dir = std::env::temp_dir().join(format!("peft-base-split-{}", std::process::id()));
    for init in INITS {
        // PEFT's saved adapter (config: init_lora_weights INIT) on the
        // untouched base: the base is split again, then the file's factors load.
        let raw = fixtures().join(format!("{init}_raw"));
        let model = LoraModel::from_pretrained(base.clone(), &raw).unwrap();
        let ours = embeddings(&model.model, &t).data;
        check_embeddings(
            &format!("{init}: raw adapter loaded"),
            &ours,
            &t,
            &format!("embeddings.{init}.raw_loaded"),
        );
        check_embeddings(
            &format!("{init}: raw adapter loaded"),
            &ours,
            &t,
            &format!("embeddings.{init}.trained"),
        );
        let moved = max_abs_diff(&ours, &base_emb);
        assert!(
            moved > 1e-2,
            "{init}: the moved adapter changes nothing ({moved:e})"
        );

        // The conversion, from the split recorded at load.
        let (config, tensors) = model
            .as_plain_lora("default", InitialFactors::Recorded)
            .unwrap();
        assert_eq!(
            (config.r, config.lora_alpha),
            (2 * RANK, 2.0 * ALPHA),
            "{init}"
        );
        assert_eq!(config.init_lora_weights, InitLoraWeights::Bool(true));
        let peft = read_safetensors(
            &fixtures().join(format!("{init}_converted/adapter_model.safetensors")),
        )
        .unwrap();
        assert_eq!(tensors.len(), peft.len(), "{init}: keys");
        let ours: HashMap<String, HostTensor> = tensors.into_iter().collect();
        let moved_file = read_safetensors(&raw.join("adapter_model.safetensors")).unwrap();
        for (_, path) in MODULES {
            let key = |f: &str| format!("base_model.model.{path}.{f}.weight");
            let (a, b) = (&ours[&key("lora_A")], &ours[&key("lora_B")]);
            let (pa, pb) = (&peft[&key("lora_A")], &peft[&key("lora_B")]);
            assert_eq!(
                (&a.shape, &b.shape),
                (&pa.shape, &pb.shape),
                "{init} {path}"
            );
            // B'·A' = B·A − B₀·A₀ is a small difference of two products of
            // the weight's principal part: its rounding is relative to them.
            let terms = max_abs(&product(
                &moved_file[&key("lora_B")],
                &moved_file[&key("lora_A")],
            ));
            let want = product(pb, pa);
            let d = check_close_slices(
                &format!("{init} {path}: converted B'·A'"),
                &product(b, a),
                &want,
                Tolerance::new(0.0, 1e-5 * terms),
            )
            .unwrap();
            assert!(
                max_abs(&want) > 100.0 * d,
                "{init} {path}: the update is rounding noise"
            );
            eprintln!(
                "{init} {path}: converted B'·A' within {d:e} (max {:e}, terms {terms:e})",
                max_abs(&want)
            );
        }
        // Saved and loaded on the untouched base, it is PEFT's converted adapter.
        let out = dir.join(init);
        model
            .save_as_lora("default", &out, InitialFactors::Recorded)
            .unwrap();
        let saved = std::fs::read_to_string(out.join("adapter_config.json")).unwrap();
        assert!(saved.contains("\"init_lora_weights\": true"), "{saved}");
        let plain = LoraModel::from_pretrained(base.clone(), &out).unwrap();
        assert_eq!(
            weights(&plain.model),
            weights(&base),
            "{init}: a plain LoRA leaves the base alone"
        );
        check_embeddings(
            &format!("{init}: converted, on the untouched base"),
            &embeddings(&plain.model, &t).data,
            &t,
            &format!("embeddings.{init}.converted"),
        );
        // And from an initial adapter folder instead of the record: the
        // fresh split saved right after the init (as PEFT's recipe does).
        let fresh = split_minilm(&base, init);
        let initial = dir.join(format!("{init}_initial"));
        fresh.save_adapter("default", &initial).unwrap();
        let (_, from_folder) = model
            .as_plain_lora("default", InitialFactors::Folder(&initial))
            .unwrap();
        for (k, v) in from_folder {
            assert_eq!(v, ours[&k], "{init} {k}: folder and record disagree");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn what_a_split_cannot_do_is_refused_by_name() {
    let base = minilm();
    let targets = ["encoder.layer.0.attention.self.query"];
    // A rank beyond the weight, an unknown init, a quantized base.
    let mut config = LoraConfig::new(385, 16.0, &targets);
    config.init_lora_weights = InitLoraWeights::Named("olora".into());
    let err = LoraModel::new(base.clone(), config)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("rank 385"), "{err}");
    let mut config = LoraConfig::new(8, 16.0, &targets);
    config.init_lora_weights = InitLoraWeights::Named("pissa_niter_x".into());
    let err = LoraModel::new(base.clone(), config)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("pissa_niter_x") && err.contains("\"olora\""),
        "{err}"
    );
    let mut quantized = base.clone();
    quantized.visit_linears_mut(&mut |_, slot| slot.quantize_nf4("x").unwrap());
    let mut config = LoraConfig::new(8, 16.0, &targets);
    config.init_lora_weights = InitLoraWeights::Named("pissa".into());
    let err = LoraModel::new(quantized, config).err().unwrap().to_string();
    assert!(err.contains("quantized"), "{err}");
    // DoRA has no plain-LoRA form; an adapter that never split has nothing
    // to convert against.
    let mut config = LoraConfig::new(8, 16.0, &targets);
    config.init_lora_weights = InitLoraWeights::Named("pissa".into());
    config.use_dora = true;
    let dora = LoraModel::new(base.clone(), config).unwrap();
    let err = dora
        .as_plain_lora("default", InitialFactors::Recorded)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("DoRA"), "{err}");
    let plain = LoraModel::new(base, LoraConfig::new(8, 16.0, &targets)).unwrap();
    let err = plain
        .as_plain_lora("default", InitialFactors::Recorded)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("did not start from a PiSSA / OLoRA split"),
        "{err}"
    );
}

/// On the decoders (tiny Llama's q/v projections, GPT-2's fused `c_attn`,
/// which stores `[in, out]` as PEFT's `fan_in_fan_out`): the split keeps
/// the logits, its factors are not zero, moved factors merge to the logits
/// they give unmerged, and deleting the adapter restores the weights.
#[test]
fn splits_keep_the_decoders_output() {
    use peft_models::fixtures::{tiny_gpt2, tiny_llama};
    let d = Default::default();
    let ids = burn::tensor::Tensor::<B, 2, burn::tensor::Int>::from_data(
        burn::tensor::TensorData::new(vec![1i64, 5, 9, 2, 7], [1, 5]),
        &d,
    );
    fn check<M: PeftModel<B> + Clone>(
        what: &str,
        base: M,
        targets: &[&str],
        logits: &dyn Fn(&M) -> Vec<f32>,
    ) {
        let want = logits(&base);
        let original = {
            let mut w = HashMap::new();
            base.visit_linears(&mut |p, s| {
                w.insert(p.to_string(), HostTensor::from_tensor(s.base_weight()));
            });
            w
        };
        for init in INITS {
            let mut config = LoraConfig::new(4, 8.0, targets);
            config.init_lora_weights = InitLoraWeights::Named(init.into());
            let mut model = LoraModel::new(base.clone(), config).unwrap();
            let what = format!("{what} {init}");
            let tol = Tolerance::new(1e-5, 0.0);
            check_close_slices(
                &format!("{what}: after the init"),
                &logits(&model.model),
                &want,
                tol,
            )
            .unwrap();
            let mut moved = 0;
            model.model.visit_linears_mut(&mut |_, s| {
                if let Some(e) = s.entry_mut::<LoraEntry<B>>("default") {
                    assert!(
                        max_abs(&HostTensor::from_tensor(e.b.val()).data) > 0.0,
                        "{what}: B is zero"
                    );
                    e.b = burn::module::Param::from_tensor(e.b.val() * 1.5);
                    moved += 1;
                }
            });
            assert!(moved >= 2, "{what}: {moved} modules");
            let unmerged = logits(&model.model);
            assert!(
                max_abs_diff(&unmerged, &want) > 1e-3,
                "{what}: moving B changed nothing"
            );
            model.merge_adapter().unwrap();
            check_close_slices(
                &format!("{what}: merged"),
                &logits(&model.model),
                &unmerged,
                tol,
            )
            .unwrap();
            model.unmerge_adapter();
            model.delete_adapter("default").unwrap();
            model.model.visit_linears(&mut |p, s| {
                let w = HostTensor::from_tensor(s.base_weight());
                check_close_slices(
                    &format!("{what} {p}: after delete"),
                    &w.data,
                    &original[p].data,
                    Tolerance::new(1e-6, 0.0),
                )
                .unwrap();
            });
        }
    }
    check("llama", tiny_llama::<B>(&d), &["q_proj", "v_proj"], &|m| {
        HostTensor::from_tensor(m.forward(ids.clone(), None)).data
    });
    check("gpt2", tiny_gpt2::<B>(&d), &["c_attn"], &|m| {
        HostTensor::from_tensor(m.forward(ids.clone(), None)).data
    });
}
