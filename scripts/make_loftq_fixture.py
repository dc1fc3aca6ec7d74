#!/usr/bin/env python3
"""PEFT's own LoftQ on the real all-MiniLM-L6-v2 weights, as the reference
for `init_lora_weights: "loftq"` (`crates/peft-lora/tests/loftq_parity.rs`).

PEFT 0.21's `loftq_init` quantizes with bitsandbytes' NF4
(`Params4bit(compress_statistics=False)`) and takes a float32
`torch.linalg.svd` of the residual. It moves the weight to "cuda" (or "xpu")
unconditionally; on a machine without either, this script runs PEFT's own
function with that one string replaced by "cpu" (checked to occur exactly
once) and changes nothing else.

Reference environment (not needed in CI; the outputs are committed):
    python3 -m venv ref && ref/bin/pip install torch "peft==0.21.*" transformers bitsandbytes
    ref/bin/python scripts/make_loftq_fixture.py
(made with torch 2.15.0, peft 0.21.2, transformers 5.25.0, bitsandbytes 0.50.2, CPU)

Writes fixtures/loftq/loftq.safetensors, for each of layer 0's
attention.self.query [384, 384], intermediate.dense [1536, 384] and
output.dense [384, 1536] (key <m>) and loftq_iter <k> in 1, 2:
    <m>.iter<k>.codes      the 4-bit codes, row-major, two per byte, weight 2i
                           in the high nibble (bitsandbytes' packing, u8)
    <m>.iter<k>.absmax     bitsandbytes' exact per-64 block absmax (f32)
    <m>.iter<k>.lora_A     [8, in] (PEFT's lora_A = R = sqrt(S) Vh)
    <m>.iter<k>.lora_B     [out, 8] (PEFT's lora_B = L = U sqrt(S))
    <m>.iter<k>.error      [1]: |W - deq(Q) - B A|_F, and
    <m>.nf4_error          [1]: |W - deq(NF4(W))|_F
and, for the whole model wrapped by `get_peft_model(LoraConfig(r=8,
lora_alpha=8, init_lora_weights="loftq", loftq_config=LoftQConfig(4, k),
target_modules=<those three>))`, the mean-pooled (not normalised) last
hidden states of SENTENCES:
    embeddings.f32 [4, 384], embeddings.iter<k> [4, 384] (the LoftQ model),
    embeddings.iter<k>.nf4_only [4, 384] (the same with the adapter disabled)
plus input_ids / attention_mask [4, T] as the tokenizer gave them.
"""
import inspect
import os
import subprocess
import sys

import bitsandbytes
import peft
import peft.tuners.lora.layer as lora_layer
import peft.utils.loftq_utils as loftq_utils
import torch
import transformers
from peft import LoftQConfig, LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModel, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "fixtures", "loftq")
MODULES = {
    "query": "encoder.layer.0.attention.self.query",
    "intermediate": "encoder.layer.0.intermediate.dense",
    "output": "encoder.layer.0.output.dense",
}
RANK = 8
SENTENCES = [
    "The film is a charming, funny and moving portrait of a family.",
    "A dull, lifeless script that wastes its talented cast.",
    "Interest rates rose again this quarter.",
    "Call me Ishmael.",
]


def loftq_init_on_cpu():
    """PEFT's `loftq_init` with its compute device "cpu" instead of "cuda"."""
    source = inspect.getsource(loftq_utils.loftq_init)
    device_line = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    assert source.count(device_line) == 1, "PEFT's loftq_init changed; check the patch"
    source = source.replace(device_line, 'compute_device = "cpu"')
    namespace = dict(vars(loftq_utils))
    exec(compile(source, loftq_utils.__file__, "exec"), namespace)
    return namespace["loftq_init"]


def codes_of(dequantized, absmax):
    """The 4-bit code of each dequantized value: its level index, read back
    exactly (level * absmax is exact to recover since levels are distinct)."""
    flat = dequantized.reshape(-1)
    blocks = absmax.repeat_interleave(64)[: flat.numel()]
    levels = bitsandbytes.functional.get_4bit_type("nf4", device="cpu")
    candidates = levels.reshape(1, -1) * blocks.reshape(-1, 1)
    idx = (candidates - flat.reshape(-1, 1)).abs().argmin(dim=1)
    assert torch.equal(candidates[torch.arange(flat.numel()), idx], flat), "codes read back exactly"
    return idx.to(torch.uint8)


