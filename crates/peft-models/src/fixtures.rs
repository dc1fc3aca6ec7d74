//! Reading the repository's parity fixtures (`fixtures/`, written by
//! `scripts/make_fixtures.py` and `scripts/make_prompt_fixtures.py` from
//! Hugging Face PEFT): what every method crate's parity tests share.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use peft_core::compare;
use peft_core::io::{read_safetensors, HostTensor};

/// The tolerance of every parity check: max |difference| per value.
pub const TOL: f32 = 1e-5;

/// The repository's `fixtures/` folder.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// Max |a − b| over two tensors of one shape.
pub fn max_diff(a: &HostTensor, b: &HostTensor) -> f32 {
    assert_eq!(a.shape, b.shape, "shapes differ");
    peft_core::compare::max_abs_diff(&a.data, &b.data)
}

/// Panics, naming `what`, unless `got` is within [`TOL`] of `want`.
pub fn assert_close(what: &str, got: &HostTensor, want: &HostTensor) {
    let d = max_diff(got, want);
    assert!(d <= TOL, "{what}: max |diff| = {d:e} > {TOL:e}");
}

/// One fixture case: `fixtures/<arch>/<case>/` with its expected tensors
/// and metadata.
pub struct FixtureCase {
    /// The case's folder (an adapter folder in PEFT's layout).
    pub dir: PathBuf,
    /// `expected.safetensors`.
    pub expected: HashMap<String, HostTensor>,
    /// `expected.json`.
    pub meta: serde_json::Value,
}

impl FixtureCase {
    /// The tolerance for this case's recorded gradients (`grad.*`):
    /// [`GRADIENTS`](compare::GRADIENTS)' relative 1e-3, with a floor of a
    /// millionth of the largest of them. A gradient that is f32 noise in
    /// PyTorch (BERT's last-layer query, ~1e-13 against a largest of ~4e-5:
    /// its softmax saturates) is held to that floor.
    pub fn gradient_tolerance(&self) -> compare::Tolerance {
        let largest = self
            .expected
            .iter()
            .filter(|(k, _)| k.starts_with("grad."))
            .fold(0f32, |m, (_, t)| m.max(compare::max_abs(&t.data)));
        compare::Tolerance::new(compare::GRADIENTS.rel, 1e-6 * largest)
    }

    /// Opens `fixtures/<arch>/<case>/`.
    pub fn open(arch: &str, case: &str) -> Self {
        let dir = fixtures_dir().join(arch).join(case);
        let expected = read_safetensors(&dir.join("expected.safetensors"))
            .unwrap_or_else(|e| panic!("fixture {arch}/{case}: {e}"));
        // Missing or unreadable reference data fails the test: a check
        // keyed on a field of it must not be skipped silently.
        let meta_path = dir.join("expected.json");
        let meta = std::fs::read_to_string(&meta_path)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
            .unwrap_or_else(|e| panic!("fixture {arch}/{case}: {}: {e}", meta_path.display()));
        FixtureCase {
            dir,
            expected,
            meta,
        }
    }

    /// Expected tensor `key`.
    pub fn want(&self, key: &str) -> &HostTensor {
        self.expected
            .get(key)
            .unwrap_or_else(|| panic!("fixture {} has no `{key}`", self.dir.display()))
    }

    /// Expected tensor `key` (ids stored as f32) as an `Int` tensor.
    pub fn ints<B: Backend, const D: usize>(
        &self,
        key: &str,
        device: &B::Device,
    ) -> Tensor<B, D, Int> {
        let t = self.want(key);
        let v: Vec<i64> = t.data.iter().map(|x| *x as i64).collect();
        let shape: [usize; D] = t.shape.clone().try_into().expect("rank");
        Tensor::from_data(TensorData::new(v, shape), device)
    }

    /// Expected tensor `key` as a float tensor.
    pub fn floats<B: Backend, const D: usize>(
        &self,
        key: &str,
        device: &B::Device,
    ) -> Tensor<B, D> {
        let t = self.want(key);
        let shape: [usize; D] = t.shape.clone().try_into().expect("rank");
        t.to_tensor(shape, key, device).expect("shape")
    }

    /// Expected ids `key` as `u32`s.
    pub fn ids(&self, key: &str) -> Vec<u32> {
        self.want(key).data.iter().map(|x| *x as u32).collect()
    }

    /// A `usize` field of `expected.json`.
    pub fn meta_usize(&self, key: &str) -> usize {
        self.meta[key]
            .as_u64()
            .unwrap_or_else(|| panic!("no `{key}` in expected.json")) as usize
    }
}

/// The tiny random Llama of the fixtures (`fixtures/llama`).
pub fn tiny_llama<B: Backend>(device: &B::Device) -> crate::llama::Llama<B> {
    crate::llama::Llama::load(&fixtures_dir().join("llama"), device).expect("fixture llama")
}

/// The tiny random BERT of the fixtures (`fixtures/bert`,
/// `BertForSequenceClassification` with 3 labels).
pub fn tiny_bert<B: Backend>(device: &B::Device) -> crate::bert::Bert<B> {
    crate::bert::Bert::load(&fixtures_dir().join("bert"), device).expect("fixture bert")
}

/// The tiny random GPT-2 of the fixtures (`fixtures/gpt2`).
pub fn tiny_gpt2<B: Backend>(device: &B::Device) -> crate::gpt2::Gpt2<B> {
    crate::gpt2::Gpt2::load(&fixtures_dir().join("gpt2"), device).expect("fixture gpt2")
}

/// A fresh folder name under the system's temporary folder, unique per
/// process and call.
pub fn temp_dir(tag: &str) -> PathBuf {
    static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("peft-{tag}-{}-{run}", std::process::id()))
}

/// How many float parameters of `module` received a gradient in `grads`
/// (0 for a frozen model).
pub fn params_with_grad<B: burn::tensor::backend::AutodiffBackend, M: burn::module::Module<B>>(
    module: &M,
    grads: &B::Gradients,
) -> usize {
    struct Count<'a, B: burn::tensor::backend::AutodiffBackend> {
        grads: &'a B::Gradients,
        count: usize,
    }
    impl<B: burn::tensor::backend::AutodiffBackend> burn::module::ModuleVisitor<B> for Count<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            if param.val().grad(self.grads).is_some() {
                self.count += 1;
            }
        }
    }
    let mut c = Count { grads, count: 0 };
    module.visit(&mut c);
    c.count
}

impl FixtureCase {
    /// Checks generation step by step against the case's `generated` ids
    /// and `generated_logits` (each step's last-position logits): `first`
    /// is the logits `[1, t, vocab]` of the prompt's forward pass, `next(id)`
    /// runs the model on the next token (through its cache) and returns its
    /// logits. Returns the expected ids.
    pub fn check_generation<B: Backend>(
        &self,
        what: &str,
        first: Tensor<B, 3>,
        mut next: impl FnMut(u32) -> Tensor<B, 3>,
    ) -> Vec<u32> {
        let ids = self.ids("generated");
        let steps = self.want("generated_logits");
        let vocab = steps.shape[1];
        let mut logits = first;
        for (step, &id) in ids.iter().enumerate() {
            let row = HostTensor {
                shape: vec![vocab],
                data: peft_core::generate::last_row(logits),
            };
            let want = HostTensor {
                shape: vec![vocab],
                data: steps.data[step * vocab..(step + 1) * vocab].to_vec(),
            };
            assert_close(&format!("{what}: generation step {step}"), &row, &want);
            logits = next(id);
        }
        ids
    }
}
