//! The server's counters, written by the HTTP side and the engine, read
//! as Prometheus text at `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Every counter and gauge of one server.
#[derive(Default)]
pub struct Metrics {
    /// Requests answered, by status code.
    pub responses: Mutex<BTreeMap<u16, u64>>,
    /// Generation requests, by the model they named.
    pub per_model: Mutex<BTreeMap<String, u64>>,
    /// Sequences that failed in the engine.
    pub failed: AtomicU64,
    /// Prompt tokens prefilled.
    pub prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
    /// Seconds (as nanoseconds) the engine spent in decode steps.
    pub step_nanos: AtomicU64,
    /// Sequences waiting or running.
    pub queued: AtomicUsize,
    /// Sequences advanced by the last step.
    pub last_batch: AtomicUsize,
    /// Batched decode forward passes.
    pub passes: AtomicU64,
    /// Rows those passes computed, all together.
    pub pass_rows: AtomicU64,
    /// The most rows one pass computed.
    pub pass_rows_max: AtomicUsize,
    /// Tokens per second of the last step.
    pub last_rate_milli: AtomicU64,
    /// Adapters loaded from disk.
    pub loads: AtomicU64,
    /// Adapters evicted by the LRU.
    pub evictions: AtomicU64,
    /// Adapters resident now.
    pub resident: AtomicUsize,
}

impl Metrics {
    /// Takes a place in the queue unless `limit` sequences hold them all.
    pub fn enter_queue(&self, n: usize, limit: usize) -> bool {
        let mut now = self.queued.load(Ordering::Relaxed);
        loop {
            if now + n > limit {
                return false;
            }
            match self
                .queued
                .compare_exchange(now, now + n, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(seen) => now = seen,
            }
        }
    }

    /// Gives a queue place back (a sequence ended or never started).
    pub fn leave_queue(&self) {
        let _ = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |q| {
                Some(q.saturating_sub(1))
            });
    }

    /// One decode step that advanced `sequences` sequences, adding
    /// `tokens` tokens, in `took`.
    pub fn record_step(&self, sequences: usize, tokens: usize, took: Duration) {
        self.generated_tokens
            .fetch_add(tokens as u64, Ordering::Relaxed);
        self.step_nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        self.last_batch.store(sequences, Ordering::Relaxed);
        let rate = tokens as f64 / took.as_secs_f64().max(1e-9);
        self.last_rate_milli
            .store((rate * 1000.0) as u64, Ordering::Relaxed);
    }

    /// One batched decode forward pass over `rows` sequences.
    pub fn record_pass(&self, rows: usize) {
        self.passes.fetch_add(1, Ordering::Relaxed);
        self.pass_rows.fetch_add(rows as u64, Ordering::Relaxed);
        self.pass_rows_max.fetch_max(rows, Ordering::Relaxed);
    }

    /// Adapters resident now.
    pub fn set_resident(&self, n: usize) {
        self.resident.store(n, Ordering::Relaxed);
    }

    /// Counts a response with `status`.
    pub fn respond(&self, status: u16) {
        *self.responses.lock().unwrap().entry(status).or_default() += 1;
    }

    /// Counts a generation request for `model`.
    pub fn request_for(&self, model: &str) {
        *self
            .per_model
            .lock()
            .unwrap()
            .entry(model.to_string())
            .or_default() += 1;
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        let name = "peft_responses_total";
        head(&mut out, name, "counter", "HTTP responses by status code.");
        for (status, count) in self.responses.lock().unwrap().iter() {
            let _ = writeln!(out, "{name}{{status=\"{status}\"}} {count}");
        }
        let name = "peft_model_requests_total";
        head(
            &mut out,
            name,
            "counter",
            "Generation requests by model (adapter or base).",
        );
        for (model, count) in self.per_model.lock().unwrap().iter() {
            let _ = writeln!(out, "{name}{{model=\"{}\"}} {count}", escape(model));
        }
        let count = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        let gauge = |a: &AtomicUsize| a.load(Ordering::Relaxed).to_string();
        let seconds = self.step_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let rate = self.last_rate_milli.load(Ordering::Relaxed) as f64 / 1000.0;
        let scalars = [
            (
                "peft_failed_sequences_total",
                "counter",
                "Sequences that failed in the engine.",
                count(&self.failed),
            ),
            (
                "peft_prompt_tokens_total",
                "counter",
                "Prompt tokens prefilled.",
                count(&self.prompt_tokens),
            ),
            (
                "peft_generation_tokens_total",
                "counter",
                "Tokens generated.",
                count(&self.generated_tokens),
            ),
            (
                "peft_decode_seconds_total",
                "counter",
                "Seconds spent in decode steps.",
                format!("{seconds:.6}"),
            ),
            (
                "peft_queue_depth",
                "gauge",
                "Sequences waiting or running.",
                gauge(&self.queued),
            ),
            (
                "peft_batch_size",
                "gauge",
                "Sequences advanced by the last decode step.",
                gauge(&self.last_batch),
            ),
            (
                "peft_decode_passes_total",
                "counter",
                "Batched decode forward passes (every sequence of the batch, whatever its adapter, in one).",
                count(&self.passes),
            ),
            (
                "peft_decode_pass_rows_total",
                "counter",
                "Sequences those passes advanced, all together.",
                count(&self.pass_rows),
            ),
            (
                "peft_decode_pass_rows_max",
                "gauge",
                "The most sequences one batched decode pass advanced.",
                gauge(&self.pass_rows_max),
            ),
            (
                "peft_tokens_per_second",
                "gauge",
                "Tokens per second of the last decode step.",
                format!("{rate:.3}"),
            ),
            (
                "peft_adapter_loads_total",
                "counter",
                "Adapters loaded from disk.",
                count(&self.loads),
            ),
            (
                "peft_adapter_evictions_total",
                "counter",
                "Adapters evicted to keep at most --max-loaded.",
                count(&self.evictions),
            ),
            (
                "peft_adapters_resident",
                "gauge",
                "Adapters in memory.",
                gauge(&self.resident),
            ),
        ];
        for (name, kind, help, value) in scalars {
            head(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        }
        out
    }
}

/// A label value with Prometheus' escapes.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
