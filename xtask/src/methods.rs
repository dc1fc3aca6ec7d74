//! `cargo xtask methods`: every method on the main job, one table.
//!
//! Runs `peft train` (the build the README tells a newcomer to run: the dev
//! profile with optimised dependencies) once per method and learning rate
//! on all-MiniLM-L6-v2 with 3,000 Rotten Tomatoes sentences for one epoch
//! (batch 32, seed 42, the CLI's 10% held-out split), and writes
//! `target/methods-report/report.{json,md}`: per method the learning rate
//! kept (the best held-out accuracy of those tried; `--sweep` tries a third
//! of the default, the default and three times it), trainable parameters,
//! the adapter folder's bytes, held-out accuracy, the epoch's training time
//! (the run's own timer) and the process's peak resident memory, both
//! relative to LoRA. With `--only ROW` (LoRA, the reference, always runs)
//! the other rows of the last report are kept; `--render` writes
//! `report.md` again from `report.json`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

/// A method as the table runs it: its row name, the `peft train` flags
/// (beside the shared ones), an optional `--config` file's JSON, and the
/// default learning rate (the centre of `--sweep`'s three; each is the
/// best of a first sweep around the method's usual rate, 2026-12-06;
/// PiSSA and OLoRA 2026-12-07, where 2.2e-4 / 6.7e-4 / 2e-3 peaked at 2e-3).
struct Spec {
    row: &'static str,
    flags: &'static [&'static str],
    config: Option<&'static str>,
    lr: f64,
}

/// The methods `peft train` runs, in the table's order.
const SPECS: &[Spec] = &[
    Spec {
        row: "LoRA",
        flags: &[
            "--method",
            "lora",
            "--r",
            "8",
            "--alpha",
            "16",
            "--targets",
            "query,value",
        ],
        config: None,
        lr: 6e-3,
    },
    Spec {
        row: "DoRA",
        flags: &[
            "--method",
            "dora",
            "--r",
            "8",
            "--alpha",
            "16",
            "--targets",
            "query,value",
        ],
        config: None,
        lr: 6e-3,
    },
    Spec {
        row: "rsLoRA",
        flags: &["--method", "lora"],
        config: Some(
            r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_rslora": true, "target_modules": ["query", "value"]}"#,
        ),
        lr: 2e-3,
    },
    Spec {
        row: "LoRA+",
        flags: &[
            "--method",
            "lora",
            "--r",
            "8",
            "--alpha",
            "16",
            "--targets",
            "query,value",
            "--loraplus-lr-ratio",
            "16",
        ],
        config: None,
        lr: 2e-3,
    },
    Spec {
        row: "PiSSA",
        flags: &[
            "--method",
            "pissa",
            "--r",
            "8",
            "--alpha",
            "16",
            "--targets",
            "query,value",
        ],
        config: None,
        lr: 2e-3,
    },
    Spec {
        row: "OLoRA",
        flags: &[
            "--method",
            "olora",
            "--r",
            "8",
            "--alpha",
            "16",
            "--targets",
            "query,value",
        ],
        config: None,
        lr: 2e-3,
    },
    Spec {
        row: "LoHa",
        flags: &[
            "--method",
            "loha",
            "--r",
            "8",
            "--alpha",
            "8",
            "--targets",
            "query,value",
        ],
        config: None,
        lr: 1.2e-2,
    },
    Spec {
        row: "LoKr",
        flags: &[
            "--method",
            "lokr",
            "--r",
            "8",
            "--alpha",
            "8",
            "--targets",
            "query,value",
        ],
        config: None,
        lr: 1.2e-2,
    },
    Spec {
        row: "OFT",
        flags: &["--method", "oft", "--targets", "query,value"],
        config: None,
        lr: 6e-3,
    },
    Spec {
        row: "BOFT",
        flags: &["--method", "boft"],
        config: Some(
            r#"{"peft_type": "BOFT", "boft_block_size": 8, "boft_n_butterfly_factor": 2, "target_modules": ["query", "value"]}"#,
        ),
        lr: 6e-3,
    },
    Spec {
        row: "AdaLoRA",
        flags: &["--method", "adalora"],
        // init_r 12 → target_r 8 (LoRA's r), the budget shrinking between
        // step 10 and 20 steps before the end; total_step is the run's.
        config: Some(
            r#"{"peft_type": "ADALORA", "init_r": 12, "target_r": 8, "tinit": 10, "tfinal": 20, "lora_alpha": 16, "target_modules": ["query", "value"]}"#,
        ),
        // A first sweep centred on 6e-3 peaked at its highest rate.
        lr: 1.8e-2,
    },
    Spec {
        row: "VeRA",
        flags: &["--method", "vera", "--r", "256", "--targets", "query,value"],
        config: None,
        lr: 3e-2,
    },
    Spec {
        row: "LN tuning",
        // Every LayerNorm of MiniLM (the embeddings' and two per layer).
        flags: &["--method", "ln_tuning", "--targets", "LayerNorm"],
        config: None,
        lr: 6e-3,
    },
    Spec {
        row: "(IA)³",
        flags: &["--method", "ia3"],
        config: None,
        lr: 1.8e-2,
    },
    Spec {
        row: "Pfeiffer (seq_bn)",
        flags: &["--method", "adapter", "--adapter-preset", "seq_bn"],
        config: None,
        lr: 3e-3,
    },
    Spec {
        row: "prefix",
        flags: &["--method", "prefix", "--virtual-tokens", "20"],
        config: None,
        lr: 3e-2,
    },
    Spec {
        row: "prompt",
        flags: &["--method", "prompt", "--virtual-tokens", "20"],
        config: None,
        // With PEFT's SEQ_CLS head (the pooler on the first virtual token)
        // a grid centred on 1e-2 peaked at its highest rate.
        lr: 3e-2,
    },
];

