//! Project commands, run as `cargo xtask <command>`.
//!
//! - `bench [--backend ndarray|flex|wgpu|cuda]... [--suite NAME]... [--device N] [--quick] [--vs-peft PYTHON]`:
//!   builds the `peft-bench` binary with each backend's feature, runs the
//!   suites (forward, rank, train, mixed, prompt, adapter, minilm, smollm2, qlora,
//!   cpu_backends; `serve`, `peft serve` under load, and `serve_soak`, 10 minutes of it, when asked for), and writes `target/bench-report/` with `report.json`,
//!   `report.md` (tables, the goals met or not) and one SVG chart per suite.
//!   `--vs-peft PYTHON` runs `benches/peft_reference.py` (Hugging Face PEFT
//!   on PyTorch) alternately with our `minilm` suite on the first backend
//!   and reports our/their ratios.
//!
//! - `methods [--sweep] [--only ROW]... | --render`: every method `peft train` runs, on
//!   the main job (MiniLM, 3,000 Rotten Tomatoes sentences, one epoch), as
//!   one table in `target/methods-report/` (`methods.rs`).
//!
//! Its tests also guard the workspace's layout: no crate's modules import
//! each other in a loop (`module_graph`).

mod methods;
#[cfg(test)]
mod module_graph;

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
        "vector": vector_extensions(),
    })
}

/// The widest vector extensions the CPU offers of those our kernels and
/// PyTorch's choose between (`avx512f`, `avx2`, `fma`): two machines of one
/// name ("AMD EPYC") differ here, and the ratios to PyTorch with them.
fn vector_extensions() -> Vec<&'static str> {
    let mut found = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            found.push("avx512f");
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            found.push("avx2");
        }
        if std::arch::is_x86_feature_detected!("fma") {
            found.push("fma");
        }
    }
    found
}

fn bench(args: &[String]) -> Result<(), String> {
    let mut backends = Vec::new();
    let mut passthrough = Vec::new();
    let mut vs_peft: Option<String> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--backend" => backends.push(it.next().ok_or("--backend needs a value")?.clone()),
            "--suite" => {
                passthrough.push("--suite".to_string());
                passthrough.push(it.next().ok_or("--suite needs a value")?.clone());
            }
            "--quick" => passthrough.push("--quick".into()),
            "--device" => {
                passthrough.push("--device".to_string());
                passthrough.push(it.next().ok_or("--device needs an index")?.clone());
            }
            "--vs-peft" => vs_peft = Some(it.next().ok_or("--vs-peft needs a Python")?.clone()),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    if backends.is_empty() {
        backends = vec!["ndarray".into(), "flex".into()];
    }
    let root = workspace_root();
    let mut results = Vec::new();
    for backend in &backends {
        results.extend(run_ours(&root, backend, &passthrough)?);
    }
    let reference = match &vs_peft {
        Some(python) => compare_with_peft(&root, &backends[0], python, &passthrough)?,
        None => Value::Null,
    };
    let report = json!({
        "git_revision": output_of("git", &["-C", root.to_str().unwrap_or("."), "rev-parse", "HEAD"]),
        "date": output_of("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "machine": machine(),
        "results": results,
        "vs_peft": reference,
    });
    let dir = root.join("target/bench-report");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report).expect("json"),
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(dir.join("report.md"), markdown(&report)).map_err(|e| e.to_string())?;
    for (suite, svg) in charts(&report) {
        std::fs::write(dir.join(format!("{suite}.svg")), svg).map_err(|e| e.to_string())?;
    }
    eprintln!("wrote {}", dir.join("report.md").display());
    Ok(())
}

/// Runs our benchmark binary on `backend`: one JSON value per figure.
fn run_ours(root: &Path, backend: &str, passthrough: &[String]) -> Result<Vec<Value>, String> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root)
        .args(["run", "--quiet", "-p", "peft-bench"]);
    match backend {
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
    cmd.args(["--", "--backend", backend]).args(passthrough);
    eprintln!("bench: {backend} …");
    let out = cmd.output().map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "benchmarks on {backend} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    parse_lines(&out.stdout)
}

