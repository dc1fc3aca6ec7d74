#!/usr/bin/env python3
"""Reference sentence embeddings of all-MiniLM-L6-v2 (mean pooling, L2-normalised),
computed with transformers from the same files the Rust tests load.

    ref/bin/python scripts/minilm_reference.py   # writes fixtures/minilm_reference.json
"""
import json
import os
import subprocess
import sys

import torch
from transformers import AutoModel, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
SENTENCES = [
    "Hello world",
    "The gorgeously elaborate continuation of The Lord of the Rings trilogy is so huge.",
    "Effective but too tepid biopic",
    "A rust-based toolkit fine-tunes transformers efficiently!",
]


def main():
    model_dir = subprocess.run([sys.executable, os.path.join(HERE, "fetch_assets.py"), "minilm"],
                               check=True, capture_output=True, text=True).stdout.strip()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    emb = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    emb = torch.nn.functional.normalize(emb, dim=1)
    out = {
        "sentences": SENTENCES,
        "input_ids": [tok(s)["input_ids"] for s in SENTENCES],
        "embeddings": emb.tolist(),
    }
    with open(os.path.join(HERE, "..", "fixtures", "minilm_reference.json"), "w") as f:
        json.dump(out, f)
    print(out["input_ids"][0], emb[0, :4].tolist())


if __name__ == "__main__":
    main()
