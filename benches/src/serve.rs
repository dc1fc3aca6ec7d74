//! `serve`: `peft serve` on SmolLM2-135M (GGUF) under load, on loopback,
//! bounded in requests: 1, 4, 16 and 64 resident LoRA adapters (r 8, all
//! linear) at concurrency 1, 4 and 16, each client streaming greedy
//! completions of 16 tokens round-robin over the adapters. Reports output
//! tokens/s, time to first token and inter-token latency (p50 / p99), the
//! memory one more resident adapter takes against its file, and the
//! process's peak memory. `serve_soak` (only when asked for): 10 minutes
//! (1 with `--quick`) at concurrency 16 over 16 adapters, for memory
//! growth and failed requests.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use peft_cli::serve::{ServeConfig, Server};
use peft_cli::tasks::{self, Method};
use peft_models::assets;
use peft_models::llama::Llama;
use serde_json::{json, Value};

use crate::{all_linear, emit, peak_rss_mib, Opts};

/// New tokens per request.
const MAX_TOKENS: usize = 16;

/// What one cell of the grid measured.
struct Load {
    output_tokens: usize,
    seconds: f64,
    ttft: Vec<f64>,
    itl: Vec<f64>,
}

/// The process's resident memory now, in MiB (Linux).
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?.to_string();
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    s[((s.len() - 1) as f64 * p).round() as usize]
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(600)))
        .build()
        .into()
}

/// One streamed request: (completion tokens, time to first token, gaps
/// between pieces).
fn one_request(agent: &ureq::Agent, base: &str, model: &str) -> (usize, f64, Vec<f64>) {
    try_request(agent, base, model).expect("serve bench request failed")
}

/// [`one_request`], its failure (no answer, a status other than 200, no
/// completion tokens reported) as an error.
fn try_request(
    agent: &ureq::Agent,
    base: &str,
    model: &str,
) -> Result<(usize, f64, Vec<f64>), String> {
    let body = json!({"model": model, "prompt": "Call me Ishmael. Some years ago, never mind how long",
                      "max_tokens": MAX_TOKENS, "temperature": 0, "stream": true,
                      "stream_options": {"include_usage": true}});
    let started = Instant::now();
    let response = agent
        .post(&format!("{base}/v1/completions"))
        .send(body.to_string())
        .map_err(|e| e.to_string())?;
    if response.status().as_u16() != 200 {
        return Err(format!("status {}", response.status().as_u16()));
    }
    let mut reader = BufReader::new(response.into_body().into_reader());
    let (mut first, mut last, mut gaps, mut tokens) = (None, None::<Instant>, Vec::new(), 0);
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap_or(0) > 0 {
        if let Some(data) = line.trim_end().strip_prefix("data: ") {
            if let Ok(v) = serde_json::from_str::<Value>(data) {
                if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                    tokens = n as usize;
                }
                if v["choices"][0]["text"]
                    .as_str()
                    .is_some_and(|t| !t.is_empty())
                {
                    let now = Instant::now();
                    first.get_or_insert(now - started);
                    if let Some(l) = last {
                        gaps.push((now - l).as_secs_f64());
                    }
                    last = Some(now);
                }
            }
        }
        line.clear();
    }
    if tokens == 0 {
        return Err("no completion tokens reported".into());
    }
    Ok((tokens, first.map_or(f64::NAN, |d| d.as_secs_f64()), gaps))
}

/// `requests` requests from `concurrency` clients, round-robin over
/// `models`.
fn load(base: &str, models: &[String], concurrency: usize, requests: usize) -> Load {
    let next = AtomicUsize::new(0);
    let out = Mutex::new(Load {
        output_tokens: 0,
        seconds: 0.0,
        ttft: Vec::new(),
        itl: Vec::new(),
    });
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..concurrency {
            s.spawn(|| {
                let agent = agent();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= requests {
                        break;
                    }
                    let (tokens, ttft, gaps) = one_request(&agent, base, &models[i % models.len()]);
                    let mut o = out.lock().unwrap();
                    o.output_tokens += tokens;
                    o.ttft.push(ttft);
                    o.itl.extend(gaps);
                }
            });
        }
    });
    let mut o = out.into_inner().unwrap();
    o.seconds = started.elapsed().as_secs_f64();
    o
}

