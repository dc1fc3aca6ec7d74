//! The real all-MiniLM-L6-v2 (fetched by `scripts/fetch_assets.py`):
//! tokenization and sentence embeddings match the Python reference
//! (`scripts/minilm_reference.py`) to 1e-4.

use std::path::Path;

use burn::backend::NdArray;
use peft_core::io::HostTensor;
use peft_core::PeftModel;
use peft_models::assets;
use peft_models::bert::Bert;
use peft_models::tokenizer::Tokenizer;

type B = NdArray;

#[test]
fn minilm_tokenizes_and_embeds_like_the_reference() {
    let dir = assets::fetch("minilm").unwrap();
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/minilm_reference.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    assert_eq!(
        tok.encode("Hello world").unwrap(),
        vec![101, 7592, 2088, 102]
    );
    let sentences: Vec<&str> = reference["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    for (s, ids) in sentences
        .iter()
        .zip(reference["input_ids"].as_array().unwrap())
    {
        let want: Vec<u32> = ids
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(s).unwrap(), want, "{s}");
    }

    let device = Default::default();
    let model = Bert::<B>::load(&dir, &device).unwrap();
    assert_eq!(burn::module::Module::num_params(&model), 22_713_216);
    assert!(model
        .linear_paths()
        .contains(&"encoder.layer.5.attention.self.query".to_string()));
    let batch = tok.batch::<B>(&sentences, &device).unwrap();
    let emb = HostTensor::from_tensor(model.mean_pooled(batch.ids, batch.attention_mask, true));
    let want: Vec<f32> = reference["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
        })
        .collect();
    assert_eq!(emb.data.len(), want.len());
    let d = peft_core::compare::max_abs_diff(&emb.data, &want);
    assert!(d < 1e-4, "embeddings differ from the reference by {d:e}");
}
