#!/usr/bin/env python3
"""Adds PEFT's remaining `add_weighted_adapter` combinations to the LoRA
parity fixtures that have two adapters of one rank (`bert/lora`,
`gpt2/lora`, `llama/regex_layers`): `magnitude_prune`, `ties_svd`,
`magnitude_prune_svd`, and the four DARE combinations with the random masks
PyTorch drew recorded, so that a replay of those masks must give PEFT's
logits exactly.

Reference environment (not needed in CI; the fixtures are committed):
    python3 -m venv ref && ref/bin/pip install torch "peft==0.21.*" transformers safetensors
    ref/bin/python scripts/make_weighted_fixtures.py

Reads the committed base model and the two committed adapters (`default`
and `other/`) of each case; checks that it reproduces the committed
`logits_unmerged` and `logits_weighted_linear` first. Writes, per case:
    weighted.safetensors   logits_<combination> [batch, seq, vocab or labels],
                           mask.<combination>.<i> (DARE's keep masks, 0/1,
                           in the order torch.bernoulli drew them, transposed
                           to Burn's layout: A [in, r], B [r, out], ΔW [in, out])
    weighted.json          adapters, weights, density, combinations, mask counts
"""
import json
import os

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from make_fixtures import ROOT, base_model, inputs, logits

CASES = [("bert", "lora"), ("gpt2", "lora"), ("llama", "regex_layers")]
ADAPTERS = ["default", "other"]
WEIGHTS = [0.7, 0.4]
DENSITY = 0.5
COMBINATIONS = ["magnitude_prune", "ties_svd", "magnitude_prune_svd",
                "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"]


def close(what, got, want):
    diff = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert got.shape == want.shape and diff <= 1e-5 * scale + 1e-6, f"{what}: {diff} (scale {scale})"


def write_case(arch, case):
    case_dir = os.path.join(ROOT, arch, case)
    model = base_model(arch)
    committed = load_file(os.path.join(ROOT, arch, "model.safetensors"))
    for name, p in model.state_dict().items():
        if name in committed:
            assert torch.equal(p, committed[name]), f"{arch} base differs from the committed one: {name}"
    ids = inputs(arch)
    expected = load_file(os.path.join(case_dir, "expected.safetensors"))
    assert torch.equal(ids.float(), expected["input_ids"]), "input ids differ from the committed ones"
    pm = PeftModel.from_pretrained(model, case_dir, adapter_name="default")
    pm.load_adapter(os.path.join(case_dir, "other"), adapter_name="other")
    pm.set_adapter("default")
    close("unmerged", logits(pm, ids), expected["logits_unmerged"])
    fan_in_fan_out = pm.peft_config["default"].fan_in_fan_out

    tensors, masks_per = {}, {}
    for combo in ["linear"] + COMBINATIONS:
        drawn = []
        draw = torch.bernoulli

        def recording(*args, **kwargs):
            mask = draw(*args, **kwargs)
            drawn.append(mask.detach().clone())
            return mask

        torch.bernoulli = recording
        try:
            density = {} if combo == "linear" else {"density": DENSITY}
            pm.add_weighted_adapter(ADAPTERS, WEIGHTS, "w", combination_type=combo, **density)
        finally:
            torch.bernoulli = draw
        pm.set_adapter("w")
        out = logits(pm, ids)
        pm.set_adapter("default")
        pm.delete_adapter("w")
        if combo == "linear":
            close("weighted linear", out, expected["logits_weighted_linear"])
            continue
        tensors[f"logits_{combo}"] = out
        # PEFT's factors are [r, in] and [out, r], its ΔW [out, in] — but
        # [in, out] already where fan_in_fan_out (GPT-2's Conv1D).
        keep_layout = combo.endswith("_svd") and fan_in_fan_out
        for i, m in enumerate(drawn):
            assert m.dim() == 2 and set(m.unique().tolist()) <= {0.0, 1.0}
            tensors[f"mask.{combo}.{i:03}"] = (m if keep_layout else m.T).contiguous().float()
        masks_per[combo] = len(drawn)
        assert combo.startswith("dare") == (len(drawn) > 0), combo
        moved = (out - expected["logits_unmerged"]).abs().max().item()
        print(arch, case, combo, f"masks {len(drawn)}", f"max|logits - default's| {moved:.3g}")
    save_file(tensors, os.path.join(case_dir, "weighted.safetensors"))
    meta = {"adapters": ADAPTERS, "weights": WEIGHTS, "density": DENSITY,
            "combinations": COMBINATIONS, "masks": masks_per}
    with open(os.path.join(case_dir, "weighted.json"), "w") as f:
        json.dump(meta, f, indent=1)


def main():
    torch.set_num_threads(2)
    for arch, case in CASES:
        write_case(arch, case)


if __name__ == "__main__":
    main()
