//! QLoRA: LoRA on a base whose frozen weights stay quantized (GGML blocks as
//! a GGUF file stores them, or NF4), trained with layer-by-layer
//! recomputation so that only one layer's weights are ever dequantized.

use std::collections::HashMap;

use burn::backend::{Autodiff, NdArray};
use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use peft_core::config::InitLoraWeights;
use peft_core::io::HostTensor;
use peft_core::{autodiff_backend_tests, LoraConfig, PeftModel};
use peft_lora::LoraModel;
use peft_models::assets;
use peft_models::bert::Bert;
use peft_models::fixtures::{fixtures_dir, max_diff as max_abs_diff};
use peft_models::llama::{Llama, LlamaConfig};
use peft_models::loss::causal_lm_loss;
use peft_models::tokenizer::Tokenizer;

fn ids<B: Backend>(rows: usize, len: usize, vocab: usize, device: &B::Device) -> Tensor<B, 2, Int> {
    let v: Vec<i64> = (0..rows * len)
        .map(|i| ((i * 7919 + 13) % vocab) as i64)
        .collect();
    Tensor::from_data(TensorData::new(v, [rows, len]), device)
}

fn logits<B: Backend>(m: &Llama<B>, ids: &Tensor<B, 2, Int>) -> HostTensor {
    HostTensor::from_tensor(m.forward(ids.clone(), None))
}

/// Asserts that `got` holds the gradients of `want` (the same parameters,
/// each within 1e-4 of its largest entry).
fn assert_same_grads(
    want: &HashMap<ParamId, HostTensor>,
    got: &HashMap<ParamId, HostTensor>,
    what: &str,
) {
    assert!(!want.is_empty(), "{what}: no gradient");
    assert_eq!(got.len(), want.len(), "{what}");
    for (id, w) in want {
        let scale = w.data.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        let d = max_abs_diff(w, &got[id]) / scale;
        assert!(d < 1e-4, "{what}: gradient differs by {d:e} (relative)");
    }
}

/// Every trainable parameter's gradient, by parameter id.
fn grads_by_id<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &GradientsParams,
) -> HashMap<ParamId, HostTensor> {
    struct Collect<'a, B: AutodiffBackend> {
        grads: &'a GradientsParams,
        out: HashMap<ParamId, HostTensor>,
        _b: std::marker::PhantomData<B>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                self.out.insert(param.id, HostTensor::from_tensor(g));
            }
        }
    }
    let mut c = Collect::<B> {
        grads,
        out: HashMap::new(),
        _b: std::marker::PhantomData,
    };
    model.visit(&mut c);
    c.out
}

/// A GGUF loaded with its matrices kept quantized computes exactly what the
/// dequantizing loader computes (the q/k permutation undone on whole rows of
/// blocks, the tied head sharing the embedding table), counts the same
/// parameters, and merging a LoRA into it gives a dense `f32` base: on the
/// F32 tiny Llama and on one stored in every kept GGML type.
fn quantized_gguf_equals_dequantized_load<B: AutodiffBackend>(device: &B::Device) {
    for file in ["tiny_llama.gguf", "quant_llama.gguf"] {
        let path = fixtures_dir().join("gguf").join(file);
        let dense = Llama::<B>::from_gguf(&path, device).unwrap();
        let quant = Llama::<B>::from_gguf_quantized(&path, device).unwrap();
        let (mut slots, mut quantized_slots) = (0, 0);
        quant.visit_linears(&mut |_, s| {
            slots += 1;
            quantized_slots += usize::from(s.is_quantized());
        });
        assert_eq!(quantized_slots, slots, "{file}");
        // A tied head is a slot of the quantized model only (it shares the
        // quantized embedding); the dense load reuses its embedding tensor.
        let tied = usize::from(dense.lm_head.is_none());
        assert_eq!(slots, dense.linear_paths().len() + tied, "{file}");
        assert!(quant.embed_quantized.is_some(), "{file}");
        assert_eq!(
            quant.param_count().all,
            dense.param_count().all,
            "{file}: quantized weights still count as parameters"
        );
        let x = ids::<B>(2, 7, dense.config.vocab_size, device);
        let want = logits(&dense, &x);
        peft_core::compare::assert_close(
            &format!("{file}: kept quantized vs dequantized load"),
            &logits(&quant, &x),
            &want,
            peft_core::compare::Tolerance::new(1e-6, 0.0),
        );

        let mut config = LoraConfig::new(4, 8.0, &["q_proj", "v_proj", "down_proj"]);
        config.init_lora_weights = InitLoraWeights::Bool(false);
        B::seed(device, 3);
        let mut lora = LoraModel::new(quant, config).unwrap();
        let unmerged = logits(&lora.model, &x);
        lora.merge_adapter().unwrap();
        let mut dense_after = 0;
        lora.model.visit_linears(&mut |p, s| {
            if s.entry::<peft_core::LoraEntry<_>>("default").is_some() {
                assert!(!s.is_quantized(), "{file} {p}: merged weight must be f32");
                dense_after += 1;
            }
        });
        assert_eq!(dense_after, 3 * dense.layers.len());
        peft_core::compare::assert_close(
            &format!("{file}: merged into a quantized base"),
            &logits(&lora.model, &x),
            &unmerged,
            peft_core::compare::Tolerance::new(1e-5, 0.0),
        );
    }
}

