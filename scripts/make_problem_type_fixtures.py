#!/usr/bin/env python3
"""Writes the `problem_type` parity fixture: what transformers'
`BertForSequenceClassification` computes for a regression and a multi-label
problem, through PEFT's SEQ_CLS LoRA of fixtures/bert/seqcls_lora/.

transformers picks the loss by `config.problem_type`: mean squared error for
`regression` (over every output; with one label, `logits.squeeze()`), the mean
binary cross-entropy of the logits for `multi_label_classification`. The
fixture holds, per problem type, the targets, the loss and the gradients of
the adapter's trainable tensors (its LoRA factors and its copy of the
`classifier` head), so that the loss's value and its backward pass are both
checked. Output: fixtures/bert/seqcls_lora/problem_types.safetensors.

Reference environment as for make_fixtures.py (not needed in CI):
    ref/bin/python scripts/make_problem_type_fixtures.py
"""
import os
import sys

import torch
from peft import PeftModel
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import ROOT, base_model, inputs  # noqa: E402


def main():
    torch.set_num_threads(2)
    adapter = os.path.join(ROOT, "bert", "seqcls_lora")
    ids = inputs("bert")
    g = torch.Generator().manual_seed(11)
    targets = {
        # Three outputs per row, real-valued: a multi-output regression.
        "regression": torch.randn(3, 3, generator=g) * 2.0,
        # Any subset of the three labels per row (row 1: none of them).
        "multi_label_classification": torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0]]),
    }
    tensors = {"input_ids": ids.float()}
    for problem, y in targets.items():
        model = base_model("bert")
        model.config.problem_type = problem
        peft_model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
        # Training mode, as in a training step: the tiny model's dropouts
        # and the adapter's are all 0, so the gradients are deterministic.
        peft_model.train()
        out = peft_model(input_ids=ids, labels=y)
        out.loss.backward()
        tensors[f"{problem}.targets"] = y
        tensors[f"{problem}.logits"] = out.logits.detach().contiguous()
        tensors[f"{problem}.loss"] = out.loss.detach().reshape(1)
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                key = name.replace(".default", "").replace(".modules_to_save.", ".")
                tensors[f"{problem}.grad.{key}"] = p.grad.detach().clone().contiguous()
        print(problem, "loss %.6f" % out.loss.item())
    save_file(tensors, os.path.join(adapter, "problem_types.safetensors"))


if __name__ == "__main__":
    main()
