#!/usr/bin/env python3
"""Records LoRA+ (PEFT's `create_loraplus_optimizer`) on the BERT DoRA
sequence-classification fixture: its `default` adapter (LoRA A/B, DoRA
magnitudes, and the adapter's copy of the classifier head) loaded as a user
loads it, two AdamW steps with PEFT's LoRA+ parameter groups (lora_B and
every vector at lr x ratio, biases there without weight decay), and every
trained tensor after them, under the adapter file's keys.

Reference environment as for make_fixtures.py (not needed in CI):
    ref/bin/python scripts/make_loraplus_fixture.py

Writes fixtures/bert/seqcls_dora/loraplus.safetensors (`input_ids.i`,
`labels.i`, `after.<key>`) and loraplus.json (the settings and each key's
group).
"""
import json
import os
import sys

import torch
from peft import PeftModel, get_peft_model_state_dict
from peft.optimizers import create_loraplus_optimizer
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import BATCH, ROOT, SEQ, base_model  # noqa: E402

LR, RATIO, WEIGHT_DECAY = 0.01, 4.0, 0.1


def main():
    torch.set_num_threads(2)
    case = os.path.join(ROOT, "bert", "seqcls_dora")
    model = PeftModel.from_pretrained(base_model("bert"), case, is_trainable=True)
    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
                                    loraplus_weight_decay=WEIGHT_DECAY, eps=1e-8)
    groups = {}
    for group in opt.param_groups:
        for p in group["params"]:
            groups[id(p)] = {"lr": group["lr"], "weight_decay": group["weight_decay"]}
    tensors = {}
    g = torch.Generator().manual_seed(11)
    model.train()
    for i in range(2):
        ids = torch.randint(0, 64, (BATCH, SEQ), generator=g)
        labels = torch.randint(0, 3, (BATCH,), generator=g)
        tensors[f"input_ids.{i}"] = ids.float()
        tensors[f"labels.{i}"] = labels.float()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    saved = get_peft_model_state_dict(model)
    # A trained parameter's name without the adapter name or the copy's
    # container: the adapter file's key (DoRA's magnitude is saved without
    # `.weight`).
    by_name = {n.replace(".default", "").replace(".modules_to_save", ""): p
               for n, p in model.named_parameters() if p.requires_grad}
    meta = {"lr": LR, "loraplus_lr_ratio": RATIO, "weight_decay": WEIGHT_DECAY, "eps": 1e-8, "groups": {}}
    for key, value in saved.items():
        tensors["after." + key] = value.detach().clone().contiguous()
        p = by_name.get(key, by_name.get(key + ".weight"))
        assert p is not None, key
        meta["groups"][key] = groups[id(p)]
    assert len(meta["groups"]) == len(by_name), "every trained parameter is saved"
    save_file(tensors, os.path.join(case, "loraplus.safetensors"))
    with open(os.path.join(case, "loraplus.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    print(json.dumps(meta["groups"], indent=1))


if __name__ == "__main__":
    main()
