//! `peft serve` on the real SmolLM2-135M (GGUF) with LoRA and prefix
//! adapters, driven over loopback by a plain HTTP client: OpenAI's
//! shapes, greedy text equal to `peft generate`'s whether a request runs
//! alone or beside requests for other adapters, streaming, stop texts,
//! runtime loading confined to the adapter root, the LRU of resident
//! adapters, every refusal with its status, a client leaving mid-stream,
//! and shutdown.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use peft_cli::jobs;
use peft_cli::serve::{ServeConfig, Server};
use peft_cli::tasks::ProblemType;
use peft_cli::tasks::{self, Method};
use peft_core::config::InitLoraWeights;
use peft_core::generate::Sampler;
use peft_core::prompt_learning::{PromptLearningConfig, PromptTuningInit};
use peft_core::LoraConfig;
use peft_models::assets;
use peft_models::bert::Bert;
use peft_models::fixtures::FixtureCase;
use peft_models::llama::Llama;
use serde_json::{json, Value};

type B = burn::backend::Flex;

const KEY: &str = "test-key";

fn gguf() -> PathBuf {
    assets::fetch("smollm2")
        .unwrap()
        .join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The backend's random generator is process-wide: tests that draw new
/// adapters take turns and seed it, so that each draws the same adapter
/// whatever runs beside it.
static DRAWING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Writes a fresh adapter of `method`, drawn after seeding with `seed`
/// (random, so that it changes the model's output), into `dir`.
fn write_adapter<M: peft_core::PeftModel<B>>(base: M, method: Method, seed: u64, dir: &Path) {
    let _turn = DRAWING.lock().unwrap_or_else(|e| e.into_inner());
    <B as burn::tensor::backend::Backend>::seed(&Default::default(), seed);
    tasks::attach_to_train(base, &method, None)
        .unwrap()
        .save_trained(dir, peft_cli::train::Saving::Best)
        .unwrap();
}

fn llama(model: &Path) -> Llama<B> {
    Llama::<B>::from_gguf(model, &Default::default()).unwrap()
}

/// A LoRA with random `A` and `B` (PEFT's `init_lora_weights=False`) on
/// the attention's query and value, scaled by `alpha / 8`.
fn lora(alpha: f64, targets: &[&str]) -> Method {
    let mut c = LoraConfig::new(8, alpha, targets);
    c.init_lora_weights = InitLoraWeights::Bool(false);
    Method::slot(c)
}

/// `peft generate`'s greedy text.
fn generated(model: &Path, adapter: Option<&Path>, prompt: &str, max: usize) -> String {
    jobs::generate::<B>(
        model,
        adapter,
        prompt,
        max,
        &mut Sampler::Greedy,
        &Default::default(),
    )
    .unwrap()
}

struct Client {
    agent: ureq::Agent,
    base: String,
}

impl Client {
    fn new(server: &Server) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        Client {
            agent,
            base: format!("http://{}", server.addr()),
        }
    }

    /// Status and body of a request with `key` (or none).
    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        key: Option<&str>,
    ) -> (u16, String) {
        let url = format!("{}{path}", self.base);
        let mut response = match (method, body) {
            ("GET", _) => {
                let mut r = self.agent.get(&url);
                if let Some(k) = key {
                    r = r.header("Authorization", &format!("Bearer {k}"));
                }
                r.call()
            }
            (_, body) => {
                let mut r = self
                    .agent
                    .post(&url)
                    .header("Content-Type", "application/json");
                if let Some(k) = key {
                    r = r.header("Authorization", &format!("Bearer {k}"));
                }
                r.send(body.unwrap_or_default())
            }
        }
        .unwrap();
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        (status, text)
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, text) = self.send("POST", path, Some(body.to_string().as_bytes()), Some(KEY));
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, v)
    }

    /// The greedy completion of `prompt` by `model`.
    fn complete(&self, model: &str, prompt: &str, max_tokens: usize) -> String {
        let (status, v) = self.post(
            "/v1/completions",
            &json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}),
        );
        assert_eq!(status, 200, "{v}");
        v["choices"][0]["text"].as_str().unwrap().to_string()
    }

    /// The `data:` payloads of a streamed request, in order.
    fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let response = self
            .agent
            .post(&format!("{}{path}", self.base))
            .header("Authorization", &format!("Bearer {KEY}"))
            .send(body.to_string())
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let mut reader = BufReader::new(response.into_body().into_reader());
        let mut events = Vec::new();
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap() > 0 {
            if let Some(data) = line.trim_end().strip_prefix("data: ") {
                events.push(data.to_string());
            }
            line.clear();
        }
        events
    }

    /// A streamed `/v1/completions`: its chunks (the closing `[DONE]`
    /// checked and dropped) and the text they join to.
    fn streamed_completion(&self, body: &Value) -> (Vec<Value>, String) {
        let events = self.stream("/v1/completions", body);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let text = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["text"].as_str())
            .collect();
        (chunks, text)
    }

    fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.send("GET", "/metrics", None, None);
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .parse()
            .unwrap()
    }
}