fn parse_lines(stdout: &[u8]) -> Result<Vec<Value>, String> {
    let mut results = Vec::new();
    for line in String::from_utf8_lossy(stdout).lines() {
        let v: Value =
            serde_json::from_str(line).map_err(|e| format!("bad benchmark line `{line}`: {e}"))?;
        eprintln!(
            "  {}/{}{}: {:.2} ms{}",
            v["suite"].as_str().unwrap_or(""),
            v["name"].as_str().unwrap_or(""),
            v["impl"]
                .as_str()
                .map(|i| format!(" [{i}]"))
                .unwrap_or_default(),
            v["median_ms"].as_f64().unwrap_or(0.0),
            v["ratio_vs_baseline"]
                .as_f64()
                .map(|r| format!(" (×{r:.3})"))
                .unwrap_or_default()
        );
        results.push(v);
    }
    Ok(results)
}

/// Rounds of our `minilm` and `epoch` suites and PEFT's (the ones asked
/// for with `--suite`, both when none is), alternating (ours, theirs, ours,
/// theirs), so that machine noise hits both; per figure, the median over
/// rounds of each side's median, and their ratio.
fn compare_with_peft(
    root: &Path,
    backend: &str,
    python: &str,
    passthrough: &[String],
) -> Result<Value, String> {
    const ROUNDS: usize = 3;
    let quick = passthrough.iter().any(|a| a == "--quick");
    let asked: Vec<&str> = passthrough
        .windows(2)
        .filter(|w| w[0] == "--suite")
        .map(|w| w[1].as_str())
        .collect();
    let suites: Vec<&str> = ["minilm", "epoch"]
        .into_iter()
        .filter(|s| asked.is_empty() || asked.contains(s))
        .collect();
    if suites.is_empty() {
        return Err("--vs-peft compares the minilm and epoch suites; none was asked for".into());
    }
    let mut ours_args = Vec::new();
    for s in &suites {
        ours_args.extend(["--suite".to_string(), s.to_string()]);
    }
    if quick {
        ours_args.push("--quick".into());
    }
    let device = passthrough
        .iter()
        .position(|a| a == "--device")
        .and_then(|i| passthrough.get(i + 1));
    if let Some(i) = device {
        ours_args.extend(["--device".to_string(), i.clone()]);
    }
    // PyTorch on the same hardware: the CPU for a CPU backend, CUDA device
    // N for `--backend cuda --device N`.
    let torch_device = match backend {
        "cuda" => format!("cuda:{}", device.map_or("0", String::as_str)),
        _ => "cpu".to_string(),
    };
    let assets = std::env::var_os("PEFT_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/peft-rs/assets")
        });
    let mut ours: Vec<Value> = Vec::new();
    let mut theirs: Vec<Value> = Vec::new();
    for round in 0..ROUNDS {
        eprintln!("vs-peft: round {} of {ROUNDS}", round + 1);
        ours.extend(run_ours(root, backend, &ours_args)?);
        for suite in &suites {
            let mut cmd = Command::new(python);
            cmd.arg(root.join("benches/peft_reference.py"))
                .arg("--model")
                .arg(assets.join("minilm"))
                .args(["--device", &torch_device, "--suite", suite])
                .arg("--data")
                .arg(assets.join("rotten-tomatoes/rotten_tomatoes.jsonl"));
            if quick {
                cmd.arg("--quick");
            }
            let out = cmd
                .output()
                .map_err(|e| format!("cannot run {python}: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "benches/peft_reference.py failed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            theirs.extend(parse_lines(&out.stdout)?);
        }
    }
    let median_of = |set: &[Value], name: &str| -> Option<f64> {
        let mut v: Vec<f64> = set
            .iter()
            .filter(|r| r["name"] == name)
            .filter_map(|r| r["median_ms"].as_f64())
            .collect();
        v.sort_by(f64::total_cmp);
        (!v.is_empty()).then(|| v[v.len() / 2])
    };
    let mut rows = Vec::new();
    for name in [
        "forward_base",
        "forward_lora_r8_q_v_unmerged",
        "forward_lora_r8_q_v_merged",
        "train_step_lora_r8_q_v",
        "train_epoch_lora_r8_q_v",
        "eval_sentences",
    ] {
        if let (Some(a), Some(b)) = (median_of(&ours, name), median_of(&theirs, name)) {
            rows.push(json!({"name": name, "ours_ms": a, "peft_ms": b, "ratio": a / b}));
        }
    }
    Ok(json!({
        "backend": backend,
        "rounds": ROUNDS,
        "python": python,
        "torch_device": torch_device,
        "torch_threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "figures": rows,
    }))
}

/// The goals, each with the figure it is judged on.
fn goals(report: &Value) -> Vec<(String, String, Option<f64>, f64)> {
    let results = report["results"].as_array().cloned().unwrap_or_default();
    let mut out = Vec::new();
    let mut goal = |what: &str, suite: &str, name: &str, key: &str, limit: f64| {
        for r in results
            .iter()
            .filter(|r| r["suite"] == suite && r["name"] == name)
        {
            out.push((
                what.to_string(),
                r["backend"].as_str().unwrap_or("?").to_string(),
                r[key].as_f64(),
                limit,
            ));
        }
    };
    goal(
        "merged LoRA forward within 1% of base",
        "forward",
        "lora_r8_all_linear_merged",
        "ratio_vs_baseline",
        1.01,
    );
    goal(
        "unmerged LoRA r8 (q, v) forward within 6% of base",
        "forward",
        "lora_r8_q_v_unmerged",
        "ratio_vs_baseline",
        1.06,
    );
    goal(
        // The "full fine-tuning step ≥ 1.4× the LoRA step", as the
        // LoRA step's ratio to the full one (the train suite's baseline).
        "LoRA r8 (q, v) step at most 1/1.4 of a full fine-tuning step",
        "train",
        "lora_r8_q_v_step",
        "ratio_vs_baseline",
        1.0 / 1.4,
    );
    goal(
        "mixed batch of 16 adapters within 1.2× of one adapter",
        "mixed",
        "mixed_batch_16_adapters",
        "ratio_vs_baseline",
        1.2,
    );
    goal(
        "QLoRA peak memory under half of the f32 base's",
        "qlora",
        "q4_base_by_layer_step",
        "peak_rss_ratio_vs_f32",
        0.5,
    );
    goal(
        "QLoRA (GGUF Q4 base) held-out perplexity within 3% of the f32 base's",
        "qlora",
        "q4_base_by_layer_step",
        "held_out_ppl_ratio_vs_f32",
        1.03,
    );
    goal(
        "QLoRA (NF4 base) held-out perplexity within 3% of the f32 base's",
        "qlora",
        "nf4_base_by_layer_step",
        "held_out_ppl_ratio_vs_f32",
        1.03,
    );
    goal(
        "QLoRA (NF4 base, LoftQ init) held-out perplexity within 3% of the f32 base's",
        "qlora",
        "nf4_loftq_by_layer_step",
        "held_out_ppl_ratio_vs_f32",
        1.03,
    );
    goal(
        "16 adapters mixed at concurrency 16: one adapter's tokens/s at most 1/0.8 of theirs",
        "serve",
        "adapters_16_concurrency_16",
        "one_adapter_tokens_per_s_ratio",
        1.0 / 0.8,
    );
    goal(
        "1 adapter, concurrency 16 batches: concurrency 1's tokens/s at most 1/4 of its",
        "serve",
        "adapters_1_concurrency_16",
        "concurrency_1_tokens_per_s_ratio",
        0.25,
    );
    goal(
        "10-minute soak at concurrency 16: memory at its highest at most 1.05× the start",
        "serve_soak",
        "adapters_16_concurrency_16_soak",
        "memory_growth_ratio",
        1.05,
    );
    goal(
        "10-minute soak at concurrency 16: no failed request",
        "serve_soak",
        "adapters_16_concurrency_16_soak",
        "failed_requests",
        0.0,
    );
    goal(
        "memory per extra resident r-8 adapter at most 1.05× its file",
        "serve",
        "adapter_load",
        "memory_ratio_vs_file",
        1.05,
    );
    for f in report["vs_peft"]["figures"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        out.push((
            format!(
                "{} ahead of PEFT + PyTorch",
                f["name"].as_str().unwrap_or("?")
            ),
            report["vs_peft"]["backend"]
                .as_str()
                .unwrap_or("?")
                .to_string(),
            f["ratio"].as_f64(),
            1.0,
        ));
    }
    out
}

/// The suites of `results`, in the order they first appear.
fn suite_names(results: &[Value]) -> Vec<String> {
    let mut suites: Vec<String> = Vec::new();
    for name in results.iter().filter_map(|r| r["suite"].as_str()) {
        if !suites.iter().any(|s| s == name) {
            suites.push(name.to_string());
        }
    }
    suites
}

/// One horizontal bar chart per suite: median time of each figure per
/// backend, labelled with its ratio to the suite's baseline.
fn charts(report: &Value) -> Vec<(String, String)> {
    let results = report["results"].as_array().cloned().unwrap_or_default();
    let suites = suite_names(&results);
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    suites
        .into_iter()
        .map(|suite| {
            let rows: Vec<&Value> = results.iter().filter(|r| r["suite"] == suite.as_str()).collect();
            let max = rows
                .iter()
                .filter_map(|r| r["median_ms"].as_f64())
                .fold(0.0, f64::max)
                .max(1e-9);
            let (label_w, bar_w, row_h) = (330.0, 420.0, 22.0);
            let height = 50.0 + row_h * rows.len() as f64;
            let mut svg = format!(
                "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<text x=\"10\" y=\"20\" font-size=\"15\">{} — median time per figure (ms)</text>\n",
                label_w + bar_w + 160.0,
                esc(&suite)
            );
            for (i, r) in rows.iter().enumerate() {
                let y = 35.0 + row_h * i as f64;
                let ms = r["median_ms"].as_f64().unwrap_or(0.0);
                let w = bar_w * ms / max;
                let label = format!(
                    "{} [{}]",
                    r["name"].as_str().unwrap_or(""),
                    r["backend"].as_str().unwrap_or("")
                );
                let ratio = r["ratio_vs_baseline"]
                    .as_f64()
                    .map(|x| format!(" ×{x:.3}"))
                    .unwrap_or_default();
                svg += &format!(
                    "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n<rect x=\"{label_w}\" y=\"{y}\" width=\"{w:.1}\" height=\"{}\" fill=\"#4a7fb5\"/>\n<text x=\"{:.1}\" y=\"{:.1}\">{ms:.2}{}</text>\n",
                    label_w - 6.0,
                    y + 14.0,
                    esc(&label),
                    row_h - 6.0,
                    label_w + w + 4.0,
                    y + 14.0,
                    esc(&ratio)
                );
            }
            svg += "</svg>\n";
            (suite, svg)
        })
        .collect()
}

fn markdown(report: &Value) -> String {
    let m = &report["machine"];
    let vector: Vec<&str> = m["vector"]
        .as_array()
        .map(|v| v.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let vector = match vector.is_empty() {
        true => String::new(),
        false => format!(", {}", vector.join(" ")),
    };
    let mut s = format!(
        "# Benchmark report\n\nRevision `{}`, {}, {} ({} cores{vector}).\n\nEach comparison was measured in one run, variants interleaved; ratios are of medians against the suite's first row.\n",
        report["git_revision"].as_str().unwrap_or("?"),
        report["date"].as_str().unwrap_or("?"),
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"]
    );
    let results = report["results"].as_array().cloned().unwrap_or_default();
    let suites = suite_names(&results);
    let goals = goals(report);
    if !goals.is_empty() {
        s += "\n## Goals\n\n| goal | backend | measured ratio | limit | met |\n|---|---|---|---|---|\n";
        for (what, backend, ratio, limit) in goals {
            let (measured, met) = match ratio {
                Some(r) => (format!("{r:.3}"), if r <= limit { "yes" } else { "**NO**" }),
                None => ("–".into(), "not measured"),
            };
            // Three decimals at most (1/1.4 is 0.714), no trailing zeros.
            let limit = format!("{limit:.3}");
            let limit = limit.trim_end_matches('0').trim_end_matches('.');
            s += &format!("| {what} | {backend} | {measured} | ≤ {limit} | {met} |\n");
        }
    }
    if let Some(rows) = report["vs_peft"]["figures"].as_array() {
        s += &format!(
            "\n## Against Hugging Face PEFT + PyTorch\n\nall-MiniLM-L6-v2, LoRA r 8 on query/value: forward passes and one training step at batch 16 × 128 (`minilm`), one epoch of the main job's recipe and an evaluation of 1,000 sentences (`epoch`); {} rounds alternating ours and theirs, medians of the rounds' medians; backend {}.\n\n| figure | ours ms | PEFT ms | ours / PEFT |\n|---|---|---|---|\n",
            report["vs_peft"]["rounds"], report["vs_peft"]["backend"].as_str().unwrap_or("?")
        );
        for r in rows {
            s += &format!(
                "| {} | {:.2} | {:.2} | {:.3} |\n",
                r["name"].as_str().unwrap_or(""),
                r["ours_ms"].as_f64().unwrap_or(0.0),
                r["peft_ms"].as_f64().unwrap_or(0.0),
                r["ratio"].as_f64().unwrap_or(0.0)
            );
        }
    }
    for suite in suites {
        s += &format!("\n## {suite}\n\n![{suite}]({suite}.svg)\n\n| benchmark | backend | median ms | min | max | runs | ratio | peak RSS MiB |\n|---|---|---|---|---|---|---|---|\n");
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
        Some("methods") => {
            let root = workspace_root();
            let meta = json!({
                "git_revision": output_of("git", &["-C", root.to_str().unwrap_or("."), "rev-parse", "HEAD"]),
                "date": output_of("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
                "machine": machine(),
            });
            methods::methods(&args[1..], &root, meta)
        }
        _ => Err("usage: cargo xtask bench [--backend ndarray|flex|wgpu|cuda]... [--suite forward|rank|train|mixed|prompt|adapter|minilm|smollm2|qlora|serve|serve_soak|decode|epoch|ops|cpu_backends]... [--device N] [--quick] [--vs-peft PYTHON]\n       cargo xtask methods [--sweep] [--only ROW]... | --render".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The report's first line names the vector extensions when the report
    /// has them, and reads as before for reports without them.
    #[test]
    fn the_report_names_the_machines_vector_extensions() {
        let report = |machine: Value| json!({"git_revision": "g", "date": "d", "machine": machine, "results": []});
        let with = markdown(&report(
            json!({"cpu": "AMD EPYC", "cores": 2, "vector": ["avx512f", "avx2", "fma"]}),
        ));
        assert!(
            with.contains("AMD EPYC (2 cores, avx512f avx2 fma)."),
            "{with}"
        );
        let without = markdown(&report(json!({"cpu": "AMD EPYC", "cores": 2})));
        assert!(without.contains("AMD EPYC (2 cores)."), "{without}");
        assert!(machine()["vector"].is_array());
    }
}