/// Every matrix of `fixtures/gguf/quant_llama.gguf` (Q8_0, Q4_0, Q4_1,
/// Q4_K, Q6_K, F16, BF16; q and k in several types, their rows permuted
/// by llama.cpp) reads as gguf-py dequantises it
/// (`scripts/make_gguf_quant_llama_fixture.py`), in Hugging Face's layout,
/// from the dense load and from the blocks kept by the quantized load.
fn gguf_blocks_of_every_type_read_as_gguf_py_dequantises<B: AutodiffBackend>(device: &B::Device) {
    let dir = fixtures_dir().join("gguf");
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("quant_llama.json")).unwrap())
            .unwrap();
    let path = dir.join("quant_llama.gguf");
    let dense = Llama::<B>::from_gguf(&path, device).unwrap();
    let quant = Llama::<B>::from_gguf_quantized(&path, device).unwrap();
    let check = |what: &str, key: &str, shape: [usize; 2], values: &[f32]| {
        let w = &want[key];
        assert!(w.is_object(), "{key}: not in quant_llama.json");
        let expected_shape: Vec<usize> = serde_json::from_value(w["shape"].clone()).unwrap();
        assert_eq!(expected_shape, shape, "{what} {key}: shape");
        assert!(
            values.iter().all(|v| v.is_finite()),
            "{what} {key}: NaN/Inf"
        );
        let (sum, sum_sq) = values.iter().fold((0f64, 0f64), |(s, q), &v| {
            (s + v as f64, q + v as f64 * v as f64)
        });
        let scale = w["sum_sq"].as_f64().unwrap();
        // √(n · Σv²) bounds Σ|v|, the scale of the sum's rounding.
        let l1 = (values.len() as f64 * scale).sqrt();
        assert!(
            (sum - w["sum"].as_f64().unwrap()).abs() <= 1e-6 * l1,
            "{what} {key}: sum {sum} vs {}",
            w["sum"]
        );
        assert!(
            (sum_sq - scale).abs() <= 1e-6 * scale,
            "{what} {key}: sum of squares {sum_sq} vs {scale}"
        );
        let samples = w["samples"].as_array().unwrap();
        assert_eq!(samples.len(), 64, "{key}");
        for s in samples {
            let (i, v) = (s[0].as_u64().unwrap() as usize, s[1].as_f64().unwrap());
            let got = values[i] as f64;
            assert!(
                (got - v).abs() <= 1e-6 * v.abs().max(1e-3),
                "{what} {key}[{i}]: {got} vs {v}"
            );
        }
    };
    // `[d_in, d_out]` → PyTorch's `[out, in]`, row-major.
    let torch_layout = |w: Tensor<B, 2>| {
        let [i, o] = w.dims();
        let t = HostTensor::from_tensor(w.transpose());
        assert_eq!(t.shape, vec![o, i]);
        ([o, i], t.data)
    };
    let mut checked = 0;
    for (what, model) in [("dense", &dense), ("kept quantized", &quant)] {
        model.visit_linears(&mut |p, s| {
            let key = format!("{p}.weight");
            if p == "lm_head" {
                return; // tied: the embedding, checked below
            }
            let (shape, values) = torch_layout(s.base_weight());
            check(what, &key, shape, &values);
            checked += 1;
        });
    }
    assert_eq!(checked, 2 * 14);
    let table = quant.embed_quantized.as_ref().unwrap();
    check(
        "kept quantized",
        "model.embed_tokens.weight",
        [table.rows, table.cols],
        &table.dequantize(),
    );
    let e = HostTensor::from_tensor(dense.embed_tokens.weight.val());
    check(
        "dense",
        "model.embed_tokens.weight",
        [e.shape[0], e.shape[1]],
        &e.data,
    );
    let mut types: Vec<&str> = want
        .as_object()
        .unwrap()
        .values()
        .filter_map(|v| v["ggml_type"].as_str())
        .collect();
    types.sort_unstable();
    types.dedup();
    assert_eq!(
        types,
        ["BF16", "F16", "Q4_0", "Q4_1", "Q4_K", "Q6_K", "Q8_0"]
    );
}

