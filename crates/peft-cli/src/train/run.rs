//! Where a run writes and where it stands: [`RunDir`] (the metrics log,
//! atomic checkpoints, the loss plot) and [`RunState`] (what `--resume`
//! continues from).

use std::io::Write;
use std::path::{Path, PathBuf};

use peft_core::{PeftError, Result};
use serde::{Deserialize, Serialize};

use super::config::TrainConfig;

/// Where a run stands, saved beside the `last/` checkpoint with the
/// optimizer state so that `--resume` continues exactly.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunState {
    /// Optimizer steps done.
    pub step: usize,
    /// The current epoch.
    pub epoch: usize,
    /// Optimizer steps done in the current epoch.
    pub steps_in_epoch: usize,
    /// Training tokens seen.
    pub tokens: usize,
    /// Losses of the steps since the last logged mean.
    pub window: Vec<f64>,
    /// Logged mean losses.
    pub losses: Vec<(usize, f64)>,
    /// Evaluations: `(step, value)`.
    pub evals: Vec<(usize, f64)>,
    /// The metric's name and direction, once evaluated.
    pub metric: Option<(String, bool)>,
    /// Evaluations since the best one.
    pub since_best: usize,
}

/// The run state's file in a `last/` checkpoint.
pub(super) const STATE_FILE: &str = "trainer_state.json";

impl RunState {
    /// The state saved in `dir` (a `last/` checkpoint), if this run (its
    /// `config` over `n_train` examples) can continue from it.
    pub(super) fn read(dir: &Path, config: &TrainConfig, n_train: usize) -> Result<Self> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| PeftError::Io {
            path: path.clone(),
            source,
        })?;
        let state: RunState = serde_json::from_str(&text).map_err(|source| PeftError::Json {
            path: path.clone(),
            source,
        })?;
        state.check_resumable(config, n_train, &path)?;
        Ok(state)
    }

    /// Refuses a saved state this run cannot continue from: past the run's
    /// last step or epoch, or further into an epoch than it has steps (the
    /// epoch loop would then skip every batch and never end).
    fn check_resumable(&self, config: &TrainConfig, n_train: usize, path: &Path) -> Result<()> {
        let steps_per_epoch = config.steps_per_epoch(n_train);
        let total = config.total_steps(n_train);
        let problem = if self.step > total {
            Some(format!(
                "step {} is past the run's {total} steps",
                self.step
            ))
        } else if self.epoch > config.epochs {
            Some(format!(
                "epoch {} is past the run's {} epochs",
                self.epoch, config.epochs
            ))
        } else if self.steps_in_epoch >= steps_per_epoch.max(1) {
            Some(format!(
                "{} steps into an epoch of {steps_per_epoch}",
                self.steps_in_epoch
            ))
        } else {
            None
        };
        match problem {
            Some(message) => Err(PeftError::Checkpoint {
                path: path.to_path_buf(),
                message: format!("cannot resume: {message}"),
            }),
            None => Ok(()),
        }
    }
}

/// Where a run writes: `metrics.jsonl`, `best/` (the best checkpoint,
/// replaced atomically), `loss.svg`.
pub struct RunDir {
    dir: PathBuf,
    metrics: std::fs::File,
}

impl RunDir {
    /// Creates `dir` and starts its metrics log (`append`: continue the log
    /// of a resumed run). What an interrupted checkpoint write left in `dir`
    /// is removed.
    pub fn create(dir: &Path, append: bool) -> Result<Self> {
        let io = |source| PeftError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        sweep(dir).map_err(io)?;
        let metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(dir.join("metrics.jsonl"))
            .map_err(io)?;
        Ok(RunDir {
            dir: dir.to_path_buf(),
            metrics,
        })
    }

