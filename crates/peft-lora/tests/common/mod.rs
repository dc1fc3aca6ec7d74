//! What the MiniLM parity tests of the initialisations that rewrite the
//! base (LoftQ, PiSSA, OLoRA) share: `B·A` on the host and the model's
//! mean-pooled embeddings of a fixture's sentences.

use std::collections::HashMap;

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};
use peft_core::compare::{check_close_slices, Tolerance};
use peft_core::io::HostTensor;
use peft_models::bert::Bert;

/// The modules the fixtures cover (key, path): MiniLM's layer-0 query
/// (square), intermediate (tall) and output (wide) projections.
pub const MODULES: [(&str, &str); 3] = [
    ("query", "encoder.layer.0.attention.self.query"),
    ("intermediate", "encoder.layer.0.intermediate.dense"),
    ("output", "encoder.layer.0.output.dense"),
];

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

/// Each of the `rank` components of `a` `[r, in]` / `b` `[out, r]` against
/// PEFT's within `tol`: row `c` of `A` and column `c` of `B`, both flipped
/// where `free_sign` and the rows point apart (an SVD leaves each pair's
/// sign free; the product does not see it).
pub fn check_components(
    what: &str,
    (a, b): (&HostTensor, &HostTensor),
    (peft_a, peft_b): (&HostTensor, &HostTensor),
    free_sign: bool,
    tol: Tolerance,
) {
    let (rank, inp, out) = (a.shape[0], a.shape[1], b.shape[0]);
    for c in 0..rank {
        let row = |m: &HostTensor| m.data[c * inp..(c + 1) * inp].to_vec();
        let col = |m: &HostTensor| (0..out).map(|i| m.data[i * rank + c]).collect::<Vec<_>>();
        let dot: f32 = row(a).iter().zip(row(peft_a)).map(|(x, y)| x * y).sum();
        let sign = if free_sign && dot < 0.0 { -1.0 } else { 1.0 };
        let flip = |v: Vec<f32>| v.into_iter().map(|x| x * sign).collect::<Vec<_>>();
        check_close_slices(
            &format!("{what}: A row {c}"),
            &flip(row(a)),
            &row(peft_a),
            tol,
        )
        .unwrap();
        check_close_slices(
            &format!("{what}: B column {c}"),
            &flip(col(b)),
            &col(peft_b),
            tol,
        )
        .unwrap();
    }
}