/// A tiny Llama with LoRA (random `B`, so every factor has a gradient) on
/// every linear layer and the head.
fn tiny_lora<B: AutodiffBackend>(device: &B::Device, nf4: bool) -> Llama<B> {
    let mut cfg = LlamaConfig::new(96, 64, 128, 3, 4, 2);
    cfg.tie_word_embeddings = false;
    B::seed(device, 11);
    let mut base = cfg.init::<B>(device).unwrap();
    if nf4 {
        assert_eq!(base.quantize_base_nf4().unwrap(), 3 * 7 + 1);
    }
    let mut config = LoraConfig::new(
        4,
        8.0,
        &[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            "lm_head",
        ],
    );
    config.init_lora_weights = InitLoraWeights::Bool(false);
    LoraModel::new(base, config).unwrap().model
}

/// Layer-by-layer recomputation gives the loss and gradients of one
/// ordinary backward pass, on a dense and on an NF4 base.
fn layerwise_gradients_equal_one_backward_pass<B: AutodiffBackend>(device: &B::Device) {
    for nf4 in [false, true] {
        let model = tiny_lora::<B>(device, nf4);
        let x = ids::<B>(2, 9, 96, device);
        let loss = causal_lm_loss(model.forward(x.clone(), None), x.clone());
        let want_loss = loss.clone().into_scalar().elem::<f64>();
        let want = grads_by_id(
            &model,
            &GradientsParams::from_grads(loss.backward(), &model),
        );
        let (got_loss, grads) =
            model.loss_and_grads_by_layer(x.clone(), None, 5, |l| causal_lm_loss(l, x));
        let got = grads_by_id(&model, &grads);
        assert!(
            (got_loss - want_loss).abs() < 1e-5,
            "{got_loss} vs {want_loss}"
        );
        // 7 targets × 2 factors in each of 3 layers, and the head's 2.
        assert_eq!(want.len(), 3 * 7 * 2 + 2, "nf4 = {nf4}");
        assert_same_grads(&want, &got, &format!("nf4 = {nf4}"));
    }
}

/// The same on GPT-2 (fused `c_attn`, learned positions, tied head), through
/// the generic [`peft_core::layered`] seam, on an NF4 base.
fn gpt2_layerwise_gradients_equal_one_backward_pass<B: AutodiffBackend>(device: &B::Device) {
    B::seed(device, 12);
    let mut base = peft_models::fixtures::tiny_gpt2::<B>(device);
    base.quantize_base_nf4().unwrap();
    let mut config = LoraConfig::new(4, 8.0, &["c_attn", "c_proj", "c_fc"]);
    config.init_lora_weights = InitLoraWeights::Bool(false);
    let model = LoraModel::new(base, config).unwrap().model;
    let vocab = model.config.vocab_size;
    let x = ids::<B>(2, 7, vocab, device);
    let loss = causal_lm_loss(model.forward(x.clone(), None), x.clone());
    let want_loss = loss.clone().into_scalar().elem::<f64>();
    let want = grads_by_id(
        &model,
        &GradientsParams::from_grads(loss.backward(), &model),
    );
    let (got_loss, grads) =
        peft_core::layered::loss_and_grads_by_layer(&model, x.clone(), None, 3, |l| {
            causal_lm_loss(l, x)
        });
    let got = grads_by_id(&model, &grads);
    assert!(
        (got_loss - want_loss).abs() < 1e-5,
        "{got_loss} vs {want_loss}"
    );
    assert_same_grads(&want, &got, "GPT-2");
}

