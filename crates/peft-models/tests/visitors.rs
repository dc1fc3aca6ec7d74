//! Invariant 5 of `docs/ARCHITECTURE.md`: a model's two visitors yield the
//! same module paths, each once, in the same order on every call. Injection
//! relies on it: `SlotModel` matches targets on the immutable walk and
//! attaches on the mutable one.

use burn::backend::NdArray;
use burn::tensor::backend::Backend;
use peft_core::PeftModel;
use peft_models::bert::Bert;
use peft_models::fixtures::fixtures_dir;
use peft_models::gpt2::Gpt2;
use peft_models::llama::Llama;

type B = NdArray;

/// `(immutable walk, mutable walk)` of `model`'s adaptable linears.
fn walks<Bk: Backend, M: PeftModel<Bk>>(model: &mut M) -> (Vec<String>, Vec<String>) {
    let mut seen = Vec::new();
    model.visit_linears(&mut |path, _| seen.push(path.to_string()));
    let mut seen_mut = Vec::new();
    model.visit_linears_mut(&mut |path, _| seen_mut.push(path.to_string()));
    (seen, seen_mut)
}

fn check<M: PeftModel<B>>(name: &str, mut model: M, first: &str, at_least: usize) {
    let (once, once_mut) = walks(&mut model);
    let (again, again_mut) = walks(&mut model);
    assert!(once.len() >= at_least, "{name}: {once:?}");
    assert_eq!(once[0], first, "{name}");
    assert_eq!(once, once_mut, "{name}: the two visitors disagree");
    assert_eq!(once, again, "{name}: a second walk differs");
    assert_eq!(once, again_mut, "{name}: a second mutable walk differs");
    let mut unique = once.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), once.len(), "{name}: a path repeats");
}

#[test]
fn both_visitors_walk_the_same_paths_in_the_same_order() {
    let d = Default::default();
    let dir = fixtures_dir();
    // Two layers of seven linears (Llama: q, k, v, o, gate, up, down),
    // four (GPT-2) or six (BERT), at least.
    let llama = Llama::<B>::load(&dir.join("llama"), &d).unwrap();
    check("llama", llama, "model.layers.0.self_attn.q_proj", 2 * 7);
    let gpt2 = Gpt2::<B>::load(&dir.join("gpt2"), &d).unwrap();
    check("gpt2", gpt2, "transformer.h.0.attn.c_attn", 2 * 4);
    let bert = Bert::<B>::load(&dir.join("bert"), &d).unwrap();
    check(
        "bert",
        bert,
        "bert.encoder.layer.0.attention.self.query",
        2 * 6,
    );
}
