#!/usr/bin/env python3
"""Checks that a sequence-classification adapter written by `peft train`
loads in Python as PEFT users load one, and gives our logits and
predictions:

    from peft import AutoPeftModelForSequenceClassification
    model = AutoPeftModelForSequenceClassification.from_pretrained("runs/rt-lora/best")

Reference environment as for make_fixtures.py (not needed in CI):
    ref/bin/python scripts/check_seqcls_python.py PEFT_BINARY RUN/best DATA.jsonl [N]

For the first N texts of DATA (default 16) it runs `peft forward` (one text
at a time, unpadded) and PEFT on the same token ids, compares the logits
(absolute difference within 1e-4; the logits are of order 1), and compares
the metric `peft eval` reports on those texts with the same metric of PEFT's
predictions: accuracy, or for the run's `problem_type` (its task.json,
passed to transformers as a PEFT user would) micro-F1 of the labels whose
logit is positive (multi-label) or the mean squared error (regression).
Exits non-zero on a mismatch.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from peft import AutoPeftModelForSequenceClassification
from safetensors.torch import load_file
from transformers import AutoTokenizer


def main():
    binary, best, data = sys.argv[1:4]
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 16
    config = json.load(open(os.path.join(best, "adapter_config.json")))
    base = config["base_model_name_or_path"]
    assert config["task_type"] == "SEQ_CLS", config["task_type"]
    rows = [json.loads(line) for line in open(data) if line.strip()][:n]
    # `peft train` names the classes in labels.json; without it they are
    # the data's labels in sorted order, as `peft eval` takes them.
    names = os.path.join(best, "labels.json")
    labels = json.load(open(names)) if os.path.exists(names) else sorted({str(r["label"]) for r in rows})
    task = os.path.join(best, "task.json")
    problem = json.load(open(task))["problem_type"] if os.path.exists(task) else "single_label_classification"
    model = AutoPeftModelForSequenceClassification.from_pretrained(
        best, num_labels=len(labels), problem_type=problem).eval()
    tok = AutoTokenizer.from_pretrained(base)
    tmp = tempfile.mkdtemp(prefix="peft-seqcls-check-")
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
    if problem == "regression":
        values = torch.tensor([r["label"] if isinstance(r["label"], list) else [r["label"]] for r in rows],
                              dtype=torch.float32)
        theirs_metric = torch.nn.functional.mse_loss(torch.stack(predictions), values).item()
    elif problem == "multi_label_classification":
        want = torch.tensor([[float(name in r["label"]) for name in labels] for r in rows])
        got = (torch.stack(predictions) > 0).float()
        tp, fp, fn = (got * want).sum(), (got * (1 - want)).sum(), ((1 - got) * want).sum()
        theirs_metric = 1.0 if 2 * tp + fp + fn == 0 else (2 * tp / (2 * tp + fp + fn)).item()
    else:
        theirs_metric = correct / len(rows)
    print(f"{len(rows)} texts ({problem}): max |logit difference| {worst:.2e}; "
          f"peft eval {ours_metric:.4f}, PEFT {theirs_metric:.4f}")
    assert worst < 1e-4, f"logits differ by {worst:.2e}"
    # `peft eval` prints four decimals.
    assert abs(ours_metric - theirs_metric) <= 5e-5 + 1e-6 * abs(theirs_metric), "predictions differ"


if __name__ == "__main__":
    main()
