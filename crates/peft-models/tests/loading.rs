//! Loading Hugging Face directories: sharded checkpoints, and a clear error
//! for every way a model directory can be wrong.

use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use peft_core::io::{read_safetensors, serialize_safetensors, HostTensor};
use peft_core::PeftError;
use peft_models::gpt2::Gpt2;
use peft_models::llama::Llama;

type B = NdArray;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("peft-loading-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn logits(m: &Llama<B>) -> HostTensor {
    let ids = burn::tensor::Tensor::<B, 2, burn::tensor::Int>::from_data(
        burn::tensor::TensorData::new(vec![1i64, 5, 9, 3], [1, 4]),
        &Default::default(),
    );
    HostTensor::from_tensor(m.forward(ids, None))
}

#[test]
fn sharded_checkpoints_load_like_single_files() {
    let src = fixtures().join("llama");
    let dir = scratch("sharded");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut all: Vec<(String, HostTensor)> = read_safetensors(&src.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let half = all.len() / 2;
    let mut map = serde_json::Map::new();
    for (i, part) in [&all[..half], &all[half..]].iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        std::fs::write(dir.join(&file), serialize_safetensors(part, None)).unwrap();
        for (k, _) in part.iter() {
            map.insert(k.clone(), file.clone().into());
        }
    }
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let device = Default::default();
    let single = Llama::<B>::load(&src, &device).unwrap();
    let sharded = Llama::<B>::load(&dir, &device).unwrap();
    assert_eq!(logits(&single), logits(&sharded));

    // A shard that lost a tensor the index promises.
    std::fs::write(
        dir.join("model-00002-of-00002.safetensors"),
        serialize_safetensors(&all[half + 1..], None),
    )
    .unwrap();
    assert!(matches!(
        Llama::<B>::load(&dir, &device),
        Err(PeftError::MissingTensor { .. })
    ));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_model_directories_are_typed_errors() {
    let device = Default::default();
    let dir = scratch("bad");
    // No config.
    assert!(matches!(
        Llama::<B>::load(&dir, &device),
        Err(PeftError::Io { .. })
    ));
    // Another architecture.
    std::fs::copy(fixtures().join("gpt2/config.json"), dir.join("config.json")).unwrap();
    let e = Llama::<B>::load(&dir, &device).unwrap_err();
    assert!(e.to_string().contains("model_type `gpt2`"), "{e}");
    // No weights.
    std::fs::copy(
        fixtures().join("llama/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let e = Llama::<B>::load(&dir, &device).unwrap_err();
    assert!(e.to_string().contains("no model.safetensors"), "{e}");
    // A tensor of the wrong shape, a missing one, an extra one.
    let mut t: Vec<(String, HostTensor)> =
        read_safetensors(&fixtures().join("llama/model.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    let q = t
        .iter()
        .position(|(k, _)| k == "model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    let mut wrong = t.clone();
    wrong[q].1 = HostTensor {
        shape: vec![16, 8],
        data: vec![0.0; 128],
    };
    std::fs::write(
        dir.join("model.safetensors"),
        serialize_safetensors(&wrong, None),
    )
    .unwrap();
    assert!(matches!(
        Llama::<B>::load(&dir, &device),
        Err(PeftError::Shape { .. })
    ));
    let mut missing = t.clone();
    missing.remove(q);
    std::fs::write(
        dir.join("model.safetensors"),
        serialize_safetensors(&missing, None),
    )
    .unwrap();
    let e = Llama::<B>::load(&dir, &device).unwrap_err();
    assert!(
        matches!(e, PeftError::MissingTensor { .. }) && e.to_string().contains("q_proj"),
        "{e}"
    );
    let mut extra = t.clone();
    extra.push((
        "model.layers.9.self_attn.q_proj.weight".into(),
        t[q].1.clone(),
    ));
    std::fs::write(
        dir.join("model.safetensors"),
        serialize_safetensors(&extra, None),
    )
    .unwrap();
    assert!(matches!(
        Llama::<B>::load(&dir, &device),
        Err(PeftError::UnexpectedTensors { .. })
    ));
    std::fs::write(dir.join("model.safetensors"), b"\x08\0\0\0\0\0\0\0{}").unwrap();
    assert!(matches!(
        Llama::<B>::load(&dir, &device),
        Err(PeftError::Checkpoint { .. })
    ));
    // GPT-2 without the `transformer.` prefix (bare GPT2Model) still loads.
    let g = scratch("gpt2bare");
    std::fs::copy(fixtures().join("gpt2/config.json"), g.join("config.json")).unwrap();
    let bare: Vec<(String, HostTensor)> =
        read_safetensors(&fixtures().join("gpt2/model.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k.trim_start_matches("transformer.").to_string(), v))
            .collect();
    std::fs::write(
        g.join("model.safetensors"),
        serialize_safetensors(&bare, None),
    )
    .unwrap();
    assert!(Gpt2::<B>::load(&g, &device).is_ok());
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::remove_dir_all(g).unwrap();
}
