//! LoRA adapters that change the input embedding beside their low-rank
//! updates, as PEFT 0.21 writes them (`scripts/make_seqcls_fixtures.py`):
//! - `lora_embed`: `modules_to_save` keeps a trainable full copy of the
//!   table: the tiny Llama's untied `embed_tokens`; GPT-2's `wte`, whose
//!   tied head stays on the base table (PEFT ties only `embed_tokens`); a
//!   tied Llama's `embed_tokens` with `ensure_weight_tying`, where the head
//!   uses the copy and the file holds it under `lm_head.weight` too;
//! - `lora_tokens`: `trainable_token_indices` retrains a few rows only
//!   (tiny Llama; GPT-2, whose tied head follows them);
//!
//! and the trainable tokens method alone (`TrainableTokensConfig`,
//! `scripts/make_method_fixtures.py`: `llama/trainable_tokens`).
//!
//! Each is held to PEFT in every state (two adapters, mixed batch,
//! disabled, merged, unmerged, `unload`, `merge_and_unload`), saves PEFT's
//! bytes, and trains as PEFT does (gradients, two Adam steps); the ways a
//! user gets them wrong are typed errors.

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor};
use peft_core::config::TokenIndices;
use peft_core::io::HostTensor;
use peft_core::slot::{TrainableTokens, TrainableTokensConfig};
use peft_core::{autodiff_backend_tests, backend_tests, LoraConfig, PeftModel, SlotModel};
use peft_lora::Lora;
use peft_models::fixtures::{fixtures_dir, tiny_gpt2, tiny_llama, FixtureCase};
use peft_models::gpt2::Gpt2;
use peft_models::llama::Llama;
use peft_models::loss::causal_lm_loss;
use peft_models::slot_parity::{
    check_bad_shape_refused, check_gradients, check_slot_method_case, check_training_steps,
    entry_count, lora_gradients,
};

fn tied_llama<B: Backend>(d: &B::Device) -> Llama<B> {
    Llama::load(&fixtures_dir().join("llama_tied"), d).unwrap()
}

fn llama_logits<B: Backend>(m: &Llama<B>, ids: Tensor<B, 2, Int>) -> HostTensor {
    HostTensor::from_tensor(m.forward(ids, None))
}

fn gpt2_logits<B: Backend>(m: &Gpt2<B>, ids: Tensor<B, 2, Int>) -> HostTensor {
    HostTensor::from_tensor(m.forward(ids, None))
}

/// Full copies of the table, every state.
fn lora_embed<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, Lora>("llama", "lora_embed", tiny_llama(d), llama_logits, d);
    check_slot_method_case::<B, _, Lora>("gpt2", "lora_embed", tiny_gpt2(d), gpt2_logits, d);
    check_slot_method_case::<B, _, Lora>(
        "llama_tied",
        "lora_embed",
        tied_llama(d),
        llama_logits,
        d,
    );
}

/// Retrained tokens, every state.
fn lora_tokens<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, Lora>("llama", "lora_tokens", tiny_llama(d), llama_logits, d);
    check_slot_method_case::<B, _, Lora>("gpt2", "lora_tokens", tiny_gpt2(d), gpt2_logits, d);
}

/// The trainable tokens method alone, every state; its refusals.
fn trainable_tokens<B: Backend>(d: &B::Device) {
    check_slot_method_case::<B, _, TrainableTokens>(
        "llama",
        "trainable_tokens",
        tiny_llama(d),
        llama_logits,
        d,
    );
    let mut adapted = SlotModel::<B, Llama<B>, TrainableTokens>::wrap(tiny_llama(d));
    let err = adapted
        .add_adapter("none", TrainableTokensConfig::new(&[]))
        .unwrap_err();
    assert!(err.to_string().contains("token_indices"), "{err}");
    let err = adapted
        .add_adapter("past", TrainableTokensConfig::new(&[70]))
        .unwrap_err();
    assert!(err.to_string().contains("70"), "{err}");
    let elsewhere = TrainableTokensConfig {
        target_modules: Some(peft_core::config::TargetModules::List(
            vec!["q_proj".into()],
        )),
        ..TrainableTokensConfig::new(&[1])
    };
    let err = adapted.add_adapter("q", elsewhere).unwrap_err().to_string();
    assert!(err.contains("model.embed_tokens"), "{err}");
    assert_eq!(entry_count(&adapted.model), 0);
    // init_weights=false starts the rows away from the base's.
    let random = TrainableTokensConfig {
        init_weights: false,
        ..TrainableTokensConfig::new(&[1, 2])
    };
    adapted.add_adapter("random", random).unwrap();
    let copy = adapted.model.embed_tokens.copy("random").unwrap();
    let base = adapted.model.embed_tokens.weight.val().narrow(0, 1, 2);
    let moved = (copy.weight.val() - base).abs().max().into_scalar();
    assert!(burn::tensor::ElementConversion::elem::<f32>(moved) > 0.1);
}