def main():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model_dir = subprocess.run([sys.executable, os.path.join(HERE, "fetch_assets.py"), "minilm"],
                               check=True, capture_output=True, text=True).stdout.strip()
    loftq_init = loftq_init_on_cpu()
    loftq_utils.loftq_init = loftq_init
    lora_layer.loftq_init = loftq_init

    base = AutoModel.from_pretrained(model_dir).eval()
    tensors = {}
    for key, path in MODULES.items():
        w = base.get_submodule(path).weight.detach().clone()
        q = bitsandbytes.nn.Params4bit(w, requires_grad=False, compress_statistics=False,
                                       quant_type="nf4").to("cpu")
        plain = bitsandbytes.functional.dequantize_4bit(q.data, q.quant_state)
        tensors[f"{key}.nf4_error"] = (w - plain).norm().reshape(1)
        for k in (1, 2):
            dequantized, lora_A, lora_B = loftq_init(w, num_bits=4, reduced_rank=RANK, num_iter=k)
            # The absmax the last iteration quantized with: bitsandbytes
            # again on what that iteration quantized (W - L R, or W).
            if k == 1:
                to_quantize = w
            else:
                _, a1, b1 = loftq_init(w, num_bits=4, reduced_rank=RANK, num_iter=k - 1)
                to_quantize = w - b1 @ a1
            qk = bitsandbytes.nn.Params4bit(to_quantize.clone(), requires_grad=False,
                                            compress_statistics=False, quant_type="nf4").to("cpu")
            again = bitsandbytes.functional.dequantize_4bit(qk.data, qk.quant_state)
            assert torch.equal(again, dequantized), f"{key} iter {k}: the base is reproduced"
            absmax = qk.quant_state.absmax.float()
            packed = qk.data.reshape(-1)
            unpacked = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[: w.numel()]
            assert torch.equal(unpacked, codes_of(dequantized, absmax)), f"{key}: the packing"
            tensors[f"{key}.iter{k}.codes"] = packed.contiguous()
            tensors[f"{key}.iter{k}.absmax"] = absmax.contiguous()
            tensors[f"{key}.iter{k}.lora_A"] = lora_A.contiguous()
            tensors[f"{key}.iter{k}.lora_B"] = lora_B.contiguous()
            err = (w - dequantized - lora_B @ lora_A).norm()
            tensors[f"{key}.iter{k}.error"] = err.reshape(1)
            print(f"{key} {tuple(w.shape)} iter {k}: |W - deq - BA| = {err:.5f} "
                  f"(NF4 alone {tensors[f'{key}.nf4_error'].item():.5f})")

    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    mask = enc["attention_mask"].unsqueeze(-1).float()

    def embed(model):
        with torch.no_grad():
            h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        return ((h * mask).sum(1) / mask.sum(1)).contiguous()

    tensors["embeddings.f32"] = embed(base)
    for k in (1, 2):
        model = AutoModel.from_pretrained(model_dir).eval()
        config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=list(MODULES.values()),
                            init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=k))
        model = get_peft_model(model, config).eval()
        for key, path in MODULES.items():
            layer = model.base_model.model.get_submodule(path)
            assert torch.equal(layer.lora_A["default"].weight, tensors[f"{key}.iter{k}.lora_A"]), key
        tensors[f"embeddings.iter{k}"] = embed(model)
        with model.disable_adapter():
            tensors[f"embeddings.iter{k}.nf4_only"] = embed(model)
    tensors["input_ids"] = enc["input_ids"].to(torch.int64).contiguous()
    tensors["attention_mask"] = enc["attention_mask"].to(torch.int64).contiguous()

    os.makedirs(OUT, exist_ok=True)
    meta = {"torch": torch.__version__, "peft": peft.__version__, "transformers": transformers.__version__,
            "bitsandbytes": bitsandbytes.__version__}
    save_file(tensors, os.path.join(OUT, "loftq.safetensors"), metadata=meta)
    print(meta)


if __name__ == "__main__":
    main()
