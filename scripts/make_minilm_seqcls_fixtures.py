#!/usr/bin/env python3
"""Writes PEFT-trained sequence-classification adapters for the real
all-MiniLM-L6-v2 under fixtures/minilm_seqcls/<method>/: what a PEFT user
trains and hands over, which `peft forward` and `peft eval` must read.

Reference environment as for make_fixtures.py (not needed in CI), with the
assets fetched (`python3 scripts/fetch_assets.py minilm rotten-tomatoes`):
    ref/bin/python scripts/make_minilm_seqcls_fixtures.py

Each method (LoRA r 4 on query/value; (IA)³ with PEFT's BERT defaults)
trains 30 Adam steps (lr 2e-3, batches of 8) on Rotten Tomatoes sentences,
from `AutoModelForSequenceClassification` over MiniLM with 2 labels
(0 negative, 1 positive; the random head drawn with seed 0, the adapter's
copy of it trained). Beside PEFT's two files: expected.safetensors with
`input_ids` (4 sentences cut to 12 tokens, [SEP] last) and PEFT's logits
for them; held.jsonl, 48 other sentences; expected.json with PEFT's
accuracy on them.
"""
import json
import os
import random
import shutil

import torch
from peft import IA3Config, LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

ASSETS = os.environ.get("PEFT_ASSETS", os.path.expanduser("~/.cache/peft-rs/assets"))
MINILM = os.path.join(ASSETS, "minilm")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "minilm_seqcls")
CASES = {
    "lora": lambda: LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"]),
    "ia3": lambda: IA3Config(task_type="SEQ_CLS"),
}
LABELS = {"negative": 0, "positive": 1}


def sentences():
    rows = [json.loads(l) for l in open(os.path.join(ASSETS, "rotten-tomatoes", "rotten_tomatoes.jsonl"))
            if l.strip()]
    random.Random(0).shuffle(rows)
    return rows[:240], rows[240:244], rows[244:292]


def cut(tok, text, n=12):
    ids = tok(text)["input_ids"]
    return ids[: n - 1] + [ids[-1]] if len(ids) >= n else None


def write_case(name, make_config, tok):
    train, probe, held = sentences()
    out_dir = os.path.join(ROOT, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=2)
    model = get_peft_model(model, make_config())
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for i in range(0, 240, 8):
        batch = train[i:i + 8]
        enc = tok([r["text"] for r in batch], padding=True, return_tensors="pt")
        labels = torch.tensor([LABELS[r["label"]] for r in batch])
        model(**enc, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    # As a PEFT user's folder names it (the asset path here otherwise).
    model.peft_config["default"].base_model_name_or_path = "sentence-transformers/all-MiniLM-L6-v2"
    model.save_pretrained(out_dir)
    os.remove(os.path.join(out_dir, "README.md"))
    ids = []
    for r in probe + train:
        c = cut(tok, r["text"])
        if c:
            ids.append(c)
        if len(ids) == 4:
            break
    ids = torch.tensor(ids)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        correct = 0
        for r in held:
            pred = model(**tok(r["text"], return_tensors="pt")).logits.argmax(-1).item()
            correct += int(pred == LABELS[r["label"]])
    save_file({"input_ids": ids.float(), "logits": logits.contiguous()},
              os.path.join(out_dir, "expected.safetensors"))
    with open(os.path.join(out_dir, "held.jsonl"), "w") as f:
        f.writelines(json.dumps({"text": r["text"], "label": str(LABELS[r["label"]])}) + "\n" for r in held)
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump({"held_accuracy": correct / len(held), "held": len(held)}, f, indent=1)
    print(name, "held-out accuracy %.4f" % (correct / len(held)), "logits", logits.tolist())


def main():
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(MINILM)
    for name, make in CASES.items():
        write_case(name, make, tok)


if __name__ == "__main__":
    main()