/// What one `peft train` run gave.
#[derive(Debug, Clone, PartialEq)]
struct RunResult {
    lr: f64,
    trainable: u64,
    adapter_bytes: u64,
    accuracy: f64,
    epoch_s: f64,
    peak_rss_kib: u64,
}

impl RunResult {
    /// A run as `report.json` holds it.
    fn from_json(v: &Value) -> Option<RunResult> {
        Some(RunResult {
            lr: v["lr"].as_f64()?,
            trainable: v["trainable"].as_u64()?,
            adapter_bytes: v["adapter_bytes"].as_u64()?,
            accuracy: v["accuracy"].as_f64()?,
            epoch_s: v["epoch_s"].as_f64()?,
            peak_rss_kib: v["peak_rss_kib"].as_u64()?,
        })
    }
}

/// `trainable params: 8,450 || ...` in `peft train`'s output.
fn trainable_params(stdout: &str) -> Option<u64> {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("trainable params:"))?;
    let digits: String = line["trainable params:".len()..]
        .split("||")
        .next()?
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The last held-out accuracy and the training timer's last reading in a
/// run's `metrics.jsonl`.
fn accuracy_and_time(metrics: &str) -> Option<(f64, f64)> {
    let mut accuracy = None;
    let mut elapsed = None;
    for line in metrics.lines() {
        let v: Value = serde_json::from_str(line).ok()?;
        if let Some(a) = v["eval"]["accuracy"].as_f64() {
            accuracy = Some(a);
        }
        if let Some(t) = v["elapsed_s"].as_f64() {
            elapsed = Some(t);
        }
    }
    Some((accuracy?, elapsed?))
}

/// Bytes of every file in `dir` (a symlink to the checkpoint is followed).
fn folder_bytes(dir: &Path) -> Result<u64, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut total = 0;
    for entry in entries {
        let meta = std::fs::metadata(entry.map_err(|e| e.to_string())?.path())
            .map_err(|e| e.to_string())?;
        if meta.is_file() {
            total += meta.len();
        }
    }
    Ok(total)
}