fn write_adapter<B: Backend>(gguf: &Path, dir: &Path, device: &B::Device) {
    let base = Llama::<B>::from_gguf(gguf, device).expect("SmolLM2 loads");
    tasks::attach_to_train(base, &Method::slot(all_linear(8)), None)
        .and_then(|m| m.save_trained(dir, peft_cli::train::Saving::Best))
        .expect("the adapter is written");
}

/// A server on SmolLM2-135M with `adapters` resident copies of one r-8
/// LoRA (all linear layers) named `a0`, `a1`, …: the server, its base
/// URL, the adapter file's size, each load's seconds, and the memory the
/// loads took, in MiB.
struct Served {
    server: Server,
    base: String,
    dir: std::path::PathBuf,
    file_bytes: u64,
    load_times: Vec<f64>,
    loaded_mib: f64,
}

fn start_server<B: Backend>(adapters: usize, device: &B::Device) -> Served {
    let gguf = assets::fetch("smollm2")
        .expect("smollm2 asset")
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let dir = std::env::temp_dir().join(format!("peft-bench-serve-{}", std::process::id()));
    let root = dir.join("adapters");
    write_adapter::<B>(&gguf, &root.join("lora_r8_all_linear"), device);
    let file_bytes = std::fs::metadata(root.join("lora_r8_all_linear/adapter_model.safetensors"))
        .map(|m| m.len())
        .unwrap_or(0);
    let config = ServeConfig {
        adapter_root: Some(root.clone()),
        max_loaded: adapters,
        listen: "127.0.0.1:0".parse().unwrap(),
        max_queue: 1024,
        ..ServeConfig::new(gguf.clone())
    };
    let server = Server::start::<B>(config, device.clone()).expect("the server starts");
    let base = format!("http://{}", server.addr());
    let agent = agent();
    // The same file under distinct names: each is a resident copy.
    let before = rss_mib();
    let mut load_times = Vec::with_capacity(adapters);
    for i in 0..adapters {
        let t = Instant::now();
        let r = agent
            .post(&format!("{base}/v1/load_lora_adapter"))
            .send(
                json!({"lora_name": format!("a{i}"), "lora_path": "lora_r8_all_linear"})
                    .to_string(),
            )
            .expect("the server answers");
        assert_eq!(r.status().as_u16(), 200, "adapter load failed");
        load_times.push(t.elapsed().as_secs_f64());
    }
    Served {
        server,
        base,
        dir,
        file_bytes,
        load_times,
        loaded_mib: rss_mib() - before,
    }
}