/// A LoRA config on the tiny Llama's q/v beside `tokens`.
fn with_tokens(tokens: TokenIndices) -> LoraConfig {
    LoraConfig {
        trainable_token_indices: Some(tokens),
        ..LoraConfig::new(4, 8.0, &["q_proj", "v_proj"])
    }
}

fn config_error<B: Backend, M: PeftModel<B>>(model: M, config: LoraConfig) -> String {
    let mut adapted = SlotModel::<B, M, Lora>::wrap(model);
    let err = adapted.add_adapter("bad", config).unwrap_err();
    assert!(adapted.adapter_names().is_empty());
    assert_eq!(entry_count(&adapted.model), 0, "a refusal left entries");
    err.to_string()
}

/// What a user gets wrong is refused naming it, leaving nothing behind.
fn embedding_refusals<B: Backend>(d: &B::Device) {
    let list = |ids: &[usize]| TokenIndices::List(ids.to_vec());
    let err = config_error(tiny_llama::<B>(d), with_tokens(list(&[3, 64])));
    assert!(err.contains("64") && err.contains("vocabulary"), "{err}");
    let err = config_error(tiny_llama::<B>(d), with_tokens(list(&[3, 3])));
    assert!(err.contains("twice"), "{err}");
    let per_layer = |name: &str, ids: &[usize]| {
        TokenIndices::PerLayer([(name.to_string(), ids.to_vec())].into_iter().collect())
    };
    let err = config_error(tiny_llama::<B>(d), with_tokens(per_layer("wte", &[1])));
    assert!(
        err.contains("wte") && err.contains("model.embed_tokens"),
        "{err}"
    );
    // PEFT: the table is trained fully or some of its tokens, not both.
    let both = LoraConfig {
        modules_to_save: Some(vec!["embed_tokens".into()]),
        ..with_tokens(list(&[1, 2]))
    };
    let err = config_error(tiny_llama::<B>(d), both);
    assert!(
        err.contains("model.embed_tokens") && err.contains("fully"),
        "{err}"
    );
    // The tied head may only be named with the embedding's own tokens.
    let tied = TokenIndices::PerLayer(
        [("embed_tokens", vec![1, 2]), ("lm_head", vec![1, 5])]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    );
    let err = config_error(tied_llama::<B>(d), with_tokens(tied));
    assert!(err.contains("lm_head") && err.contains("tied"), "{err}");
    let same = TokenIndices::PerLayer(
        [("embed_tokens", vec![1, 2]), ("lm_head", vec![1, 2])]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    );
    let mut ok = SlotModel::<B, _, Lora>::wrap(tied_llama::<B>(d));
    ok.add_adapter("tied", with_tokens(same)).unwrap();

    // Two adapters retraining one token cannot be active together.
    let mut two = SlotModel::<B, _, Lora>::wrap(tiny_llama::<B>(d));
    two.add_adapter("a", with_tokens(list(&[1, 2]))).unwrap();
    two.add_adapter("b", with_tokens(list(&[2, 9]))).unwrap();
    let err = two.set_adapter(&["a", "b"]).unwrap_err().to_string();
    assert!(err.contains("token 2"), "{err}");
    two.add_adapter("c", with_tokens(list(&[5]))).unwrap();
    two.set_adapter(&["a", "c"]).unwrap();

    // A file whose tokens have the wrong shape names the key.
    check_bad_shape_refused::<B, _, Lora>(
        "llama",
        "lora_tokens",
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
        tiny_llama::<B>(d),
    );
    check_bad_shape_refused::<B, _, Lora>(
        "gpt2",
        "lora_embed",
        "base_model.model.transformer.wte.weight",
        tiny_gpt2::<B>(d),
    );
}