/// NF4 quantization of NF4-friendly numbers: the NF4 model's outputs are
/// those of a dense model holding the dequantized weights.
fn nf4_base_computes_with_its_dequantized_weights<B: AutodiffBackend>(device: &B::Device) {
    let quant = tiny_lora::<B>(device, true);
    let mut dense = quant.clone();
    dense.visit_linears_mut(&mut |_, s| s.dequantize_base());
    let x = ids::<B>(1, 5, 96, device);
    let d = max_abs_diff(&logits(&quant, &x), &logits(&dense, &x));
    assert!(d < 1e-5, "{d:e}");
    let mut bytes = 0;
    quant.visit_linears(&mut |_, s| bytes += s.quantized.as_ref().unwrap().stored_bytes());
    let mut values = 0;
    dense.visit_linears(&mut |_, s| values += s.d_input() * s.d_output());
    // 4 bits per value, one byte per 64 values, 4 bytes per 16,384.
    assert!(8 * bytes < 5 * values, "{bytes} bytes for {values} values");
}

/// DoRA on an NF4 base (its column norm reads the dequantized weight):
/// logits and layer-by-layer gradients are those of a dense model holding
/// the dequantized weights, and merging leaves an `f32` weight.
fn dora_on_an_nf4_base<B: AutodiffBackend>(device: &B::Device) {
    let mut cfg = LlamaConfig::new(96, 64, 128, 2, 4, 2);
    cfg.tie_word_embeddings = false;
    B::seed(device, 8);
    let mut base = cfg.init::<B>(device).unwrap();
    base.quantize_base_nf4().unwrap();
    let mut config = LoraConfig::new(4, 8.0, &["q_proj", "v_proj", "down_proj"]);
    config.use_dora = true;
    config.init_lora_weights = InitLoraWeights::Bool(false);
    let quant = LoraModel::new(base, config).unwrap();
    let mut dense = quant.model.clone();
    dense.visit_linears_mut(&mut |_, s| s.dequantize_base());
    let x = ids::<B>(2, 6, 96, device);
    let d = max_abs_diff(&logits(&quant.model, &x), &logits(&dense, &x));
    assert!(d < 1e-5, "{d:e}");
    let loss = causal_lm_loss(dense.forward(x.clone(), None), x.clone());
    let want = grads_by_id(
        &dense,
        &GradientsParams::from_grads(loss.backward(), &dense),
    );
    let (_, grads) = quant
        .model
        .loss_and_grads_by_layer(x.clone(), None, 1, |l| causal_lm_loss(l, x.clone()));
    // A, B and the magnitude in 3 targets of 2 layers.
    assert_eq!(want.len(), 2 * 3 * 3);
    assert_same_grads(&want, &grads_by_id(&quant.model, &grads), "DoRA");
    let mut merged = quant;
    merged.merge_adapter().unwrap();
    let d = max_abs_diff(&logits(&merged.model, &x), &logits(&dense, &x));
    assert!(d < 1e-4, "merged DoRA on NF4: {d:e}");
    merged.model.visit_linears(&mut |p, s| {
        assert_eq!(
            s.is_quantized(),
            s.entries_of::<peft_core::LoraEntry<_>>().next().is_none(),
            "{p}"
        );
    });
}

