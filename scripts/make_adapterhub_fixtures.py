#!/usr/bin/env python3
"""Writes the AdapterHub (`adapters` 1.3) parity fixtures for bottleneck
adapters and their compositions under fixtures/<arch>/bn_<case>/.

AdapterHub pins transformers 4.57, so it needs its own environment (not
needed in CI; the fixtures are committed). Torch can come from the PEFT
reference environment:
    python3 -m venv ah && echo <ref>/lib/python3.11/site-packages > ah/lib/python3.11/site-packages/ref.pth
    ah/bin/pip install "transformers==4.57.6" "adapters==1.3.0"
    ah/bin/python scripts/make_adapterhub_fixtures.py

The base models are the tiny ones of make_fixtures.py, loaded from
fixtures/<arch>/. Each case trains its adapters (and fusion) a few Adam
steps so that every weight matters, saves them with
`save_adapter(..., use_safetensors=True)` into <case>/<adapter>/ (fusions
into <case>/fusion/), and writes expected.safetensors (input_ids, the
attention mask, logits of the base model and of every setup) and
expected.json (the setups, in the order of the logits, and parameter counts).
"""
import json
import os
import shutil

import adapters
import torch
from adapters import DoubleSeqBnConfig, ParBnConfig, SeqBnConfig
from adapters.composition import Average, BatchSplit, Fuse, Parallel, Stack
from safetensors.torch import save_file
from transformers import BertForSequenceClassification, GPT2LMHeadModel, LlamaForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
BATCH, SEQ = 3, 7
CLASSES = {"bert": BertForSequenceClassification, "gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM}


def load(arch):
    model = CLASSES[arch].from_pretrained(os.path.join(ROOT, arch), attn_implementation="eager")
    adapters.init(model)
    return model.eval()


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, SEQ - 2:] = 0  # right padding on one row
    return ids, mask


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float().contiguous()


def train(model, arch, steps=6, lr=0.02, seed=2):
    """A few Adam steps on random data: every trainable weight moves."""
    model.train()
    # Only adapter weights: AdapterHub leaves a plain HF head trainable, and
    # the Rust side loads the base model (head included) from fixtures/<arch>.
    params = [p for n, p in model.named_parameters() if p.requires_grad and "adapter" in n]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 64, (BATCH, SEQ), generator=g)
        if arch == "bert":
            out = model(input_ids=ids, labels=torch.randint(0, 3, (BATCH,), generator=g))
        else:
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def trainable(model):
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "adapter" in n)


def describe(setup):
    """A setup as JSON the Rust test rebuilds."""
    if isinstance(setup, str):
        return setup
    kind = type(setup).__name__
    out = {"type": kind, "children": [describe(c) for c in setup.children]}
    if isinstance(setup, BatchSplit):
        out["batch_sizes"] = setup.batch_sizes
    if isinstance(setup, Average):
        out["weights"] = setup.weights
    return out


# case -> (arch, {adapter: config}, setups evaluated, fuse?)
CASES = {
    "bn_seq": ("bert", {"a": SeqBnConfig(reduction_factor=4)}, ["a"], False),
    "bn_double": ("bert", {"a": DoubleSeqBnConfig(reduction_factor=4, scaling="learned")}, ["a"], False),
    "bn_par": ("bert", {"a": ParBnConfig(reduction_factor=4, scaling="channel")}, ["a"], False),
    "bn_leave_out": ("bert", {"a": SeqBnConfig(reduction_factor=8, leave_out=[0], non_linearity="gelu")},
                     ["a"], False),
    "bn_compose": ("bert", {"a": SeqBnConfig(reduction_factor=4), "b": SeqBnConfig(reduction_factor=8)},
                   ["a", "b", Stack("a", "b"), Parallel("a", "b"), BatchSplit("a", "b", batch_sizes=[1, 2]),
                    Average("a", "b", weights=[0.7, 0.3]), Fuse("a", "b")], True),
    "bn_double": ("bert", {"a": DoubleSeqBnConfig(reduction_factor=4, scaling="learned")}, ["a"], False),
    "bn_seq_gpt2": ("gpt2", {"a": SeqBnConfig(reduction_factor=4)}, ["a"], False),
    "bn_double_gpt2": ("gpt2", {"a": DoubleSeqBnConfig(reduction_factor=4), "b": ParBnConfig(reduction_factor=4)},
                       ["a", "b", Stack("a", "b")], False),
    "bn_double_llama": ("llama", {"a": DoubleSeqBnConfig(reduction_factor=4)}, ["a"], False),
    "bn_par_llama": ("llama", {"a": ParBnConfig(reduction_factor=4, init_weights="bert")}, ["a"], False),
}


def write_case(case, arch, configs, setups, fuse):
    out_dir = os.path.join(ROOT, arch, case)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    torch.manual_seed(5)
    model = load(arch)
    ids, mask = batch()
    tensors = {"input_ids": ids.float(), "attention_mask": mask.float(), "logits_base": logits(model, ids, mask)}
    meta = {"adapters": list(configs), "setups": [], "trainable_params": {}}
    for i, (name, config) in enumerate(configs.items()):
        model.add_adapter(name, config=config)
        model.train_adapter(name)
        meta["trainable_params"][name] = trainable(model)
        train(model, arch, seed=10 + i)
        model.save_adapter(os.path.join(out_dir, name), name, with_head=False, use_safetensors=True)
    if fuse:
        names = list(configs)
        model.add_adapter_fusion(Fuse(*names), "dynamic")
        model.train_adapter_fusion(Fuse(*names))
        meta["trainable_params"]["fusion"] = trainable(model)
        train(model, arch, seed=30)
        model.save_adapter_fusion(os.path.join(out_dir, "fusion"), ",".join(names), with_head=False,
                                  use_safetensors=True)
    meta["all_params"] = sum(p.numel() for p in model.parameters())
    for k, setup in enumerate(setups):
        model.set_active_adapters(setup)
        tensors[f"logits_{k}"] = logits(model, ids, mask)
        meta["setups"].append(describe(setup))
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "expected.safetensors"))
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump(meta, f, indent=1)
    moved = max((tensors[f"logits_{k}"][:BATCH] - tensors["logits_base"]).abs().max().item()
                for k in range(len(setups)))
    print(arch, case, meta["trainable_params"], "max|adapted-base|=%.3g" % moved)


def main():
    torch.set_num_threads(2)
    for case, (arch, configs, setups, fuse) in CASES.items():
        write_case(case, arch, configs, setups, fuse)


if __name__ == "__main__":
    main()
