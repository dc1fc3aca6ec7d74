#!/usr/bin/env python3
"""PEFT's own PiSSA and OLoRA initialisations on the real all-MiniLM-L6-v2,
as the reference for `init_lora_weights: "pissa"` / `"olora"` and for the
conversion to a plain LoRA (`crates/peft-lora/tests/base_split_parity.rs`).

Reference environment (not needed in CI; the outputs are committed):
    python3 -m venv ref && ref/bin/pip install torch "peft==0.21.*" transformers
    ref/bin/python scripts/make_base_split_fixtures.py
(made with torch 2.15.0, peft 0.21.2, transformers 5.25.0, CPU)

For INIT in pissa, olora, with LoraConfig(r=8, lora_alpha=16 (scaling 2),
init_lora_weights=INIT, target_modules=MODULES) on layer 0's
attention.self.query [384, 384], intermediate.dense [1536, 384] and
output.dense [384, 1536], writes into fixtures/base_split/:

base_split.safetensors:
    <INIT>.<m>.lora_A / .lora_B     the factors PEFT's init gave (A [8, in], B [out, 8])
    <INIT>.<m>.residual_norm        [1] |W_res|_F of the base PEFT left
    embeddings.base                 [4, 384] mean-pooled last hidden states of the
                                    untouched model (not normalised)
    embeddings.<INIT>.init          the same right after the init
    embeddings.<INIT>.trained       after "training": every factor moved by a seeded
                                    Gaussian step (torch.manual_seed(1), 0.05 of the
                                    factor's mean |value|), the adapter saved below
    embeddings.<INIT>.raw_loaded    PeftModel.from_pretrained(fresh base, <INIT>_raw):
                                    PEFT splits the base again on load, then loads
    embeddings.<INIT>.converted     PeftModel.from_pretrained(fresh base, <INIT>_converted)
    input_ids / attention_mask      [4, T] as the tokenizer gave them
<INIT>_raw/        save_pretrained of the moved adapter (init_lora_weights: INIT)
<INIT>_converted/  save_pretrained(..., path_initial_model_for_weight_conversion=<tmp>/<INIT>_initial):
                   the plain rank-16 LoRA of the original weights
"""
import os
import subprocess
import sys
import tempfile

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModel, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "fixtures", "base_split")
MODULES = {
    "query": "encoder.layer.0.attention.self.query",
    "intermediate": "encoder.layer.0.intermediate.dense",
    "output": "encoder.layer.0.output.dense",
}
RANK, ALPHA = 8, 16
SENTENCES = [
    "The film is a charming, funny and moving portrait of a family.",
    "A dull, lifeless script that wastes its talented cast.",
    "Interest rates rose again this quarter.",
    "Call me Ishmael.",
]


def main():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model_dir = subprocess.run([sys.executable, os.path.join(HERE, "fetch_assets.py"), "minilm"],
                               check=True, capture_output=True, text=True).stdout.strip()
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    mask = enc["attention_mask"].unsqueeze(-1).float()

    def embed(model):
        model.eval()
        with torch.no_grad():
            h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        return ((h * mask).sum(1) / mask.sum(1)).contiguous()

    def fresh():
        return AutoModel.from_pretrained(model_dir).eval()

    tensors = {"embeddings.base": embed(fresh())}
    os.makedirs(OUT, exist_ok=True)
    scratch = tempfile.mkdtemp()
    for init in ("pissa", "olora"):
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(MODULES.values()),
                            init_lora_weights=init)
        model = get_peft_model(fresh(), config)
        for key, path in MODULES.items():
            layer = model.base_model.model.get_submodule(path)
            tensors[f"{init}.{key}.lora_A"] = layer.lora_A["default"].weight.detach().clone().contiguous()
            tensors[f"{init}.{key}.lora_B"] = layer.lora_B["default"].weight.detach().clone().contiguous()
            tensors[f"{init}.{key}.residual_norm"] = layer.base_layer.weight.detach().norm().reshape(1)
        tensors[f"embeddings.{init}.init"] = embed(model)
        # PEFT's recipe: the initial adapter is saved with init_lora_weights=True,
        # so that loading it does not split the base again.
        initial = os.path.join(scratch, f"{init}_initial")
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(initial)
        model.peft_config["default"].init_lora_weights = init
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.add_(torch.randn_like(p) * 0.05 * p.abs().mean())
        tensors[f"embeddings.{init}.trained"] = embed(model)
        model.save_pretrained(os.path.join(OUT, f"{init}_raw"))
        model.save_pretrained(os.path.join(OUT, f"{init}_converted"),
                              path_initial_model_for_weight_conversion=initial)
        loaded = PeftModel.from_pretrained(fresh(), os.path.join(OUT, f"{init}_raw"))
        tensors[f"embeddings.{init}.raw_loaded"] = embed(loaded)
        converted = PeftModel.from_pretrained(fresh(), os.path.join(OUT, f"{init}_converted"))
        tensors[f"embeddings.{init}.converted"] = embed(converted)
        for what in ("init", "trained", "raw_loaded", "converted"):
            gap = (tensors[f"embeddings.{init}.{what}"] - tensors["embeddings.base"]).abs().max()
            print(f"{init} {what}: max |emb - base| = {gap:.3e}")
    tensors["input_ids"] = enc["input_ids"].to(torch.int64).contiguous()
    tensors["attention_mask"] = enc["attention_mask"].to(torch.int64).contiguous()
    meta = {"torch": torch.__version__, "peft": peft.__version__, "transformers": transformers.__version__}
    save_file(tensors, os.path.join(OUT, "base_split.safetensors"), metadata=meta)
    print(meta)


if __name__ == "__main__":
    main()
