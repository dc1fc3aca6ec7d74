//! NF4 with double quantization against bitsandbytes 0.50.2 on the CPU
//! (`scripts/make_nf4_fixture.py` → `fixtures/nf4/nf4.safetensors`): the
//! code books, every 4-bit code (bitsandbytes' byte packing), every block
//! scale's 8-bit code, the group scales and offset, and the dequantized
//! values, on a matrix of two scale groups, a ragged one whose last block
//! is short, and a heavy-tailed one with a zero block and an outlier.

use std::collections::HashMap;
use std::path::Path;

use peft_core::compare::{check_close_slices, Tolerance};
use peft_core::io::{read_safetensors, HostTensor};
use peft_core::quant::{dynamic_map, Nf4Scales, QuantizedMatrix, NF4_LEVELS};

fn fixture() -> HashMap<String, HostTensor> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/nf4/nf4.safetensors");
    read_safetensors(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Panics unless `got` equals `want` value for value, naming the first
/// difference and how many there are.
fn same(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let diffs: Vec<usize> = (0..got.len())
        .filter(|&i| got[i].to_bits() != want[i].to_bits())
        .collect();
    if let Some(&i) = diffs.first() {
        panic!(
            "{what}: {} of {} differ; first at {i}: {} vs bitsandbytes' {}",
            diffs.len(),
            got.len(),
            got[i],
            want[i]
        );
    }
}

#[test]
fn nf4_quantization_is_bitsandbytes() {
    let t = fixture();
    same("NF4 levels", &NF4_LEVELS, &t["nf4_code"].data);
    same("dynamic code book", dynamic_map(), &t["dynamic_code"].data);
    for case in ["normal", "ragged", "heavy"] {
        let want = |k: &str| &t[&format!("{case}.{k}")].data;
        let input = &t[&format!("{case}.input")];
        let (rows, cols) = (input.shape[0], input.shape[1]);
        let q = QuantizedMatrix::nf4(&input.data, rows, cols).unwrap();
        let codes: Vec<f32> = (0..rows * cols)
            .map(|i| ((q.data[i / 2] >> (4 * (1 - i % 2))) & 0x0F) as f32)
            .collect();
        same(&format!("{case}: 4-bit codes"), &codes, want("codes"));
        let first = (want("codes")[0] as u8) << 4 | want("codes")[1] as u8;
        assert_eq!(q.data[0], first, "{case}: element 0 in the high nibble");
        let Some(Nf4Scales::Double(s)) = q.nf4.as_ref() else {
            panic!("{case}: NF4 keeps double-quantized scales");
        };
        // The mean of the block absmax values: ours is the f64 sum over n,
        // PyTorch's `mean()` sums in f32 lanes, so the two may be one unit
        // in the last place apart (they are on `normal`); everything after
        // it is then compared with that much room.
        let ulps = (s.offset.to_bits() as i64 - want("offset")[0].to_bits() as i64).abs();
        assert!(
            ulps <= 1,
            "{case}: offset {} vs {}",
            s.offset,
            want("offset")[0]
        );
        let scales = format!("{case}: group scales");
        if ulps == 0 {
            same(&scales, &s.group_scale, want("absmax2"));
        } else {
            assert_eq!(s.group_scale.len(), want("absmax2").len(), "{scales}");
            for (g, w) in s.group_scale.iter().zip(want("absmax2")) {
                let d = (g.to_bits() as i64 - w.to_bits() as i64).abs();
                assert!(d <= 2, "{scales}: {g} vs {w}");
            }
        }
        let block_codes: Vec<f32> = s.block_code.iter().map(|&c| c as f32).collect();
        same(
            &format!("{case}: block scale codes"),
            &block_codes,
            want("absmax_codes"),
        );
        let deq = q.dequantize();
        if ulps == 0 {
            same(&format!("{case}: dequantized"), &deq, want("dequantized"));
        } else {
            let tol = Tolerance::new(1e-6, 0.0);
            check_close_slices(
                &format!("{case}: dequantized"),
                &deq,
                want("dequantized"),
                tol,
            )
            .unwrap();
        }
    }
}