    /// The run's folder.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Appends `v` as one line of `metrics.jsonl`.
    pub fn log(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.metrics, "{v}")
            .and_then(|()| self.metrics.flush())
            .map_err(|source| PeftError::Io {
                path: self.dir.join("metrics.jsonl"),
                source,
            })
    }

    /// Writes a checkpoint under `name` atomically. The folder is written
    /// whole as `<name>.<n>` (`n` a fresh version), then `<name>` — a
    /// symbolic link — is replaced by one to it with a rename, which is
    /// atomic: whenever the process dies, `<name>` is the previous complete
    /// checkpoint or the new one. The previous version is deleted afterwards.
    pub fn checkpoint(
        &self,
        name: &str,
        write: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| PeftError::Io { path: p, source }
        };
        let link = self.dir.join(name);
        let previous = std::fs::read_link(&link).ok();
        let version = (0u64..)
            .map(|n| format!("{name}.{}-{n}", std::process::id()))
            .find(|v| !self.dir.join(v).exists())
            .expect("some version name is free");
        let building = self.dir.join(format!(".{version}.partial"));
        let _ = std::fs::remove_dir_all(&building);
        std::fs::create_dir_all(&building).map_err(io(&building))?;
        write(&building)?;
        std::fs::rename(&building, self.dir.join(&version)).map_err(io(&building))?;
        if link.is_dir() && previous.is_none() {
            // A plain folder from an older version of this program.
            std::fs::remove_dir_all(&link).map_err(io(&link))?;
        }
        let tmp_link = self
            .dir
            .join(format!(".{name}.link-{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp_link);
        symlink_dir(Path::new(&version), &tmp_link).map_err(io(&tmp_link))?;
        std::fs::rename(&tmp_link, &link).map_err(io(&link))?;
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        if let Some(old) = previous.filter(|p| *p != Path::new(&version)) {
            let _ = std::fs::remove_dir_all(self.dir.join(old));
        }
        Ok(link)
    }
}

/// Removes what a writer killed inside [`RunDir::checkpoint`] leaves
/// behind: `.<version>.partial` folders, `.<name>.link-<pid>` temporary
/// links, and checkpoint versions (`<name>.<pid>-<n>`) that no link points
/// to. What a link points to is never touched.
fn sweep(dir: &Path) -> std::io::Result<()> {
    let entries: Vec<std::fs::DirEntry> =
        std::fs::read_dir(dir)?.collect::<std::io::Result<_>>()?;
    let scratch = |name: &str| {
        name.starts_with('.') && (name.ends_with(".partial") || name.contains(".link-"))
    };
    // Only the real links keep a version: a temporary link (a writer
    // killed between making it and renaming it over the real one) points
    // at a version no reader can reach, which is swept with the link.
    let linked: std::collections::HashSet<std::ffi::OsString> = entries
        .iter()
        .filter(|e| !scratch(&e.file_name().to_string_lossy()))
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|t| t.file_name().map(|n| n.to_os_string()))
        .collect();
    for e in &entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let is_symlink = e.file_type()?.is_symlink();
        let scratch = scratch(&name);
        let orphan = !is_symlink && is_version_name(&name) && !linked.contains(&e.file_name());
        if scratch && is_symlink {
            std::fs::remove_file(e.path())?;
        } else if scratch || orphan {
            std::fs::remove_dir_all(e.path())?;
        }
    }
    Ok(())
}

/// Whether `name` is a checkpoint version folder's name: `<name>.<pid>-<n>`.
fn is_version_name(name: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    name.rsplit_once('.')
        .and_then(|(base, tail)| Some((base, tail.split_once('-')?)))
        .is_some_and(|(base, (pid, n))| !base.is_empty() && digits(pid) && digits(n))
}

#[cfg(unix)]
fn symlink_dir(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(windows)]
fn symlink_dir(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::windows::fs::symlink_dir(target, link)
}

/// The error that stops a run: `what` went non-finite, and where the last
/// good checkpoint is.
pub(super) fn non_finite(run: &RunDir, what: String) -> PeftError {
    let kept = run.path().join("best");
    let last = if kept.exists() {
        kept.display().to_string()
    } else {
        "none (no evaluation yet)".into()
    };
    PeftError::NonFinite(format!(
        "{what}; stopped. The last good checkpoint is {last}"
    ))
}

#[cfg(all(test, unix))]
mod tests {
    use super::sweep;

    /// A writer killed between making its temporary link and renaming it
    /// over `best` leaves the link and the version it points at: both go,
    /// and the version `best` points at stays. (Seen once as a flake of
    /// `cli.rs::a_killed_writer_never_leaves_a_torn_checkpoint`: the
    /// temporary link kept its orphan version alive.)
    #[test]
    fn a_temporary_link_does_not_keep_its_version() {
        let dir = std::env::temp_dir().join(format!("peft-sweep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for v in ["best.7-0", "best.7-1"] {
            std::fs::create_dir_all(dir.join(v)).unwrap();
        }
        std::os::unix::fs::symlink("best.7-0", dir.join("best")).unwrap();
        std::os::unix::fs::symlink("best.7-1", dir.join(".best.link-7")).unwrap();
        sweep(&dir).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["best", "best.7-0"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