/// LoftQ (`init_lora_weights: "loftq"`): every targeted layer becomes NF4
/// and its adapter starts at the low-rank part of the quantization error,
/// so the model is closer to the `f32` one than plain NF4 is, in every
/// weight and in the logits; untargeted layers stay `f32`.
fn loftq_init_starts_closer_to_the_f32_model<B: AutodiffBackend>(device: &B::Device) {
    let mut cfg = LlamaConfig::new(96, 64, 128, 2, 4, 2);
    cfg.tie_word_embeddings = false;
    B::seed(device, 4);
    let dense = cfg.init::<B>(device).unwrap();
    let mut plain = dense.clone();
    plain.quantize_base_nf4().unwrap();
    let mut config = LoraConfig::new(8, 16.0, &["q_proj", "v_proj", "up_proj", "down_proj"]);
    config.init_lora_weights = InitLoraWeights::Named("loftq".into());
    config.extra.insert(
        "loftq_config".into(),
        serde_json::json!({"loftq_bits": 4, "loftq_iter": 2}),
    );
    let loftq = LoraModel::new(dense.clone(), config.clone()).unwrap();
    let (mut targeted, mut untouched) = (0, 0);
    let mut weights = Vec::new();
    dense.visit_linears(&mut |p, s| {
        weights.push((p.to_string(), HostTensor::from_tensor(s.base_weight())))
    });
    let mut plain_w = Vec::new();
    plain.visit_linears(&mut |_, s| plain_w.push(HostTensor::from_tensor(s.base_weight())));
    let mut i = 0;
    loftq.model.visit_linears(&mut |p, s| {
        let (path, w) = &weights[i];
        assert_eq!(path, p);
        match s.entry::<peft_core::LoraEntry<_>>("default") {
            None => {
                assert!(!s.is_quantized(), "{p}");
                untouched += 1;
            }
            Some(e) => {
                assert!(s.is_quantized(), "{p}");
                targeted += 1;
                let approx = HostTensor::from_tensor(s.base_weight() + e.delta_weight());
                let err = |t: &HostTensor| {
                    t.data
                        .iter()
                        .zip(&w.data)
                        .map(|(a, b)| (a - b).powi(2))
                        .sum::<f32>()
                        .sqrt()
                };
                let (ours, nf4) = (err(&approx), err(&plain_w[i]));
                assert!(ours < 0.97 * nf4, "{p}: LoftQ error {ours} vs NF4 {nf4}");
            }
        }
        i += 1;
    });
    assert_eq!((targeted, untouched), (2 * 4, 2 * 3 + 1));
    let x = ids::<B>(2, 6, 96, device);
    let want = logits(&dense, &x);
    let (d_loftq, d_plain) = (
        max_abs_diff(&want, &logits(&loftq.model, &x)),
        max_abs_diff(&want, &logits(&plain, &x)),
    );
    assert!(d_loftq < d_plain, "LoftQ {d_loftq:e} vs NF4 {d_plain:e}");

    // Only NF4; LoftQ on an already quantized base is an error naming it.
    let mut eight = config.clone();
    eight
        .extra
        .insert("loftq_config".into(), serde_json::json!({"loftq_bits": 8}));
    assert!(LoraModel::new(dense.clone(), eight).is_err());
    let Err(e) = LoraModel::new(plain, config) else {
        panic!("LoftQ on an already quantized base was accepted");
    };
    assert!(e.to_string().contains("already quantized"), "{e}");
}

autodiff_backend_tests!(
    loftq_init_starts_closer_to_the_f32_model,
    quantized_gguf_equals_dequantized_load,
    gguf_blocks_of_every_type_read_as_gguf_py_dequantises,
    layerwise_gradients_equal_one_backward_pass,
    gpt2_layerwise_gradients_equal_one_backward_pass,
    nf4_base_computes_with_its_dequantized_weights,
    dora_on_an_nf4_base,
);

type Cpu = Autodiff<NdArray>;

