//! Where runtime loads may read adapters: only folders under
//! `--adapter-root`, after every symlink is resolved.

use std::path::{Path, PathBuf};

use super::error::ApiError;

/// `path` (relative to `root`, or absolute) as a canonical folder inside
/// the canonical `root`, or 403 when it leaves it (`..`, an absolute path
/// elsewhere, a symlink pointing out) and 400 when it is not an adapter
/// folder.
pub fn inside_root(root: &Path, path: &Path) -> Result<PathBuf, ApiError> {
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        root.join(path)
    };
    let real = std::fs::canonicalize(&joined).map_err(|e| {
        ApiError::field(
            "lora_path",
            format!("no adapter folder at {}: {e}", path.display()),
        )
    })?;
    if !real.starts_with(root) {
        return Err(ApiError::forbidden(format!(
            "{} is outside the adapter root ({})",
            path.display(),
            root.display()
        )));
    }
    if !real.join("adapter_config.json").is_file() {
        return Err(ApiError::field(
            "lora_path",
            format!("{} has no adapter_config.json", path.display()),
        ));
    }
    Ok(real)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_leave_the_root_are_refused() {
        let base = std::env::temp_dir().join(format!("peft-serve-root-{}", std::process::id()));
        let root = base.join("root");
        let outside = base.join("outside");
        for d in [root.join("a"), root.join("empty"), outside.clone()] {
            std::fs::create_dir_all(&d).unwrap();
        }
        std::fs::write(root.join("a/adapter_config.json"), "{}").unwrap();
        std::fs::write(outside.join("adapter_config.json"), "{}").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let root = std::fs::canonicalize(&root).unwrap();
        assert_eq!(inside_root(&root, Path::new("a")).unwrap(), root.join("a"));
        assert_eq!(inside_root(&root, &root.join("a")).unwrap(), root.join("a"));
        for escaping in ["../outside", "a/../../outside", "link"] {
            let e = inside_root(&root, Path::new(escaping)).unwrap_err();
            assert_eq!(e.status.as_u16(), 403, "{escaping}: {}", e.message);
        }
        let e = inside_root(&root, &outside).unwrap_err();
        assert_eq!(e.status.as_u16(), 403);
        assert_eq!(
            inside_root(&root, Path::new("empty"))
                .unwrap_err()
                .status
                .as_u16(),
            400
        );
        assert_eq!(
            inside_root(&root, Path::new("missing"))
                .unwrap_err()
                .status
                .as_u16(),
            400
        );
        std::fs::remove_dir_all(&base).unwrap();
    }
}
