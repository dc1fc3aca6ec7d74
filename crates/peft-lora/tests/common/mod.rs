//! What the MiniLM parity tests of the initialisations that rewrite the
//! base (LoftQ, PiSSA, OLoRA) share: `B·A` on the host and the model's
//! mean-pooled embeddings of a fixture's sentences.

use std::collections::HashMap;

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};
use peft_core::io::HostTensor;
use peft_models::bert::Bert;

/// `b·a` of `b: [out, r]`, `a: [r, in]`, row-major `[out, in]`.
pub fn product(b: &HostTensor, a: &HostTensor) -> Vec<f32> {
    let (out, r, inp) = (b.shape[0], b.shape[1], a.shape[1]);
    let mut p = vec![0.0f32; out * inp];
    for i in 0..out {
        for k in 0..r {
            let bik = b.data[i * r + k];
            for j in 0..inp {
                p[i * inp + j] += bik * a.data[k * inp + j];
            }
        }
    }
    p
}

/// The mean-pooled (not normalised) last hidden states of the fixture's
/// `input_ids` / `attention_mask` sentences.
pub fn embeddings(model: &Bert<NdArray>, t: &HashMap<String, HostTensor>) -> HostTensor {
    let device = Default::default();
    let ids = &t["input_ids"];
    let shape = [ids.shape[0], ids.shape[1]];
    let ids_i: Vec<i64> = ids.data.iter().map(|&v| v as i64).collect();
    let ids = Tensor::<NdArray, 2, Int>::from_data(TensorData::new(ids_i, shape), &device);
    let mask = Tensor::<NdArray, 2>::from_data(
        TensorData::new(t["attention_mask"].data.clone(), shape),
        &device,
    );
    HostTensor::from_tensor(model.mean_pooled(ids, mask, false))
}
