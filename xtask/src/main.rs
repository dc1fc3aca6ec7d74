//! Project commands, run as `cargo xtask <command>`.
//!
//! - `bench [--backend ndarray|flex|wgpu|cuda]... [--suite forward|train|mixed|prompt|adapter|cpu_backends]... [--quick]`:
//!   builds the `peft-bench` binary with each backend's feature, runs the
//!   suites, and writes `target/bench-report/{report.json,report.md}`.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use serde_json::{json, Value};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn output_of(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
    })
}

fn bench(args: &[String]) -> Result<(), String> {
    let mut backends = Vec::new();
    let mut passthrough = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--backend" => backends.push(it.next().ok_or("--backend needs a value")?.clone()),
            "--suite" => {
                passthrough.push("--suite".to_string());
                passthrough.push(it.next().ok_or("--suite needs a value")?.clone());
            }
            "--quick" => passthrough.push("--quick".into()),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    if backends.is_empty() {
        backends = vec!["ndarray".into(), "flex".into()];
    }
    let root = workspace_root();
    let mut results = Vec::new();
    for backend in &backends {
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.current_dir(&root)
            .args(["run", "--quiet", "-p", "peft-bench"]);
        match backend.as_str() {
            "wgpu" | "cuda" => {
                cmd.args(["--features", &format!("peft-bench/{backend}")]);
            }
            "ndarray" | "flex" => {}
            other => {
                return Err(format!(
                    "unknown backend `{other}` (ndarray, flex, wgpu, cuda)"
                ))
            }
        }
        cmd.args(["--", "--backend", backend]).args(&passthrough);
        eprintln!("bench: {backend} …");
        let out = cmd.output().map_err(|e| format!("cannot run cargo: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "benchmarks on {backend} failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let v: Value = serde_json::from_str(line)
                .map_err(|e| format!("bad benchmark line `{line}`: {e}"))?;
            eprintln!(
                "  {}/{}: {:.2} ms{}",
                v["suite"].as_str().unwrap_or(""),
                v["name"].as_str().unwrap_or(""),
                v["median_ms"].as_f64().unwrap_or(0.0),
                v["ratio_vs_baseline"]
                    .as_f64()
                    .map(|r| format!(" (×{r:.3})"))
                    .unwrap_or_default()
            );
            results.push(v);
        }
    }
    let report = json!({
        "git_revision": output_of("git", &["-C", root.to_str().unwrap_or("."), "rev-parse", "HEAD"]),
        "date": output_of("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "machine": machine(),
        "results": results,
    });
    let dir = root.join("target/bench-report");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report).expect("json"),
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(dir.join("report.md"), markdown(&report)).map_err(|e| e.to_string())?;
    eprintln!("wrote {}", dir.join("report.md").display());
    Ok(())
}

fn markdown(report: &Value) -> String {
    let m = &report["machine"];
    let mut s = format!(
        "# Benchmark report\n\nRevision `{}`, {}, {} ({} cores).\n\nEach comparison was measured in one run, variants interleaved; ratios are of medians against the suite's first row.\n",
        report["git_revision"].as_str().unwrap_or("?"),
        report["date"].as_str().unwrap_or("?"),
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"]
    );
    let results = report["results"].as_array().cloned().unwrap_or_default();
    let mut suites: Vec<String> = Vec::new();
    for r in &results {
        if let Some(name) = r["suite"].as_str() {
            if !suites.iter().any(|s| s == name) {
                suites.push(name.to_string());
            }
        }
    }
    for suite in suites {
        s += &format!("\n## {suite}\n\n| benchmark | backend | median ms | min | max | runs | ratio | peak RSS MiB |\n|---|---|---|---|---|---|---|---|\n");
        for r in results.iter().filter(|r| r["suite"] == suite.as_str()) {
            let f = |k: &str| {
                r[k].as_f64()
                    .map(|v| format!("{v:.2}"))
                    .unwrap_or_else(|| "–".into())
            };
            s += &format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                r["name"].as_str().unwrap_or(""),
                r["backend"].as_str().unwrap_or(""),
                f("median_ms"),
                f("min_ms"),
                f("max_ms"),
                r["runs"],
                r["ratio_vs_baseline"]
                    .as_f64()
                    .map(|v| format!("{v:.3}"))
                    .unwrap_or_else(|| "1 (baseline)".into()),
                f("peak_rss_mib"),
            );
        }
    }
    s
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("bench") => bench(&args[1..]),
        _ => Err("usage: cargo xtask bench [--backend ndarray|flex|wgpu|cuda]... [--suite forward|train|mixed|prompt|adapter|cpu_backends]... [--quick]".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}
