#!/usr/bin/env python3
"""Reference numbers for SmolLM2-135M-Instruct loaded from its GGUF file by
transformers (which dequantizes and undoes llama.cpp's q/k permutation):
token ids of a fixed passage, its perplexity, and a greedy continuation.

    ref/bin/pip install gguf && ref/bin/python scripts/smollm2_reference.py
"""
import json
import os
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
PASSAGE = (
    "The history of the city begins with a small settlement on the banks of the river. "
    "Farmers grew wheat and barley in the fertile fields, and traders carried goods along the water "
    "to the markets in the south. Over the centuries the village became a town, and the town became "
    "a city with schools, churches and a busy harbour. Today it is known for its old bridges, its "
    "museums and the long walks along the river, which attract visitors from all over the world."
)
PROMPT = "The capital of France is"


def main():
    d = subprocess.run([sys.executable, os.path.join(HERE, "fetch_assets.py"), "smollm2"],
                       check=True, capture_output=True, text=True).stdout.strip()
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, torch_dtype=torch.float32).eval()
    ids = tok(PASSAGE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(ids, labels=ids)
    ppl = float(torch.exp(out.loss))
    p_ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        gen = model.generate(p_ids, max_new_tokens=12, do_sample=False)
    res = {
        "passage": PASSAGE,
        "passage_ids": ids[0].tolist(),
        "perplexity": ppl,
        "first_logits": out.logits[0, 0, :8].tolist(),
        "prompt": PROMPT,
        "prompt_ids": p_ids[0].tolist(),
        "greedy_ids": gen[0, p_ids.shape[1]:].tolist(),
        "greedy_text": tok.decode(gen[0, p_ids.shape[1]:]),
        "num_params": sum(p.numel() for p in model.parameters()),
    }
    with open(os.path.join(HERE, "..", "fixtures", "smollm2_reference.json"), "w") as f:
        json.dump(res, f)
    print(ppl, res["greedy_text"], res["num_params"], len(res["passage_ids"]))


if __name__ == "__main__":
    main()
