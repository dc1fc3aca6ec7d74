#!/usr/bin/env python3
"""Writes the AdapterHub (`adapters` 1.3) prediction-head fixtures under
fixtures/bert/bn_heads/: bottleneck adapters saved with their heads
(`head_config.json` + `model_head.safetensors`), the logits of each head,
and the loss and gradients of one labelled batch.

Same environment as make_adapterhub_fixtures.py (AdapterHub pins
transformers 4.57; torch from the PEFT reference environment):
    python3 -m venv ah && echo <ref>/lib/python3.11/site-packages > ah/lib/python3.11/site-packages/ref.pth
    ah/bin/pip install "transformers==4.57.6" "adapters==1.3.0"
    ah/bin/python scripts/make_adapterhub_head_fixtures.py

Heads (one adapter each, named as its head, as AdapterHub pairs them):
- `cls`: classification, 3 labels with names, AdapterHub's defaults
  (2 layers, tanh, the first token);
- `multi`: multi-label classification, 4 labels, 3 layers, relu, BERT's
  pooled output (`use_pooler`), no bias on the last layer;
- `tag`: tagging, 5 labels, 1 layer (per token);
- `reg`: classification with 1 label (a regression: MSE), gelu.
Each adapter and its head train a few Adam steps first, so that every
weight matters. expected.safetensors holds `input_ids`, `attention_mask`
and per head `logits.<h>`, `labels.<h>`, `loss.<h>` and `grad.<h>.<key>`
for every trainable tensor, keyed as in the saved files.
"""
import json
import os
import shutil

import torch
from adapters import BertAdapterModel, ParBnConfig, SeqBnConfig
from adapters.heads import ClassificationHead, MultiLabelClassificationHead, TaggingHead
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
BATCH, SEQ = 3, 7

# name -> (adapter config, head class, kwargs); heads built by their
# constructors and added with `add_prediction_head`, as the `add_*_head`
# methods do (those cannot set `bias`).
HEADS = {
    "cls": (SeqBnConfig(reduction_factor=4), ClassificationHead,
            {"num_labels": 3, "id2label": {0: "neg", 1: "neu", 2: "pos"}}),
    "multi": (ParBnConfig(reduction_factor=4), MultiLabelClassificationHead,
              {"num_labels": 4, "layers": 3, "activation_function": "relu", "use_pooler": True,
               "bias": False}),
    "tag": (SeqBnConfig(reduction_factor=8), TaggingHead, {"num_labels": 5}),
    "reg": (SeqBnConfig(reduction_factor=4), ClassificationHead,
            {"num_labels": 1, "activation_function": "gelu"}),
}


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, SEQ - 2:] = 0  # right padding on one row
    ids[1, SEQ - 2:] = 0
    return ids, mask


def labels_for(name, g, rows=BATCH):
    if name == "cls":
        return torch.randint(0, 3, (rows,), generator=g)
    if name == "multi":
        return torch.randint(0, 2, (rows, 4), generator=g).float()
    if name == "tag":
        return torch.randint(0, 5, (rows, SEQ), generator=g)
    return torch.randn(rows, generator=g)


def main():
    torch.set_num_threads(2)
    out_dir = os.path.join(ROOT, "bert", "bn_heads")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    torch.manual_seed(5)
    model = BertAdapterModel.from_pretrained(os.path.join(ROOT, "bert"), attn_implementation="eager")
    ids, mask = batch()
    tensors = {"input_ids": ids.float(), "attention_mask": mask.float()}
    meta = {"heads": list(HEADS), "trainable_params": {}}
    for i, (name, (config, head_class, kwargs)) in enumerate(HEADS.items()):
        model.add_adapter(name, config=config)
        model.add_prediction_head(head_class(model, name, **kwargs))
        model.train_adapter(name)
        model.active_head = name
        # Every head stays trainable in AdapterHub: only this one's count.
        params = {n: p for n, p in model.named_parameters() if p.requires_grad and f".{name}." in n}
        meta["trainable_params"][name] = sum(p.numel() for p in params.values())
        # A few Adam steps on random labelled data (dropout is 0 in this config).
        opt = torch.optim.Adam(params.values(), lr=0.02)
        g = torch.Generator().manual_seed(10 + i)
        for _ in range(6):
            x = torch.randint(1, 64, (BATCH, SEQ), generator=g)
            out = model(input_ids=x, labels=labels_for(name, g))
            out.loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        model.save_adapter(os.path.join(out_dir, name), name, with_head=True, use_safetensors=True)
        g = torch.Generator().manual_seed(40 + i)
        labels = labels_for(name, g)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        tensors[f"logits.{name}"] = out.logits.detach().float()
        tensors[f"labels.{name}"] = labels.float()
        tensors[f"loss.{name}"] = out.loss.detach().reshape(1)
        for n, p in params.items():
            tensors[f"grad.{name}.{n}"] = p.grad.detach().clone()
        model.zero_grad()
        # Keep later heads from seeing this one's adapter.
        model.set_active_adapters(None)
    with torch.no_grad():
        model.set_active_adapters(None)
        tensors["hidden_base"] = model.bert(input_ids=ids, attention_mask=mask)[0]
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "expected.safetensors"))
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump(meta, f, indent=1)
    for name in HEADS:
        print(name, tuple(tensors[f"logits.{name}"].shape), "loss %.4f" % tensors[f"loss.{name}"].item(),
              "params", meta["trainable_params"][name])


if __name__ == "__main__":
    main()