/// Disjoint tokens of two adapters active at once compose (each row from
/// its adapter), and a row's embedding is its adapter's in a mixed batch;
/// the base table is never changed by running them.
fn tokens_compose<B: Backend>(d: &B::Device) {
    let c = FixtureCase::open("llama", "lora_tokens");
    let mut adapted =
        SlotModel::<B, Llama<B>, Lora>::from_pretrained(tiny_llama(d), &c.dir).unwrap();
    let table = |m: &Llama<B>| HostTensor::from_tensor(m.embed_tokens.weight.val());
    let base = table(&adapted.model);
    let mine = LoraConfig {
        trainable_token_indices: Some(TokenIndices::List(vec![2, 4])),
        ..LoraConfig::new(2, 4.0, &["k_proj"])
    };
    adapted.add_adapter("even", mine).unwrap();
    adapted.set_adapter(&["default", "even"]).unwrap();
    let ids = c.ints::<B, 2>("input_ids", d);
    let both = HostTensor::from_tensor(adapted.model.embed(ids.clone()));
    let rows = |name: &str| {
        let e = adapted.model.embed_tokens.copy(name).unwrap();
        (e.indices.clone(), HostTensor::from_tensor(e.weight.val()))
    };
    let (default_ids, default_rows) = rows("default");
    let ids_host: Vec<i64> = ids.clone().into_data().convert::<i64>().into_vec().unwrap();
    let width = base.shape[1];
    for (pos, &token) in ids_host.iter().enumerate() {
        let got = &both.data[pos * width..(pos + 1) * width];
        let want = match default_ids.iter().position(|&t| t as i64 == token) {
            Some(i) => &default_rows.data[i * width..(i + 1) * width],
            None => &base.data[token as usize * width..(token as usize + 1) * width],
        };
        assert_eq!(got, want, "token {token} at {pos}");
    }
    assert!(
        ids_host
            .iter()
            .any(|t| default_ids.contains(&(*t as usize))),
        "the inputs hold a retrained token"
    );
    assert_eq!(table(&adapted.model), base, "running changed the table");
}

backend_tests!(
    lora_embed,
    lora_tokens,
    trainable_tokens,
    embedding_refusals,
    tokens_compose
);

fn llama_loss<B: AutodiffBackend>(m: &Llama<B>, ids: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    causal_lm_loss(m.forward(ids.clone(), None), ids)
}

fn gpt2_loss<B: AutodiffBackend>(m: &Gpt2<B>, ids: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    causal_lm_loss(m.forward(ids.clone(), None), ids)
}

/// The copies' and tokens' gradients equal PEFT's (through the tied head
/// too), beside LoRA's; the base table gets none.
fn embedding_gradients<B: AutodiffBackend>(d: &B::Device) {
    let lora = Some(lora_gradients as _);
    for case in ["lora_embed", "lora_tokens"] {
        check_gradients::<B, _, Lora>("llama", case, tiny_llama(d), llama_loss, d, lora);
        check_gradients::<B, _, Lora>("gpt2", case, tiny_gpt2(d), gpt2_loss, d, lora);
    }
    check_gradients::<B, _, Lora>(
        "llama_tied",
        "lora_embed",
        tied_llama(d),
        llama_loss,
        d,
        lora,
    );
    let model = tiny_llama(d);
    check_gradients::<B, _, TrainableTokens>(
        "llama",
        "trainable_tokens",
        model,
        llama_loss,
        d,
        None,
    );
}

/// Two Adam steps from PEFT's saved `default` give PEFT's tensors.
fn embedding_training_steps<B: AutodiffBackend>(d: &B::Device) {
    let llama = |m: &Llama<B>, ids: Tensor<B, 2, Int>, _| llama_loss(m, ids);
    let gpt2 = |m: &Gpt2<B>, ids: Tensor<B, 2, Int>, _| gpt2_loss(m, ids);
    for case in ["lora_embed", "lora_tokens"] {
        check_training_steps::<B, _, Lora>("llama", case, tiny_llama(d), llama, d);
        check_training_steps::<B, _, Lora>("gpt2", case, tiny_gpt2(d), gpt2, d);
    }
    check_training_steps::<B, _, Lora>("llama_tied", "lora_embed", tied_llama(d), llama, d);
    let model = tiny_llama(d);
    check_training_steps::<B, _, TrainableTokens>("llama", "trainable_tokens", model, llama, d);
}

autodiff_backend_tests!(embedding_gradients, embedding_training_steps);
