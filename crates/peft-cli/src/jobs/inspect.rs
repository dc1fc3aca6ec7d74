//! `peft inspect`: what an adapter folder holds.

use std::path::Path;

use peft_core::io::read_safetensors;
use peft_core::{PeftError, Result};

use crate::tasks::Method;

/// `peft inspect`: an adapter folder's method, config and tensors.
pub fn inspect(dir: &Path) -> Result<String> {
    let method = Method::detect(dir)?;
    let mut s = format!("{}: {}\n", dir.display(), method.name());
    let config = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap_or_default();
    s += &format!(
        "config: {}\n",
        config.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    let weights = ["adapter_model.safetensors", "adapter.safetensors"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
        .ok_or_else(|| PeftError::Checkpoint {
            path: dir.to_path_buf(),
            message: "no adapter_model.safetensors or adapter.safetensors".into(),
        })?;
    let tensors = read_safetensors(&weights)?;
    let mut keys: Vec<&String> = tensors.keys().collect();
    keys.sort();
    let total: usize = tensors.values().map(|t| t.data.len()).sum();
    s += &format!("tensors ({}): {} parameters\n", weights.display(), total);
    for k in keys {
        s += &format!("  {k} {:?}\n", tensors[k].shape);
    }
    if let Some(head) = peft_adapter::head::read_head_config(dir)? {
        s += &format!(
            "head: AdapterHub {} head, {} labels {:?}, {} layers\n",
            head.head_type.name(),
            head.num_labels,
            head.labels(),
            head.layers
        );
    }
    if let Ok(head) = read_safetensors(&dir.join("head.safetensors")) {
        let n: usize = head.values().map(|t| t.data.len()).sum();
        s += &format!("head: {n} parameters\n");
    }
    Ok(s)
}