/// Runs `cmd` with its output in `out/stdout.txt` and `out/stderr.txt`;
/// its exit success and peak resident memory in KiB (`wait4`'s
/// `ru_maxrss`, the child alone).
fn run_measured(mut cmd: Command, out: &Path) -> Result<(bool, u64), String> {
    let file = |name: &str| File::create(out.join(name)).map_err(|e| e.to_string());
    let child = cmd
        .stdin(Stdio::null())
        .stdout(file("stdout.txt")?)
        .stderr(file("stderr.txt")?)
        .spawn()
        .map_err(|e| format!("cannot run peft: {e}"))?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our child, not yet waited for (std's `Child` only
    // waits when asked to, and it is dropped unwaited below).
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    drop(child);
    if waited != pid {
        return Err(format!(
            "wait4 on peft failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    Ok((ok, usage.ru_maxrss as u64))
}

fn one_run(
    peft: &Path,
    assets: &Path,
    spec: &Spec,
    lr: f64,
    dir: &Path,
) -> Result<RunResult, String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let run = dir.join("run");
    let mut cmd = Command::new(peft);
    cmd.args([
        "train", "--task", "seq-cls", "--epochs", "1", "--batch", "32",
    ])
    .args(["--max-train", "3000", "--held-out", "0.1", "--seed", "42"])
    .arg("--model")
    .arg(assets.join("minilm"))
    .arg("--data")
    .arg(assets.join("rotten-tomatoes/rotten_tomatoes.jsonl"))
    .arg("--out")
    .arg(&run)
    .args(["--lr", &lr.to_string()])
    .args(spec.flags);
    if let Some(config) = spec.config {
        let path = dir.join("adapter_config.json");
        std::fs::write(&path, config).map_err(|e| e.to_string())?;
        cmd.arg("--config").arg(path);
    }
    eprintln!("methods: {} at lr {lr} …", spec.row);
    let (ok, peak) = run_measured(cmd, dir)?;
    let stdout = std::fs::read_to_string(dir.join("stdout.txt")).unwrap_or_default();
    if !ok {
        let stderr = std::fs::read_to_string(dir.join("stderr.txt")).unwrap_or_default();
        return Err(format!("{} failed:\n{stdout}\n{stderr}", spec.row));
    }
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).map_err(|e| e.to_string())?;
    let (accuracy, epoch_s) =
        accuracy_and_time(&metrics).ok_or(format!("{}: no accuracy in metrics.jsonl", spec.row))?;
    Ok(RunResult {
        lr,
        trainable: trainable_params(&stdout).ok_or(format!("{}: no parameter count", spec.row))?,
        adapter_bytes: folder_bytes(&run.join("best"))?,
        accuracy,
        epoch_s,
        peak_rss_kib: peak,
    })
}

/// The report's Markdown: one row per method, the missing ones named.
fn markdown(rows: &[(&str, Vec<RunResult>)], meta: &Value) -> String {
    let best = |runs: &[RunResult]| -> RunResult {
        runs.iter()
            .cloned()
            .fold(None::<RunResult>, |b, r| match b {
                Some(b) if b.accuracy >= r.accuracy => Some(b),
                _ => Some(r),
            })
            .expect("at least one run")
    };
    let Some(lora) = rows.first().filter(|r| !r.1.is_empty()).map(|r| best(&r.1)) else {
        return "LoRA, the reference row, did not run\n".into();
    };
    let mut md = format!(
        "# Every method on the main job\n\n`cargo xtask methods{}` at {} on {} ({} cores), git {}.\n\n\
         all-MiniLM-L6-v2 (`BertForSequenceClassification`), 3,000 Rotten Tomatoes sentences, one epoch, \
         batch 32, seed 42, linear schedule with 10% warm-up; held-out accuracy on the CLI's 10% split. \
         Learning rate: the best held-out accuracy of those tried. Time is the epoch's training time \
         (the run's own timer), memory the `peft` process's peak resident set; both relative to LoRA.\n\n\
         | method | lr | trainable params | adapter bytes | held-out accuracy | epoch time | peak memory |\n\
         |---|---|---|---|---|---|---|\n",
        if meta["sweep"].as_bool() == Some(true) { " --sweep" } else { "" },
        meta["date"].as_str().unwrap_or(""),
        meta["machine"]["cpu"].as_str().unwrap_or(""),
        meta["machine"]["cores"],
        meta["git_revision"].as_str().unwrap_or(""),
    );
    for (row, runs) in rows {
        if runs.is_empty() {
            md.push_str(&format!(
                "| {row} | failed (`target/methods-report/runs/`) | | | | | |\n"
            ));
            continue;
        }
        let r = best(runs);
        let tried: Vec<String> = runs
            .iter()
            .map(|x| format!("{}: {:.3}", lr_text(x.lr), x.accuracy))
            .collect();
        md.push_str(&format!(
            "| {row} | {}{} | {} | {} | {:.3} | {:.1} s (×{:.2}) | {} MiB (×{:.2}) |\n",
            lr_text(r.lr),
            if runs.len() > 1 {
                format!(" (tried {})", tried.join(", "))
            } else {
                String::new()
            },
            r.trainable,
            r.adapter_bytes,
            r.accuracy,
            r.epoch_s,
            r.epoch_s / lora.epoch_s,
            r.peak_rss_kib / 1024,
            r.peak_rss_kib as f64 / lora.peak_rss_kib as f64,
        ));
    }
    md
}

/// `cargo xtask methods [--sweep] [--only ROW]...`.
pub fn methods(args: &[String], root: &Path, meta: Value) -> Result<(), String> {
    let mut sweep = false;
    let mut only = Vec::new();
    let mut it = args.iter();
    let out = root.join("target/methods-report");
    while let Some(a) = it.next() {
        match a.as_str() {
            "--sweep" => sweep = true,
            "--render" => return render(&out),
            "--only" => only.push(it.next().ok_or("--only needs a method row name")?.clone()),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(&cargo)
        .current_dir(root)
        .args(["build", "--quiet", "-p", "peft-cli"])
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !built.success() {
        return Err("cargo build -p peft-cli failed".into());
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let peft = target.join("debug/peft");
    let assets = std::env::var_os("PEFT_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/peft-rs/assets")
        });
    for asset in ["minilm", "rotten-tomatoes"] {
        if !assets.join(asset).is_dir() {
            return Err(format!(
                "asset `{asset}` missing under {}: run `python3 scripts/fetch_assets.py {asset}`",
                assets.display()
            ));
        }
    }
    // A row name that matches nothing would run LoRA alone and keep the
    // old row: refused, naming the rows.
    if let Some(unknown) = only
        .iter()
        .find(|o| !SPECS.iter().any(|s| s.row == o.as_str()))
    {
        let rows: Vec<&str> = SPECS.iter().map(|s| s.row).collect();
        return Err(format!("--only `{unknown}` names no row (rows: {rows:?})"));
    }
    let mut rows = Vec::new();
    for spec in SPECS {
        if !only.is_empty() && spec.row != "LoRA" && !only.iter().any(|o| o == spec.row) {
            continue;
        }
        let lrs = match sweep {
            true => vec![spec.lr / 3.0, spec.lr, spec.lr * 3.0],
            false => vec![spec.lr],
        };
        let mut runs = Vec::new();
        for (i, lr) in lrs.into_iter().enumerate() {
            let dir = out.join("runs").join(format!("{}-{i}", slug(spec.row)));
            let r = match one_run(&peft, &assets, spec, lr, &dir) {
                Ok(r) => r,
                Err(e) => {
                    // One failed run does not lose the others' half hour;
                    // the table says the method failed.
                    eprintln!("  failed: {e}");
                    continue;
                }
            };
            eprintln!(
                "  accuracy {:.3}, {} trainable, {:.1} s, {} MiB",
                r.accuracy,
                r.trainable,
                r.epoch_s,
                r.peak_rss_kib / 1024
            );
            runs.push(r);
        }
        rows.push((spec.row, runs));
    }
    // With --only, the other methods' rows of the last report stay.
    if !only.is_empty() {
        if let Ok(text) = std::fs::read_to_string(out.join("report.json")) {
            let earlier: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            for (row, runs) in rows_of(&earlier) {
                if rows.iter().all(|(r, _)| *r != row) {
                    rows.push((row, runs));
                }
            }
            rows.sort_by_key(|(r, _)| SPECS.iter().position(|s| s.row == *r));
        }
    }
    let mut meta = meta;
    meta["sweep"] = sweep.into();
    let report = json!({
        "meta": meta,
        "rows": rows.iter().map(|(row, runs)| json!({
            "method": row,
            "runs": runs.iter().map(|r| json!({
                "lr": r.lr, "trainable": r.trainable, "adapter_bytes": r.adapter_bytes,
                "accuracy": r.accuracy, "epoch_s": r.epoch_s, "peak_rss_kib": r.peak_rss_kib,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&report).expect("json"),
    )
    .map_err(|e| e.to_string())?;
    let md = markdown(&rows, &meta);
    std::fs::write(out.join("report.md"), &md).map_err(|e| e.to_string())?;
    println!("{md}");
    eprintln!("wrote {}", out.join("report.md").display());
    Ok(())
}

/// A learning rate with two significant digits (`6.7e-4`).
fn lr_text(lr: f64) -> String {
    format!("{lr:.1e}")
}

/// The rows of a `report.json` whose method is still in [`SPECS`], with
/// their runs.
fn rows_of(report: &Value) -> Vec<(&'static str, Vec<RunResult>)> {
    let mut rows = Vec::new();
    for row in report["rows"].as_array().into_iter().flatten() {
        let name = row["method"].as_str().unwrap_or_default();
        if let Some(spec) = SPECS.iter().find(|s| s.row == name) {
            let runs = row["runs"].as_array().into_iter().flatten();
            rows.push((spec.row, runs.filter_map(RunResult::from_json).collect()));
        }
    }
    rows
}

/// `--render`: `report.md` again from `report.json` (after a change to
/// the table's format; nothing runs).
fn render(out: &Path) -> Result<(), String> {
    let path = out.join("report.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let report: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let md = markdown(&rows_of(&report), &report["meta"]);
    std::fs::write(out.join("report.md"), &md).map_err(|e| e.to_string())?;
    println!("{md}");
    Ok(())
}

fn slug(row: &str) -> String {
    row.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_peft_train_writes() {
        let stdout = "vera on 3000 training / 1057 held-out examples: 94 steps\n\
                      trainable params: 8,450 || all params: 22,722,436 || trainable%: 0.0372\n";
        assert_eq!(trainable_params(stdout), Some(8450));
        assert_eq!(trainable_params("nothing"), None);
        let metrics = "{\"step\":90,\"loss\":0.6,\"elapsed_s\":32.4}\n\
                       {\"step\":94,\"loss\":0.63,\"elapsed_s\":34.1}\n\
                       {\"step\":94,\"eval\":{\"accuracy\":0.6868}}\n";
        assert_eq!(accuracy_and_time(metrics), Some((0.6868, 34.1)));
        assert_eq!(accuracy_and_time("{\"step\":1,\"elapsed_s\":1.0}"), None);
        assert_eq!(slug("(IA)³"), "-ia--");
    }

    #[test]
    fn the_table_keeps_each_methods_best_rate_relative_to_lora() {
        let run = |lr, accuracy, epoch_s, peak| RunResult {
            lr,
            trainable: 10,
            adapter_bytes: 100,
            accuracy,
            epoch_s,
            peak_rss_kib: peak,
        };
        let rows = vec![
            ("LoRA", vec![run(1e-3, 0.7, 10.0, 2048)]),
            (
                "VeRA",
                vec![run(1e-2, 0.6, 20.0, 1024), run(3e-2, 0.65, 30.0, 4096)],
            ),
        ];
        let meta = json!({"date": "d", "machine": {"cpu": "c", "cores": 2}, "git_revision": "g"});
        let md = markdown(&rows, &meta);
        assert!(
            md.contains("| LoRA | 1.0e-3 | 10 | 100 | 0.700 | 10.0 s (×1.00) | 2 MiB (×1.00) |"),
            "{md}"
        );
        assert!(md.contains("| VeRA | 3.0e-2 (tried 1.0e-2: 0.600, 3.0e-2: 0.650) | 10 | 100 | 0.650 | 30.0 s (×3.00) | 4 MiB (×2.00) |"), "{md}");
    }
}
