#!/usr/bin/env python3
"""Checks that a bottleneck adapter with its prediction head written by
`peft train --task seq-cls` loads in Python as AdapterHub users load one,
and gives our logits and predictions:

    from adapters import AutoAdapterModel
    model = AutoAdapterModel.from_pretrained(BASE)
    name = model.load_adapter("runs/rt-pfeiffer/best", use_safetensors=True)  # adapter + head
    model.set_active_adapters(name)

AdapterHub environment as for make_adapterhub_fixtures.py (not needed in CI):
    ah/bin/python scripts/check_adapterhub_python.py PEFT_BINARY BASE RUN/best DATA.jsonl [N]

For the first N texts of DATA (default 16) it runs `peft forward` (one text
at a time, unpadded) and AdapterHub on the same token ids, compares the
logits (absolute difference within 1e-4), and compares the metric `peft
eval` reports on those texts with AdapterHub's predictions' (its head's
label2id names the classes): accuracy, or micro-F1 of the labels whose
logit is positive for a multi-label run (its task.json). Exits non-zero on a mismatch.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from adapters import AutoAdapterModel
from safetensors.torch import load_file
from transformers import AutoTokenizer


def main():
    binary, base, best, data = sys.argv[1:5]
    n = int(sys.argv[5]) if len(sys.argv) > 5 else 16
    rows = [json.loads(line) for line in open(data) if line.strip()][:n]
    model = AutoAdapterModel.from_pretrained(base)
    name = model.load_adapter(best, use_safetensors=True)
    model.set_active_adapters(name)
    model.eval()
    head = json.load(open(os.path.join(best, "head_config.json")))["config"]
    labels = [k for k, _ in sorted(head["label2id"].items(), key=lambda kv: kv[1])]
    tok = AutoTokenizer.from_pretrained(base)
    tmp = tempfile.mkdtemp(prefix="peft-adapterhub-check-")
    task = os.path.join(best, "task.json")
    problem = json.load(open(task))["problem_type"] if os.path.exists(task) else "single_label_classification"
    worst, correct, predictions = 0.0, 0, []
    for i, row in enumerate(rows):
        ids = tok(row["text"])["input_ids"]
        ids_file, out_file = os.path.join(tmp, "ids.json"), os.path.join(tmp, f"out{i}.safetensors")
        json.dump([ids], open(ids_file, "w"))
        subprocess.run([binary, "forward", "--model", base, "--adapter", best, "--ids", ids_file,
                        "--out", out_file], check=True, stdout=subprocess.DEVNULL)
        ours = load_file(out_file)["output"]
        with torch.no_grad():
            theirs = model(input_ids=torch.tensor([ids])).logits
        assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
        assert torch.isfinite(ours).all() and torch.isfinite(theirs).all()
        worst = max(worst, (ours - theirs).abs().max().item())
        predictions.append(theirs[0])
        if problem == "single_label_classification":
            correct += int(labels[theirs.argmax(-1).item()] == str(row["label"]))
    subset = os.path.join(tmp, "subset.jsonl")
    with open(subset, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    out = subprocess.run([binary, "eval", "--model", base, "--adapter", best, "--data", subset],
                         check=True, capture_output=True, text=True).stdout
    print(out.strip())
    ours_metric = float(out.strip().split()[-1])
    if problem == "multi_label_classification":
        want = torch.tensor([[float(name in r["label"]) for name in labels] for r in rows])
        got = (torch.stack(predictions) > 0).float()
        tp, fp, fn = (got * want).sum(), (got * (1 - want)).sum(), ((1 - got) * want).sum()
        theirs_metric = 1.0 if 2 * tp + fp + fn == 0 else (2 * tp / (2 * tp + fp + fn)).item()
    else:
        theirs_metric = correct / len(rows)
    print(f"{len(rows)} texts ({problem}): max |logit difference| {worst:.2e}; "
          f"peft eval {ours_metric:.4f}, AdapterHub {theirs_metric:.4f}")
    assert worst < 1e-4, f"logits differ by {worst:.2e}"
    assert abs(ours_metric - theirs_metric) <= 5e-5, "predictions differ"


if __name__ == "__main__":
    main()
