#!/usr/bin/env python3
"""Writes the Hugging Face PEFT parity fixtures of AdaLoRA under
fixtures/<arch>/adalora_run/ and fixtures/<arch>/adalora/ (tiny Llama,
GPT-2 with its fused Conv1D c_attn, and BERT of make_fixtures.py).

adalora_run/: a fresh adapter (PEFT's init, seed 0) as saved before
training, and expected.safetensors with the batches of a whole AdaLoRA run
(STEPS Adam steps, lr LR[arch], each followed by PEFT's
`update_and_allocate(step)`, the loss with PEFT's orthogonal
regularisation), the loss of each step, and every factor after the run
(`run.<key>`, full rank, pruned singular values at zero); expected.json
with the rank pattern after every step.

adalora/: the trained adapter as PEFT saves it (its rank pattern shrinks
each layer), `other/` a second run (seed 1), and expected.safetensors with
the logits PEFT computes after loading both: each alone, both active,
disabled, merged and unmerged again, and a mixed batch.

Reference environment as for make_fixtures.py (not needed in CI):
    ref/bin/python scripts/make_adalora_fixtures.py
"""
import json
import os
import shutil
import sys

import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import BATCH, CLASSIFIERS, ROOT, SEQ, base_model, inputs, logits  # noqa: E402

STEPS = 7
# Per architecture: BERT's classifier logits and GPT-2's move little at
# Llama's rate.
LR = {"llama": 0.05, "gpt2": 0.2, "bert": 0.3}
# init_r 4 -> target_r 2: one warm-up step, four of shrinking budget, the
# pattern final at step 5 (total_step - tfinal), masked again at step 6.
SCHEDULE = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, total_step=STEPS, lora_alpha=8,
                orth_reg_weight=0.5)
TARGETS = {
    "llama": ["q_proj", "v_proj", "up_proj"],
    # PEFT's default for gpt2: the fused c_attn (Conv1D, fan_in_fan_out).
    "gpt2": None,
    "bert": ["query", "value", "output.dense"],
}


def config(arch):
    return AdaLoraConfig(task_type=None, target_modules=TARGETS[arch], **SCHEDULE)


def batches(seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, 64, (BATCH, SEQ), generator=g)
        labels = torch.randint(0, 3, (BATCH,), generator=g)
        out.append((ids, labels))
    return out


def loss_of(peft_model, arch, ids, labels):
    # AdaLoraModel.forward adds the orthogonal regularisation to the loss
    # (PeftModel.forward without a task type would bypass it).
    if arch in CLASSIFIERS:
        return peft_model.base_model(input_ids=ids, labels=labels).loss
    return peft_model.base_model(input_ids=ids, labels=ids).loss


def factor_key(name):
    return name.replace(".default", "")


def run(arch, seed, tensors=None, patterns=None):
    """A fresh adapter (seed), trained STEPS steps as PEFT's docs train
    AdaLoRA. Returns the PEFT model."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(base_model(arch), config(arch))
    if tensors is not None:
        tensors["steps.count"] = torch.tensor([float(STEPS)])
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=LR[arch])
    peft_model.train()
    for step, (ids, labels) in enumerate(batches(seed + 10)):
        loss = loss_of(peft_model, arch, ids, labels)
        loss.backward()
        opt.step()
        peft_model.base_model.update_and_allocate(step)
        opt.zero_grad()
        if tensors is not None:
            tensors[f"steps.input_ids.{step}"] = ids.float()
            if arch in CLASSIFIERS:
                tensors[f"steps.labels.{step}"] = labels.float()
            tensors[f"steps.loss.{step}"] = loss.detach().reshape(1)
            pattern = peft_model.peft_config["default"].rank_pattern
            patterns.append({factor_key(k): v for k, v in pattern.items()} if pattern else None)
    peft_model.eval()
    if tensors is not None:
        for name, p in peft_model.named_parameters():
            if "lora_" in name and ".default" in name:
                tensors["run." + factor_key(name)] = p.detach().clone()
    return peft_model


def clean(d):
    for sub in ("", "other"):
        readme = os.path.join(d, sub, "README.md")
        if os.path.exists(readme):
            os.remove(readme)


def write_run(arch):
    out_dir = os.path.join(ROOT, arch, "adalora_run")
    shutil.rmtree(out_dir, ignore_errors=True)
    torch.manual_seed(0)
    fresh = get_peft_model(base_model(arch), config(arch))
    fresh.save_pretrained(out_dir)
    clean(out_dir)
    tensors, patterns = {}, []
    run(arch, 0, tensors, patterns)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "expected.safetensors"))
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump({"lr": LR[arch], "steps": STEPS, "rank_patterns": patterns}, f, indent=1)
    kept = [sum(v) for v in patterns[-1].values()]
    print(arch, "adalora_run", "final ranks", kept)


def write_trained(arch, ids):
    out_dir = os.path.join(ROOT, arch, "adalora")
    shutil.rmtree(out_dir, ignore_errors=True)
    base = logits(base_model(arch), ids)
    run(arch, 0).save_pretrained(out_dir)
    other_dir = os.path.join(out_dir, "other")
    run(arch, 1).save_pretrained(other_dir)
    clean(out_dir)
    model = PeftModel.from_pretrained(base_model(arch), out_dir, is_trainable=True)
    trainable, total = model.get_nb_trainable_parameters()
    # ranknum is a frozen one-element parameter per layer in PEFT, a
    # number here: left out of the total.
    ranknums = sum(p.numel() for n, p in model.named_parameters() if ".ranknum." in n)
    model.load_adapter(other_dir, "other")
    model.eval()
    t = {"input_ids": ids.float(), "logits_base": base}
    t["logits_unmerged"] = logits(model, ids)
    model.set_adapter("other")
    t["logits_other"] = logits(model, ids)
    model.base_model.set_adapter(["default", "other"])
    t["logits_both"] = logits(model, ids)
    model.set_adapter("default")
    with model.disable_adapter():
        t["logits_disabled"] = logits(model, ids)
    names = ["other", "__base__", "default"]
    per = {"other": t["logits_other"], "__base__": base, "default": t["logits_unmerged"]}
    t["logits_mixed"] = torch.stack([per[n][i] for i, n in enumerate(names)])
    model.merge_adapter()
    t["logits_merged"] = logits(model, ids)
    model.unmerge_adapter()
    t["logits_unmerged_again"] = logits(model, ids)
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(out_dir, "expected.safetensors"))
    meta = {"trainable_params": trainable, "all_params": total - ranknums, "adapters": ["default", "other"],
            "mixed_adapter_names": names}
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump(meta, f, indent=1)
    gap = (t["logits_other"] - t["logits_unmerged"]).abs().max().item()
    assert gap > 1e-4, f"{arch}: `other` is indistinguishable from `default` ({gap:.3g})"
    print(arch, "adalora", trainable, total - ranknums,
          "max|adapted-base|=%.3g" % (t["logits_unmerged"] - base).abs().max().item(),
          "max|other-default|=%.3g" % gap)


def main():
    torch.set_num_threads(2)
    for arch in TARGETS:
        write_run(arch)
        write_trained(arch, inputs(arch))


if __name__ == "__main__":
    main()