/// A server on 127.0.0.1 (an ephemeral port) for `model` under `name`,
/// with `adapters` and the test key.
fn serving(model: PathBuf, adapters: Vec<(String, PathBuf)>, name: &str) -> Server {
    let config = ServeConfig {
        adapters,
        listen: "127.0.0.1:0".parse().unwrap(),
        api_key: Some(KEY.into()),
        served_model_name: Some(name.into()),
        ..ServeConfig::new(model)
    };
    Server::start::<B>(config, Default::default()).unwrap()
}

/// The softmax of each row of PEFT's logits `[rows, classes]`.
fn softmax_rows(logits: &peft_core::io::HostTensor) -> Vec<Vec<f32>> {
    logits
        .data
        .chunks(logits.shape[1])
        .map(|row| {
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = row.iter().map(|x| (x - max).exp()).sum();
            row.iter().map(|x| (x - max).exp() / sum).collect()
        })
        .collect()
}

/// Each input's `probs` in a `/classify` answer.
fn class_probs(v: &Value) -> Vec<Vec<f32>> {
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            d["probs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

fn error_of(v: &Value) -> (&str, Option<&str>, Option<&str>) {
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    (
        e["type"].as_str().unwrap(),
        e["param"].as_str(),
        e["code"].as_str(),
    )
}

#[test]
fn serves_adapters_behind_openais_api() {
    let model = gguf();
    let dir = std::env::temp_dir().join(format!("peft-serve-{}", std::process::id()));
    let root = dir.join("root");
    write_adapter(
        llama(&model),
        lora(32.0, &["q_proj", "v_proj"]),
        1,
        &root.join("lora"),
    );
    write_adapter(
        llama(&model),
        lora(64.0, &["q_proj", "v_proj"]),
        2,
        &root.join("lora2"),
    );
    let prefix = Method::Prefix(PromptLearningConfig::prefix_tuning(4));
    write_adapter(llama(&model), prefix, 3, &root.join("prefix"));
    let prompt_tuning = PromptLearningConfig::prompt_tuning(16, PromptTuningInit::Random);
    write_adapter(
        llama(&model),
        Method::Prompt(prompt_tuning),
        4,
        &root.join("prompt"),
    );
    let bottleneck = Method::Adapter(peft_adapter::BnConfig::seq_bn());
    write_adapter(llama(&model), bottleneck, 5, &root.join("bottleneck"));
    std::fs::create_dir_all(root.join("corrupt")).unwrap();
    std::fs::write(
        root.join("corrupt/adapter_config.json"),
        "{\"peft_type\": \"LORA\", \"r\": ",
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("outside")).unwrap();

    let prompt = "Call me Ishmael. Some years ago";
    let solo = |adapter: Option<&str>| {
        generated(&model, adapter.map(|a| root.join(a)).as_deref(), prompt, 8)
    };
    let expected_base = solo(None);
    let expected_lora = solo(Some("lora"));
    let expected_lora2 = solo(Some("lora2"));
    let expected_prefix = solo(Some("prefix"));
    let expected_prompt = solo(Some("prompt"));
    let expected_bottleneck = solo(Some("bottleneck"));
    // Each adapter changes the text, or "equal to peft generate" would
    // not tell adapters apart.
    assert_ne!(expected_base, expected_lora);
    assert_ne!(expected_lora, expected_lora2);
    assert_ne!(expected_base, expected_prefix);
    assert_ne!(expected_base, expected_prompt);

    let config = ServeConfig {
        adapters: vec![
            ("lora".into(), root.join("lora")),
            ("lora2".into(), root.join("lora2")),
        ],
        adapter_root: Some(root.clone()),
        max_loaded: 2,
        listen: "127.0.0.1:0".parse().unwrap(),
        api_key: Some(KEY.into()),
        max_queue: 8,
        max_body: 64 * 1024,
        served_model_name: Some("smollm2".into()),
        ..ServeConfig::new(model.clone())
    };
    let server = Server::start::<B>(config, Default::default()).unwrap();
    let c = Client::new(&server);

    // Health, metrics and the model list.
    assert_eq!(c.send("GET", "/health", None, None).0, 200);
    let (status, list) = c.send("GET", "/v1/models", None, Some(KEY));
    assert_eq!(status, 200);
    let list: Value = serde_json::from_str(&list).unwrap();
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["smollm2", "lora", "lora2"]);
    assert_eq!(list["data"][1]["parent"], "smollm2");

    // Greedy completions equal `peft generate`'s, base and adapter.
    let (status, v) = c.post(
        "/v1/completions",
        &json!({"model": "lora", "prompt": prompt, "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], expected_lora.as_str());
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 8);
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 3);
    assert_eq!(c.complete("smollm2", prompt, 8), expected_base);
    assert_eq!(
        c.metric("peft_generation_tokens_total"),
        16.0,
        "two requests of 8 tokens"
    );

    // Streaming: the pieces join to the same text; the last is [DONE].
    let (chunks, streamed) = c.streamed_completion(
        &json!({"model": "lora2", "prompt": prompt, "max_tokens": 8, "temperature": 0,
                "stream": true, "stream_options": {"include_usage": true}}),
    );
    assert_eq!(streamed, expected_lora2);
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"] == "length"));
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 8);

    // Runtime loading: from under the root only; a corrupt folder fails
    // alone.
    let load = |name: &str, path: &str| {
        c.post(
            "/v1/load_lora_adapter",
            &json!({"lora_name": name, "lora_path": path}),
        )
    };
    let (status, v) = load("prefix", "prefix");
    assert_eq!(status, 200, "{v}");
    assert_eq!(load("prefix", "prefix").0, 400, "a name already loaded");
    assert_eq!(load("out", "../outside").0, 403);
    assert_eq!(load("out", dir.join("outside").to_str().unwrap()).0, 403);
    let (status, v) = load("corrupt", "corrupt");
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("corrupt"),
        "{v}"
    );

    // Five adapters of four methods and the base at once, two resident
    // at most, the batch's rows of different lengths (virtual tokens,
    // arrivals mid-generation): each text equals its request alone; the
    // LRU evicted and reloaded; sequences shared decode passes.
    for (name, path) in [("prompt", "prompt"), ("bottleneck", "bottleneck")] {
        let (status, v) = load(name, path);
        assert_eq!(status, 200, "{v}");
    }
    let evictions_before = c.metric("peft_adapter_evictions_total");
    let runs: Vec<(&str, &String)> = vec![
        ("lora", &expected_lora),
        ("prefix", &expected_prefix),
        ("smollm2", &expected_base),
        ("lora2", &expected_lora2),
        ("prompt", &expected_prompt),
        ("bottleneck", &expected_bottleneck),
        ("lora", &expected_lora),
    ];
    std::thread::scope(|s| {
        let handles: Vec<_> = runs
            .iter()
            .map(|(name, _)| s.spawn(|| c.complete(name, prompt, 8)))
            .collect();
        for (h, (name, want)) in handles.into_iter().zip(&runs) {
            assert_eq!(&h.join().unwrap(), *want, "{name} beside the others");
        }
    });
    assert!(c.metric("peft_adapter_evictions_total") > evictions_before);
    assert!(c.metric("peft_adapters_resident") <= 2.0);
    assert!(
        c.metric("peft_decode_pass_rows_max") >= 3.0,
        "requests for different adapters decode in one pass"
    );

    // A stop text cuts the text before it.
    let cut = &expected_lora[expected_lora.len() / 2..];
    let cut = cut.split_whitespace().next().unwrap_or(cut);
    let (status, v) = c.post(
        "/v1/completions",
        &json!({"model": "lora", "prompt": prompt, "max_tokens": 8, "temperature": 0, "stop": [cut]}),
    );
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    assert_eq!(text, &expected_lora[..expected_lora.find(cut).unwrap()]);
    // Streamed, the pieces never show the stop text or a start of it.
    let (chunks, streamed) = c.streamed_completion(
        &json!({"model": "lora", "prompt": prompt, "max_tokens": 8, "temperature": 0,
                "stop": [cut], "stream": true}),
    );
    assert_eq!(streamed, text, "streamed with a stop text");
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"] == "stop"));

    // Chat, through the model's own template; n completions, seeded.
    let chat = json!({"model": "lora", "messages": [{"role": "user", "content": "Say hi."}],
                      "max_tokens": 5, "temperature": 0.8, "seed": 7, "n": 2});
    let (status, v) = c.post("/v1/chat/completions", &chat);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(v["choices"][1]["message"]["content"].is_string());
    let (_, again) = c.post("/v1/chat/completions", &chat);
    assert_eq!(
        again["choices"], v["choices"],
        "a seed makes sampling repeatable"
    );
    // n completions streamed: each chunk names its choice, and each
    // choice's pieces join to the text the same seeded request gives
    // without streaming.
    let sampled = json!({"model": "lora", "prompt": prompt, "max_tokens": 6,
                         "temperature": 0.9, "seed": 11, "n": 2});
    let (status, whole) = c.post("/v1/completions", &sampled);
    assert_eq!(status, 200, "{whole}");
    let mut streamed_body = sampled.clone();
    streamed_body["stream"] = json!(true);
    let (chunks, _) = c.streamed_completion(&streamed_body);
    let mut texts = [String::new(), String::new()];
    for chunk in &chunks {
        for choice in chunk["choices"].as_array().unwrap() {
            let i = choice["index"].as_u64().unwrap() as usize;
            texts[i].push_str(choice["text"].as_str().unwrap_or(""));
        }
    }
    for (i, text) in texts.iter().enumerate() {
        assert_eq!(
            text.as_str(),
            whole["choices"][i]["text"].as_str().unwrap(),
            "streamed choice {i}"
        );
    }
    assert!(
        !texts[0].is_empty() && texts[0] != texts[1],
        "two different samples: {texts:?}"
    );
    let events = c.stream(
        "/v1/chat/completions",
        &json!({"model": "smollm2", "stream": true,
        "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "temperature": 0}),
    );
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");

    // A base with no `score` head cannot classify; nor can an adapter
    // without a copy of one (a LoRA of a causal LM).
    for model in ["smollm2", "lora"] {
        let (status, v) = c.post(
            "/classify",
            &json!({"model": model, "input": "A fine film."}),
        );
        assert_eq!(
            (status, error_of(&v).0),
            (400, "invalid_request_error"),
            "{model}: {v}"
        );
        let message = v["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains("`score` head"), "{model}: {v}");
    }

    // Refusals, each with OpenAI's error object.
    let bad = |body: &[u8], key: Option<&str>| {
        let (status, text) = c.send("POST", "/v1/completions", Some(body), key);
        (
            status,
            serde_json::from_str::<Value>(&text).unwrap_or(Value::Null),
        )
    };
    let (status, v) = bad(b"{\"model\": ", Some(KEY));
    assert_eq!((status, error_of(&v).0), (400, "invalid_request_error"));
    let (status, v) = bad(
        b"{\"model\": \"lora\", \"prompt\": \"\xff\xfe\"}",
        Some(KEY),
    );
    assert_eq!(status, 400, "invalid UTF-8: {v}");
    let (status, v) = c.post(
        "/v1/completions",
        &json!({"model": "lora", "prompt": "x", "best_of": 1, "logprobs": 3}),
    );
    assert_eq!((status, error_of(&v).1), (400, Some("logprobs")));
    let (status, v) = c.post(
        "/v1/completions",
        &json!({"model": "lora", "prompt": "x", "temprature": 0}),
    );
    assert_eq!((status, error_of(&v).1), (400, Some("temprature")));
    let (status, v) = c.post("/v1/completions", &json!({"model": "nope", "prompt": "x"}));
    assert_eq!((status, error_of(&v).2), (404, Some("model_not_found")));
    let context = peft_cli::serve::model_info::ModelInfo::read(&model)
        .unwrap()
        .context;
    let (status, v) = c.post(
        "/v1/completions",
        &json!({"model": "lora", "prompt": "x", "max_tokens": context}),
    );
    assert_eq!(
        (status, error_of(&v).2),
        (400, Some("context_length_exceeded"))
    );
    // "x" is one token: it fits with `context - 1` new ones, not after 4
    // virtual tokens.
    let (status, v) = c.post(
        "/v1/completions",
        &json!({"model": "prefix", "prompt": "x", "max_tokens": context - 1}),
    );
    assert_eq!(
        (status, error_of(&v).2),
        (400, Some("context_length_exceeded")),
        "the prefix's positions count"
    );
    let big = json!({"model": "lora", "prompt": "x".repeat(70 * 1024)}).to_string();
    assert_eq!(bad(big.as_bytes(), Some(KEY)).0, 413);
    assert_eq!(bad(b"{}", None).0, 401);
    assert_eq!(bad(b"{}", Some("wrong")).0, 401);
    let (status, v) = c.post(
        "/v1/completions",
        &json!({"model": "lora", "prompt": "x", "n": 9, "temperature": 1}),
    );
    assert_eq!((status, error_of(&v).2), (429, Some("queue_full")));
    let full = c
        .agent
        .post(&format!("{}/v1/completions", c.base))
        .header("Authorization", &format!("Bearer {KEY}"))
        .send(json!({"model": "lora", "prompt": "x", "n": 9, "temperature": 1}).to_string())
        .unwrap();
    assert_eq!(
        full.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );

    // A client that leaves mid-stream frees its place at once.
    {
        let response = c
            .agent
            .post(&format!("{}/v1/completions", c.base))
            .header("Authorization", &format!("Bearer {KEY}"))
            .send(json!({"model": "lora", "prompt": prompt, "max_tokens": 500, "stream": true, "temperature": 0}).to_string())
            .unwrap();
        let mut reader = response.into_body().into_reader();
        let mut first = [0u8; 16];
        reader.read_exact(&mut first).unwrap();
    }
    let left = Instant::now();
    while c.metric("peft_queue_depth") > 0.0 {
        assert!(
            left.elapsed() < Duration::from_secs(60),
            "the abandoned sequence kept its place"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        c.metric("peft_generation_tokens_total") < 400.0,
        "the abandoned sequence ran on"
    );

    // Unloading: the name is gone; the others still serve.
    let (status, _) = c.post("/v1/unload_lora_adapter", &json!({"lora_name": "prefix"}));
    assert_eq!(status, 200);
    assert_eq!(
        c.post(
            "/v1/completions",
            &json!({"model": "prefix", "prompt": "x"})
        )
        .0,
        404
    );
    assert_eq!(
        c.post("/v1/unload_lora_adapter", &json!({"lora_name": "prefix"}))
            .0,
        404
    );
    assert_eq!(c.complete("lora", prompt, 8), expected_lora);

    let metrics = c.send("GET", "/metrics", None, None).1;
    assert!(
        metrics.contains("peft_responses_total{status=\"200\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("peft_model_requests_total{model=\"lora\"}"),
        "{metrics}"
    );
    let addr = server.addr();
    server.shutdown().unwrap();
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "still listening after shutdown"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The reference's embeddings, rows flattened.
fn floats(rows: &Value) -> Vec<f32> {
    rows.as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
        })
        .collect()
}

/// An encoder: `/v1/embeddings` gives sentence-transformers' embeddings of
/// all-MiniLM-L6-v2 (the committed reference, to 1e-4), as floats or as
/// OpenAI's base64; a LoRA adapter changes them; completions are refused,
/// and so are inputs past the context and a wrong `dimensions`.
#[test]
fn serves_embeddings_of_an_encoder() {
    let model = assets::fetch("minilm").unwrap();
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/minilm_reference.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("peft-serve-embed-{}", std::process::id()));
    let bert = Bert::<B>::load(&model, &Default::default()).unwrap();
    write_adapter(bert, lora(16.0, &["query", "value"]), 4, &dir.join("lora"));
    let server = serving(
        model.clone(),
        vec![("lora".into(), dir.join("lora"))],
        "minilm",
    );
    let c = Client::new(&server);

    let want = floats(&reference["embeddings"]);
    let input = reference["sentences"].clone();
    let (status, v) = c.post(
        "/v1/embeddings",
        &json!({"model": "minilm", "input": input}),
    );
    assert_eq!(status, 200, "{v}");
    let rows: Vec<Value> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["embedding"].clone())
        .collect();
    let got = floats(&Value::Array(rows));
    assert_eq!(got.len(), want.len());
    let d = peft_core::compare::max_abs_diff(&got, &want);
    assert!(d < 1e-4, "embeddings differ from the reference by {d:e}");
    let tokens: usize = reference["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().len())
        .sum();
    assert_eq!(v["usage"]["prompt_tokens"], tokens);

    let (status, b) = c.post(
        "/v1/embeddings",
        &json!({"model": "minilm", "input": "Hello world", "encoding_format": "base64"}),
    );
    assert_eq!(status, 200, "{b}");
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let first: Vec<f32> = bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let d = peft_core::compare::max_abs_diff(&first, &want[..first.len()]);
    assert!(
        first.len() == 384 && d < 1e-4,
        "base64: {} values, {d:e} off",
        first.len()
    );

    let (status, l) = c.post("/v1/embeddings", &json!({"model": "lora", "input": input}));
    assert_eq!(status, 200, "{l}");
    let rows: Vec<Value> = l["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["embedding"].clone())
        .collect();
    let adapted = floats(&Value::Array(rows));
    assert!(
        peft_core::compare::max_abs_diff(&adapted, &want) > 1e-3,
        "the adapter changed nothing"
    );

    let (status, e) = c.post(
        "/v1/completions",
        &json!({"model": "minilm", "prompt": "Hello"}),
    );
    assert_eq!((status, error_of(&e).0), (400, "invalid_request_error"));
    // Text is truncated as the model's tokenizer.json says (128 tokens for
    // all-MiniLM-L6-v2, as sentence-transformers does); token ids past the
    // model's 512 positions are refused.
    let long = "word ".repeat(600);
    let (status, e) = c.post("/v1/embeddings", &json!({"model": "minilm", "input": long}));
    assert_eq!(
        (status, &e["usage"]["prompt_tokens"]),
        (200, &json!(128)),
        "{e}"
    );
    let ids = vec![1000u32; 513];
    let (status, e) = c.post(
        "/v1/embeddings",
        &json!({"model": "minilm", "input": [ids]}),
    );
    assert_eq!(
        (status, error_of(&e).2),
        (400, Some("context_length_exceeded"))
    );
    let (status, e) = c.post(
        "/v1/embeddings",
        &json!({"model": "minilm", "input": "x", "dimensions": 10}),
    );
    assert_eq!((status, error_of(&e).1), (400, Some("dimensions")));
    server.shutdown().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The case's `input_ids` as token rows.
fn id_rows(case: &FixtureCase) -> Vec<Vec<u32>> {
    let ids = case.want("input_ids");
    ids.data
        .chunks(ids.shape[1])
        .map(|r| r.iter().map(|&v| v as u32).collect())
        .collect()
}

/// `/classify` with PEFT-trained SEQ_CLS adapters of MiniLM (LoRA and
/// (IA)³, the head's copy in `modules_to_save`): each row's probabilities
/// are the softmax of PEFT's logits (`fixtures/minilm_seqcls`), its label
/// the most likely class; the base, which has no head, is refused.
#[test]
fn classifies_with_peft_seq_cls_adapters() {
    let model = assets::fetch("minilm").unwrap();
    let cases: Vec<(&str, FixtureCase)> = ["lora", "ia3"]
        .into_iter()
        .map(|m| (m, FixtureCase::open("minilm_seqcls", m)))
        .collect();
    let adapters = cases
        .iter()
        .map(|(m, c)| (m.to_string(), c.dir.clone()))
        .collect();
    let server = serving(model, adapters, "minilm");
    let c = Client::new(&server);
    for (method, case) in &cases {
        let rows = id_rows(case);
        let (status, v) = c.post("/classify", &json!({"model": method, "input": rows}));
        assert_eq!(status, 200, "{method}: {v}");
        let classes = case.want("logits").shape[1];
        let data = v["data"].as_array().unwrap();
        assert_eq!(data.len(), rows.len(), "{method}");
        let wants = softmax_rows(case.want("logits"));
        for ((want, got), d) in wants.iter().zip(class_probs(&v)).zip(data) {
            let diff = peft_core::compare::max_abs_diff(&got, want);
            assert!(
                got.len() == classes && diff < 1e-4,
                "{method}: probabilities {got:?} vs PEFT's {want:?}"
            );
            let best = want
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0;
            assert_eq!(d["label"], format!("LABEL_{best}"), "{method}");
        }
    }
    let (status, v) = c.post(
        "/v1/classify",
        &json!({"model": "minilm", "input": "A fine film."}),
    );
    assert_eq!(
        (status, error_of(&v).0),
        (400, "invalid_request_error"),
        "the base has no head"
    );
    server.shutdown().unwrap();
}

/// `/classify` answers as the adapter's run names its `problem_type`
/// (`task.json`): PEFT's MiniLM LoRA read as a multi-label head gives each
/// label's sigmoid probability and the labels above one half, read as a
/// regression the head's values themselves.
#[test]
fn classifies_as_the_runs_problem_type() {
    let model = assets::fetch("minilm").unwrap();
    let case = FixtureCase::open("minilm_seqcls", "lora");
    let root = peft_models::fixtures::temp_dir("serve-problem-types");
    let mut adapters = Vec::new();
    for problem in [ProblemType::MultiLabel, ProblemType::Regression] {
        let dir = root.join(problem.name());
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(case.dir.join(f), dir.join(f)).unwrap();
        }
        peft_cli::tasks::write_problem_type(&dir, problem).unwrap();
        adapters.push((problem.name().to_string(), dir));
    }
    let server = serving(model, adapters, "minilm");
    let c = Client::new(&server);
    let rows = id_rows(&case);
    let logits = case.want("logits");
    let want_rows: Vec<&[f32]> = logits.data.chunks(logits.shape[1]).collect();
    let floats = |v: &Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let (status, v) = c.post(
        "/classify",
        &json!({"model": "multi_label_classification", "input": rows}),
    );
    assert_eq!(status, 200, "{v}");
    let mut labelled = 0;
    for (d, want) in v["data"].as_array().unwrap().iter().zip(&want_rows) {
        let sig: Vec<f32> = want.iter().map(|x| 1.0 / (1.0 + (-x).exp())).collect();
        let got = floats(&d["probs"]);
        assert!(
            peft_core::compare::max_abs_diff(&got, &sig) < 1e-5,
            "probabilities {got:?} vs sigmoid of PEFT's logits {sig:?}"
        );
        let on: Vec<String> = (0..sig.len())
            .filter(|&i| sig[i] > 0.5)
            .map(|i| format!("LABEL_{i}"))
            .collect();
        assert_eq!(d["labels"], json!(on), "{d}");
        labelled += on.len();
    }
    assert!(labelled > 0, "no label predicted: the check proves nothing");
    let (status, v) = c.post("/classify", &json!({"model": "regression", "input": rows}));
    assert_eq!(status, 200, "{v}");
    for (d, want) in v["data"].as_array().unwrap().iter().zip(&want_rows) {
        let got = floats(&d["values"]);
        assert!(
            peft_core::compare::max_abs_diff(&got, want) < 1e-4,
            "values {got:?} vs PEFT's logits {want:?}"
        );
        assert!(d.get("probs").is_none(), "{d}");
    }
    server.shutdown().unwrap();
    std::fs::remove_dir_all(&root).unwrap();
}

/// `/classify` on a decoder: the tiny `LlamaForSequenceClassification`
/// and `GPT2ForSequenceClassification` fixtures served with PEFT's SEQ_CLS
/// LoRA, whose `score` copy gives PEFT's class probabilities (each row
/// read at its last real token), and the base's own head gives the base's;
/// a text input is tokenized.
#[test]
fn classifies_with_a_decoders_score_head() {
    for arch in ["llama_seqcls", "gpt2_seqcls"] {
        classify_with_score_head(arch);
    }
}

/// A copy of the tiny `arch` fixture's folder with a word-level tokenizer
/// over its 64 ids (`w0` … `w63`), which a server reads.
fn tiny_model_folder(arch: &str) -> PathBuf {
    let model = peft_models::fixtures::temp_dir(&format!("serve-{arch}"));
    std::fs::create_dir_all(&model).unwrap();
    let from = peft_models::fixtures::fixtures_dir().join(arch);
    for file in ["config.json", "model.safetensors", "generation_config.json"] {
        if from.join(file).is_file() {
            std::fs::copy(from.join(file), model.join(file)).unwrap();
        }
    }
    let vocab: serde_json::Map<String, Value> =
        (0..64).map(|i| (format!("w{i}"), json!(i))).collect();
    let tokenizer = json!({"version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [], "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}});
    std::fs::write(model.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    model
}

/// Completions from HF folders (the tiny GPT-2 and Llama fixtures, not a
/// GGUF file) with PEFT's LoRA and prefix fixtures: each greedy text, alone
/// and with the three requests in flight at once, equals `peft
/// generate`'s, and the adapters change the text. (Whether the three share
/// decode passes depends on timing; the SmolLM2 test asserts batching.)
#[test]
fn serves_completions_from_hf_folders() {
    for arch in ["gpt2", "llama"] {
        let model = tiny_model_folder(arch);
        let fixtures = peft_models::fixtures::fixtures_dir().join(arch);
        let adapters: Vec<(String, PathBuf)> = ["lora", "prefix"]
            .iter()
            .map(|a| (a.to_string(), fixtures.join(a)))
            .collect();
        let server = serving(model.clone(), adapters.clone(), "tiny");
        let c = Client::new(&server);
        let requests = [
            ("tiny", None, "w3 w9 w5"),
            ("lora", Some(&adapters[0].1), "w7 w1 w12 w40 w2"),
            ("prefix", Some(&adapters[1].1), "w11"),
        ];
        let wants: Vec<String> = requests
            .iter()
            .map(|(_, dir, prompt)| generated(&model, dir.map(PathBuf::as_path), prompt, 12))
            .collect();
        for ((name, _, prompt), want) in requests.iter().zip(&wants) {
            assert_eq!(&c.complete(name, prompt, 12), want, "{arch} {name} alone");
        }
        let together: Vec<String> = std::thread::scope(|scope| {
            let handles: Vec<_> = requests
                .iter()
                .map(|(name, _, prompt)| {
                    scope.spawn(|| Client::new(&server).complete(name, prompt, 12))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(together, wants, "{arch}: batched");
        let base_on = |prompt: &str| generated(&model, None, prompt, 12);
        assert_ne!(
            wants[1],
            base_on(requests[1].2),
            "{arch}: the LoRA changes nothing"
        );
        assert_ne!(
            wants[2],
            base_on(requests[2].2),
            "{arch}: the prefix changes nothing"
        );
        assert!(!wants.iter().any(String::is_empty), "{arch}: {wants:?}");
        server.shutdown().unwrap();
        std::fs::remove_dir_all(&model).unwrap();
    }
}

/// A PiSSA adapter in PEFT's own layout (its config names the init, so
/// loading it splits the base weights again) is served beside the base:
/// its text is `peft generate`'s, and the base's own text stays the base's
/// after it loaded (in the shared model, the split would have changed it).
#[test]
fn serves_a_base_splitting_adapter_beside_the_base() {
    let model = tiny_model_folder("llama");
    let dir = peft_models::fixtures::temp_dir("serve-pissa");
    let mut config = LoraConfig::new(4, 8.0, &["q_proj", "v_proj"]);
    config.init_lora_weights = InitLoraWeights::Named("pissa".into());
    let base = Llama::<B>::load(&model, &Default::default()).unwrap();
    tasks::attach_to_train(base, &Method::slot(config), None)
        .unwrap()
        .save_trained(&dir, peft_cli::train::Saving::Last)
        .unwrap();
    // A fresh split changes nothing; move B as training would.
    let file = dir.join("adapter_model.safetensors");
    let mut tensors: Vec<(String, peft_core::io::HostTensor)> =
        peft_core::io::read_safetensors(&file)
            .unwrap()
            .into_iter()
            .collect();
    for (k, t) in &mut tensors {
        if k.ends_with("lora_B.weight") {
            t.data.iter_mut().for_each(|v| *v *= 1.5);
        }
    }
    std::fs::write(&file, peft_core::io::serialize_safetensors(&tensors, None)).unwrap();
    let server = serving(model.clone(), vec![("pissa".into(), dir.clone())], "tiny");
    let c = Client::new(&server);
    let prompt = "w7 w1 w12 w40 w2";
    let (base_text, pissa_text) = (
        generated(&model, None, prompt, 12),
        generated(&model, Some(&dir), prompt, 12),
    );
    assert_ne!(base_text, pissa_text, "the moved adapter changes nothing");
    assert_eq!(c.complete("pissa", prompt, 12), pissa_text);
    assert_eq!(
        c.complete("tiny", prompt, 12),
        base_text,
        "the base after the split adapter loaded"
    );
    server.shutdown().unwrap();
    std::fs::remove_dir_all(&model).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

fn classify_with_score_head(arch: &str) {
    let case = FixtureCase::open(arch, "seqcls_lora");
    let model = tiny_model_folder(arch);
    let server = serving(
        model.clone(),
        vec![("cls".into(), case.dir.clone())],
        "tiny",
    );
    let c = Client::new(&server);
    // The fixture's rows, right-padded with the padding token 0: each
    // row's tokens up to its last one that is not padding.
    let ids = case.want("input_ids");
    let rows: Vec<Vec<u32>> = ids
        .data
        .chunks(ids.shape[1])
        .map(|r| {
            let end = r.iter().rposition(|&v| v != 0.0).map_or(1, |p| p + 1);
            r[..end].iter().map(|&v| v as u32).collect()
        })
        .collect();
    let base_want = softmax_rows(case.want("logits_base"));
    for (name, key) in [("cls", "logits_unmerged"), ("tiny", "logits_base")] {
        let (status, v) = c.post("/classify", &json!({"model": name, "input": rows}));
        assert_eq!(status, 200, "{arch} {name}: {v}");
        let want = softmax_rows(case.want(key));
        let got = class_probs(&v);
        assert_eq!(got.len(), want.len(), "{name}: rows");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let diff = peft_core::compare::max_abs_diff(g, w);
            assert!(
                g.len() == w.len() && diff < 1e-5,
                "{arch} {name} row {i}: probabilities {g:?} vs PEFT's {w:?}"
            );
            // Not a no-op: the adapter's head moves the probabilities.
            if name == "cls" {
                let moved = peft_core::compare::max_abs_diff(w, &base_want[i]);
                assert!(
                    moved > 1e-3,
                    "row {i}: the adapter changes nothing ({moved:e})"
                );
            }
        }
        assert_eq!(v["data"][0]["num_classes"], want[0].len(), "{name}");
    }
    // Text goes through the model's tokenizer.
    let (status, v) = c.post(
        "/v1/classify",
        &json!({"model": "cls", "input": "w3 w9 w5"}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(class_probs(&v).len(), 1);
    assert!(v["data"][0]["label"]
        .as_str()
        .unwrap()
        .starts_with("LABEL_"));
    // Embeddings stay an encoder's.
    let (status, v) = c.post("/v1/embeddings", &json!({"model": "cls", "input": "w3"}));
    assert_eq!((status, error_of(&v).0), (400, "invalid_request_error"));
    server.shutdown().unwrap();
    std::fs::remove_dir_all(&model).unwrap();
}

/// BOFT (two butterfly factors), AdaLoRA, LN tuning and trainable tokens
/// adapters, served beside each other and the base on the tiny Llama: each
/// request, alone and with the others at once (one decode batch, each row
/// through its own adapter, LN tuning's rows through their own RMSNorm
/// scales, trainable tokens' through their own embedding rows), gives
/// `peft generate`'s greedy text.
#[test]
fn serves_boft_adalora_ln_tuning_and_trainable_tokens_in_one_batch() {
    let model = tiny_model_folder("llama");
    let dir = peft_models::fixtures::temp_dir("serve-boft-adalora");
    let boft = peft_oft::BoftConfig {
        init_weights: false,
        ..peft_oft::BoftConfig::new(4, 2, &["q_proj", "v_proj"])
    };
    let adalora = peft_lora::AdaLoraConfig {
        init_lora_weights: Value::Bool(false),
        ..peft_lora::AdaLoraConfig::new(4, 2, 10, &["q_proj", "v_proj"])
    };
    let base = || Llama::<B>::load(&model, &Default::default()).unwrap();
    write_adapter(base(), Method::slot(boft), 11, &dir.join("boft"));
    write_adapter(base(), Method::slot(adalora), 12, &dir.join("adalora"));
    // PEFT's trained LN tuning adapter of this Llama, its norms scaled
    // further apart from the base's so that the greedy text changes; and
    // its trainable tokens adapter (rows 1, 3, 5, 7 of the embedding),
    // scaled likewise.
    let ln = scaled_copy("llama/ln_tuning/other", &dir.join("ln_tuning"));
    let tokens = scaled_copy("llama/trainable_tokens", &dir.join("tokens"));
    let prompt = "w7 w1 w12 w40 w2";
    let runs: Vec<(&str, String)> = vec![
        ("tiny", generated(&model, None, prompt, 12)),
        (
            "boft",
            generated(&model, Some(&dir.join("boft")), prompt, 12),
        ),
        (
            "adalora",
            generated(&model, Some(&dir.join("adalora")), prompt, 12),
        ),
        ("ln_tuning", generated(&model, Some(&ln), prompt, 12)),
        ("tokens", generated(&model, Some(&tokens), prompt, 12)),
    ];
    assert_ne!(runs[0].1, runs[1].1, "the BOFT adapter changes nothing");
    assert_ne!(runs[0].1, runs[2].1, "the AdaLoRA adapter changes nothing");
    assert_ne!(
        runs[0].1, runs[3].1,
        "the LN tuning adapter changes nothing"
    );
    assert_ne!(
        runs[0].1, runs[4].1,
        "the trainable tokens adapter changes nothing"
    );
    let adapters = vec![
        ("boft".into(), dir.join("boft")),
        ("adalora".into(), dir.join("adalora")),
        ("ln_tuning".into(), ln.clone()),
        ("tokens".into(), tokens.clone()),
    ];
    // `peft generate` prints the end-of-sequence token it stops after
    // (`w2`, id 2 here); the server stops before it (OpenAI's
    // `finish_reason: stop`).
    let runs: Vec<(&str, String)> = runs
        .into_iter()
        .map(|(name, text)| (name, text.strip_suffix(" w2").unwrap_or(&text).to_string()))
        .collect();
    let server = serving(model.clone(), adapters, "tiny");
    let c = Client::new(&server);
    for (name, want) in &runs {
        assert_eq!(&c.complete(name, prompt, 12), want, "{name} alone");
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = runs
            .iter()
            .map(|(name, _)| s.spawn(|| Client::new(&server).complete(name, prompt, 12)))
            .collect();
        for (h, (name, want)) in handles.into_iter().zip(&runs) {
            assert_eq!(&h.join().unwrap(), want, "{name} beside the others");
        }
    });
    server.shutdown().unwrap();
    std::fs::remove_dir_all(&model).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A copy of the PEFT fixture adapter `case` (under `fixtures/`) in `to`,
/// each value scaled by `1 + 0.8·sin(i)` so that its effect is large.
fn scaled_copy(case: &str, to: &Path) -> PathBuf {
    let from = peft_models::fixtures::fixtures_dir().join(case);
    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(
        from.join("adapter_config.json"),
        to.join("adapter_config.json"),
    )
    .unwrap();
    let scaled: Vec<(String, peft_core::io::HostTensor)> =
        peft_core::io::read_safetensors(&from.join("adapter_model.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(k, mut t)| {
                for (i, v) in t.data.iter_mut().enumerate() {
                    *v *= 1.0 + 0.8 * (i as f32).sin();
                }
                (k, t)
            })
            .collect();
    std::fs::write(
        to.join("adapter_model.safetensors"),
        peft_core::io::serialize_safetensors(&scaled, None),
    )
    .unwrap();
    to.to_path_buf()
}