pub fn serve_suite<B: Backend>(o: &Opts, device: &B::Device) {
    let counts: &[usize] = if o.quick { &[1, 4] } else { &[1, 4, 16, 64] };
    let concurrencies: &[usize] = if o.quick { &[1, 4] } else { &[1, 4, 16] };
    let most = *counts.last().unwrap();
    // Memory: every adapter of the largest count loaded, one by one.
    let Served {
        server,
        base,
        dir,
        file_bytes,
        mut load_times,
        loaded_mib,
    } = start_server::<B>(most, device);
    let per_adapter_mib = loaded_mib / most as f64;
    let file_mib = file_bytes as f64 / (1024.0 * 1024.0);
    emit(
        o,
        "serve",
        "adapter_load",
        &mut load_times,
        None,
        json!({"adapters": most, "file_mib": file_mib, "resident_mib_per_adapter": per_adapter_mib,
               "memory_ratio_vs_file": per_adapter_mib / file_mib}),
    );

    // Warm-up, unmeasured: the first requests fault in the weights' pages
    // and grow the allocator's pools (the first cell, one client, ran at
    // 2/3 of the speed of the same cell later in the run).
    let everyone: Vec<String> = (0..most).map(|i| format!("a{i}")).collect();
    let _ = load(&base, &everyone, 4, 8);
    // Throughput and latency over the grid.
    let mut tokens_per_s = std::collections::HashMap::new();
    for &n in counts {
        let models: Vec<String> = (0..n).map(|i| format!("a{i}")).collect();
        for &c in concurrencies {
            // At least 8 requests (128 tokens), so that one client's cell
            // is not a handful of samples.
            let requests = (2 * c).max(8);
            let mut l = load(&base, &models, c, requests);
            let tps = l.output_tokens as f64 / l.seconds;
            tokens_per_s.insert((n, c), tps);
            let one_adapter = tokens_per_s.get(&(1, c)).copied().unwrap_or(tps);
            let one_client = tokens_per_s.get(&(n, 1)).copied().unwrap_or(tps);
            let extra = json!({
                "adapters": n, "concurrency": c, "requests": requests,
                "output_tokens": l.output_tokens, "tokens_per_s": tps,
                "ttft_p50_ms": percentile(&l.ttft, 0.5) * 1e3,
                "ttft_p99_ms": percentile(&l.ttft, 0.99) * 1e3,
                "itl_p99_ms": percentile(&l.itl, 0.99) * 1e3,
                // The goals as "at most" ratios: one adapter's tokens/s
                // over these adapters' (≤ 1/0.8), and one client's over
                // this concurrency's (≤ 1/4 at 16).
                "one_adapter_tokens_per_s_ratio": one_adapter / tps,
                "concurrency_1_tokens_per_s_ratio": one_client / tps,
                // The process's high-water mark so far.
                "peak_rss_mib": peak_rss_mib(),
            });
            // median_ms: the inter-token latency's median.
            let mut itl = if l.itl.is_empty() {
                vec![f64::NAN]
            } else {
                std::mem::take(&mut l.itl)
            };
            emit(
                o,
                "serve",
                &format!("adapters_{n}_concurrency_{c}"),
                &mut itl,
                None,
                extra,
            );
        }
    }
    server.shutdown().expect("the server stops");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `serve_soak`: clients at concurrency 16 over 16 resident adapters for
/// 10 minutes (1 with `--quick`), after one round of warm-up: failed
/// requests, and the process's memory at the end (and its highest,
/// sampled every second) against the start.
pub fn soak_suite<B: Backend>(o: &Opts, device: &B::Device) {
    const CONCURRENCY: usize = 16;
    let span = Duration::from_secs(if o.quick { 60 } else { 600 });
    let Served {
        server, base, dir, ..
    } = start_server::<B>(16, device);
    let models: Vec<String> = (0..16).map(|i| format!("a{i}")).collect();
    load(&base, &models, CONCURRENCY, 2 * CONCURRENCY);
    let start_mib = rss_mib();
    let highest = Mutex::new(start_mib);
    let (ok, failed, tokens) = (
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    );
    let gaps = Mutex::new(Vec::new());
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            while started.elapsed() < span {
                std::thread::sleep(Duration::from_secs(1));
                let mut h = highest.lock().unwrap();
                *h = h.max(rss_mib());
            }
        });
        for _ in 0..CONCURRENCY {
            s.spawn(|| {
                let agent = agent();
                while started.elapsed() < span {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    match try_request(&agent, &base, &models[i % models.len()]) {
                        Ok((n, _, g)) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            tokens.fetch_add(n, Ordering::Relaxed);
                            gaps.lock().unwrap().extend(g);
                        }
                        Err(e) => {
                            if failed.fetch_add(1, Ordering::Relaxed) < 5 {
                                eprintln!("serve_soak: request failed: {e}");
                            }
                        }
                    }
                }
            });
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    let end_mib = rss_mib();
    let highest = highest.into_inner().unwrap().max(end_mib);
    let mut gaps = gaps.into_inner().unwrap();
    if gaps.is_empty() {
        gaps.push(f64::NAN);
    }
    let (ok, failed) = (ok.into_inner(), failed.into_inner());
    emit(
        o,
        "serve_soak",
        "adapters_16_concurrency_16_soak",
        &mut gaps,
        None,
        json!({"seconds": seconds, "requests": ok + failed, "failed_requests": failed,
               "tokens_per_s": tokens.into_inner() as f64 / seconds,
               "rss_start_mib": start_mib, "rss_end_mib": end_mib, "rss_highest_mib": highest,
               // The goal: memory at its highest within 5% of the start.
               "memory_growth_ratio": highest / start_mib,
               "peak_rss_mib": peak_rss_mib()}),
    );
    server.shutdown().expect("the server stops");
    let _ = std::fs::remove_dir_all(&dir);
}
