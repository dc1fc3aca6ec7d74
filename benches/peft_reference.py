"""The `minilm` benchmark suite in Hugging Face PEFT + PyTorch, for
`cargo xtask bench --vs-peft PYTHON`: the same all-MiniLM-L6-v2 forward
passes (base, LoRA r8 on query/value unmerged and merged) and the same LoRA
training step (mean pooling, a two-class head, cross-entropy, AdamW lr
1e-3), on the same token ids, timed the same way (a warm-up, then the
variants interleaved, medians). Prints one JSON object per figure.

Both sides run without dropout (our BERT has none; here the model stays in
eval mode while training) and with as many threads as the machine has cores.

Environment: `python3 -m venv ENV && ENV/bin/pip install torch "peft==0.21.*"
transformers`; then `cargo xtask bench --suite minilm --vs-peft ENV/bin/python`.
"""

import argparse
import copy
import json
import os
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModel


def inputs(rows: int, length: int):
    ids = torch.tensor([1000 + (i * 7919) % 28_000 for i in range(rows * length)]).reshape(rows, length)
    mask = torch.ones(rows, length, dtype=torch.long)
    labels = torch.tensor([i % 2 for i in range(rows)])
    return ids, mask, labels


def sync(device: torch.device) -> None:
    # CUDA runs asynchronously: a timing ends when the device is done.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(runs: int, fns, device: torch.device):
    for f in fns:
        f()
    sync(device)
    out = [[] for _ in fns]
    for _ in range(runs):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            f()
            sync(device)
            out[i].append(time.perf_counter() - t)
    return out


def emit(name: str, samples, extra=None, suite: str = "minilm"):
    v = {"suite": suite, "name": name, "impl": "peft", "runs": len(samples),
         "median_ms": statistics.median(samples) * 1e3, "min_ms": min(samples) * 1e3,
         "max_ms": max(samples) * 1e3}
    v.update(extra or {})
    print(json.dumps(v), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="the all-MiniLM-L6-v2 folder")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu", help="cpu, or cuda:N (ours: --backend cuda --device N)")
    p.add_argument("--suite", default="minilm", choices=["minilm", "epoch"])
    p.add_argument("--data", help="rotten_tomatoes.jsonl (--suite epoch)")
    a = p.parse_args()
    device = torch.device(a.device)
    if a.suite == "epoch":
        torch.set_num_threads(a.threads)
        return epoch(a, device)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rows, length = (4, 32) if a.quick else (16, 128)
    ids, mask, labels = (t.to(device) for t in inputs(rows, length))
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False)

    base = AutoModel.from_pretrained(a.model).eval().to(device)
    unmerged = get_peft_model(copy.deepcopy(base), config).eval()
    merged = copy.deepcopy(unmerged).merge_and_unload().eval()

    def run(m):
        with torch.no_grad():
            m(input_ids=ids, attention_mask=mask).last_hidden_state

    runs = 5 if a.quick else 15
    t = interleaved(runs, [lambda: run(base), lambda: run(unmerged), lambda: run(merged)], device)
    info = {"tokens": rows * length}
    emit("forward_base", t[0], info)
    emit("forward_lora_r8_q_v_unmerged", t[1], info)
    emit("forward_lora_r8_q_v_merged", t[2], info)

    bert = get_peft_model(copy.deepcopy(base), config).eval()
    head = torch.nn.Linear(384, 2).to(device)
    params = [q for q in bert.parameters() if q.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)

    def step():
        h = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        loss = torch.nn.functional.cross_entropy(head(pooled), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    t = interleaved(3 if a.quick else 8, [step], device)
    emit("train_step_lora_r8_q_v", t[0],
         {"tokens": rows * length, "tokens_per_s": rows * length / statistics.median(t[0])})


def epoch(a, device: torch.device) -> None:
    """The main job's recipe (benches/src/epoch.rs): LoRA r 8 on query/value,
    a mean-pooling two-class head, AdamW lr 2e-3 (weight decay 0.01, the
    CLI's linear schedule with 10 % warm-up, clipping at 1.0), one epoch of
    3,000 shuffled sentences in batches of 32 padded to each batch's longest;
    then accuracy on the file's last 1,000 sentences in batches of 64."""
    import random

    from transformers import AutoTokenizer

    train_n, eval_n = (320, 100) if a.quick else (3000, 1000)
    rows = [json.loads(l) for l in open(a.data)]
    labels = sorted({r["label"] for r in rows})
    pairs = [(r["text"], labels.index(r["label"])) for r in rows]
    rng = random.Random(42)
    train = pairs[:]
    rng.shuffle(train)
    train = train[:train_n]
    held = pairs[-eval_n:]
    tok = AutoTokenizer.from_pretrained(a.model)
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])
    bert = get_peft_model(AutoModel.from_pretrained(a.model), config).to(device).eval()
    head = torch.nn.Linear(384, len(labels)).to(device)
    params = [q for q in bert.parameters() if q.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
    steps = (len(train) + 31) // 32
    warm = max(1, int(0.1 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))

    def logits(texts):
        b = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt").to(device)
        h = bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).float()
        return head((h * m).sum(1) / m.sum(1).clamp(min=1e-9))

    start = time.perf_counter()
    for i in range(0, len(train), 32):
        batch = train[i:i + 32]
        loss = torch.nn.functional.cross_entropy(
            logits([t for t, _ in batch]), torch.tensor([y for _, y in batch], device=device))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    sync(device)
    epoch_s = time.perf_counter() - start
    emit("train_epoch_lora_r8_q_v", [epoch_s], {"sentences": len(train), "batch": 32}, suite="epoch")
    start = time.perf_counter()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(held), 64):
            batch = held[i:i + 64]
            pred = logits([t for t, _ in batch]).argmax(-1).tolist()
            correct += sum(int(p == y) for p, (_, y) in zip(pred, batch))
    sync(device)
    eval_s = time.perf_counter() - start
    emit("eval_sentences", [eval_s],
         {"sentences": len(held), "sentences_per_s": len(held) / eval_s, "accuracy": correct / len(held)},
         suite="epoch")


if __name__ == "__main__":
    main()