/// all-MiniLM-L6-v2 from f32 safetensors to an NF4 base: sentence
/// embeddings keep a cosine similarity above 0.96 with the f32 model's
/// (0.974 to 0.99 measured: 4 bits compound over 6 layers of a small model),
/// at under a seventh of the linear layers' memory.
#[test]
fn minilm_to_nf4_keeps_its_embeddings() {
    let dir = assets::fetch("minilm").unwrap();
    let device = Default::default();
    let dense = Bert::<NdArray>::load(&dir, &device).unwrap();
    let mut quant = dense.clone();
    assert_eq!(
        quant.quantize_base_nf4().unwrap(),
        6 * 6 + 1,
        "and the pooler"
    );
    assert_eq!(quant.param_count().all, dense.param_count().all);
    let mut bytes = 0;
    quant.visit_linears(&mut |_, s| bytes += s.quantized.as_ref().unwrap().stored_bytes());
    let mut values = 0;
    dense.visit_linears(&mut |_, s| values += s.d_input() * s.d_output());
    assert!(
        (bytes as f64) < 4.0 * values as f64 / 7.0,
        "{bytes} bytes for {values} weights"
    );
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let sentences = [
        "The film is a charming, funny and moving portrait of a family.",
        "A dull, lifeless script that wastes its talented cast.",
        "Interest rates rose again this quarter.",
    ];
    let batch = tok.batch::<NdArray>(&sentences, &device).unwrap();
    let embed = |m: &Bert<NdArray>| {
        HostTensor::from_tensor(m.mean_pooled(
            batch.ids.clone(),
            batch.attention_mask.clone(),
            true,
        ))
    };
    let (a, b) = (embed(&dense), embed(&quant));
    let d = a.shape[1];
    for (i, (x, y)) in a.data.chunks(d).zip(b.data.chunks(d)).enumerate() {
        let dot: f32 = x.iter().zip(y).map(|(p, q)| p * q).sum();
        let norm = |v: &[f32]| v.iter().map(|p| p * p).sum::<f32>().sqrt();
        let cos = dot / (norm(x) * norm(y));
        assert!(cos > 0.96, "sentence {i}: cosine {cos}");
        eprintln!("sentence {i}: cosine {cos:.4}");
        assert!(cos < 1.0 - 1e-7, "sentence {i}: NF4 changed nothing");
    }
}

/// QLoRA on the real SmolLM2-135M kept in its Q4_1/Q8_0 blocks: the
/// quantized load gives the dequantized load's logits, and a few AdamW
/// steps of layer-by-layer training lower the loss on a passage while the
/// quantized base stays untouched.
#[test]
fn qlora_trains_smollm2_on_its_quantized_base() {
    let path = assets::fetch("smollm2")
        .unwrap()
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let device = Default::default();
    let quant = Llama::<Cpu>::from_gguf_quantized(&path, &device).unwrap();
    let x = ids::<Cpu>(1, 24, 49_152, &device);
    {
        let dense = Llama::<NdArray>::from_gguf(&path, &device).unwrap();
        let inner = quant.valid();
        let d = max_abs_diff(
            &logits(&dense, &x.clone().inner()),
            &logits(&inner, &x.clone().inner()),
        );
        assert!(
            d < 1e-4,
            "quantized SmolLM2 differs from the dequantized load by {d:e}"
        );
    }
    let text = "The old lighthouse keeper climbed the narrow stairs every evening, \
                lit the great lamp, and watched the ships pass safely along the rocky coast.";
    let gguf = peft_models::gguf::Gguf::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(&gguf).unwrap();
    let passage: Vec<i64> = tok
        .encode(text)
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    let n = passage.len();
    let batch = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(passage, [1, n]), &device);
    Cpu::seed(&device, 1);
    let mut model = LoraModel::new(quant, LoraConfig::new(8, 16.0, &["q_proj", "v_proj"]))
        .unwrap()
        .model;
    let table = model.embed_quantized.clone().unwrap();
    let before = table.data.clone();
    let mut optim = AdamWConfig::new().init::<Cpu, Llama<Cpu>>();
    let mut losses = Vec::new();
    for step in 0..4 {
        let (loss, grads) = model.loss_and_grads_by_layer(batch.clone(), None, step, |l| {
            causal_lm_loss(l, batch.clone())
        });
        losses.push(loss);
        model = optim.step(2e-3, model, grads);
    }
    assert!(
        losses[3] < losses[0] - 0.05,
        "loss did not fall: {losses:?}"
    );
    assert_eq!(model.embed_quantized.as_ref().unwrap().data, before);
    let mut quantized = 0;
    model.visit_linears(&mut |_, s| quantized += usize::from(s.is_quantized()));
    assert_eq!(quantized, 30 * 7 + 1, "every base weight stays quantized");
}
