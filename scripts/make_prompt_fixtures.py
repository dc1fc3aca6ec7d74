#!/usr/bin/env python3
"""Writes the Hugging Face PEFT parity fixtures for prompt learning (prefix
tuning, prompt tuning, P-tuning) under fixtures/<arch>/<case>/.

Reference environment as for make_fixtures.py (not needed in CI):
    ref/bin/python scripts/make_prompt_fixtures.py

Base models are the tiny Llama and GPT-2 of make_fixtures.py. Each case:
    adapter_config.json, adapter_model.safetensors   PEFT's save_pretrained (prompt_embeddings)
    encoder.safetensors                              the full trained prompt encoder (embedding,
                                                     projection / MLP / LSTM), as PEFT names it
    expected.safetensors                             input_ids, attention_mask (f32), logits,
                                                     train_loss and grad.<encoder param>,
                                                     generated (greedy ids after row 0) and
                                                     generated_logits (each step's last logits)
    expected.json                                    parameter counts
"""
import json
import os
import shutil
import sys

import torch
from peft import (PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model)
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import BATCH, ROOT, SEQ, base_model, inputs  # noqa: E402

NEW_TOKENS = 5

CASES = {
    "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "prefix_proj": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                              prefix_projection=True, encoder_hidden_size=12),
    "prompt_random": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "prompt_vocab": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                               prompt_tuning_init="SAMPLE_VOCAB"),
    "ptuning_mlp": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                               encoder_hidden_size=12,
                                               encoder_reparameterization_type="MLP"),
    "ptuning_lstm": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                encoder_hidden_size=6, encoder_num_layers=2,
                                                encoder_dropout=0.0,
                                                encoder_reparameterization_type="LSTM"),
}


def attention_mask():
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, SEQ - 2:] = 0  # right padding on one row
    return mask


def train_a_few_steps(model, steps=60):
    """Teaches the virtual tokens a pattern (each token = previous + 3) so
    that greedy generation with them differs from the base model's."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.05)
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        start = torch.randint(0, 64, (BATCH, 1), generator=g)
        ids = (start + 3 * torch.arange(SEQ + 2)) % 64
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def greedy(model, ids):
    """Greedy continuation by re-running the PEFT forward on the whole
    sequence each step: the definition of generation. (PEFT 0.21's
    `generate` drops the prefix under transformers 5, which passes its own
    `cache` and ignores PEFT's `past_key_values`.)"""
    seq, steps = ids.clone(), []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            last = model(input_ids=seq).logits[:, -1]
            steps.append(last[0])
            seq = torch.cat([seq, last.argmax(-1, keepdim=True)], 1)
    return seq[0, ids.shape[1]:].tolist(), torch.stack(steps).float().contiguous()


def write_case(arch, case, make_config, ids):
    out_dir = os.path.join(ROOT, arch, case)
    shutil.rmtree(out_dir, ignore_errors=True)
    model = base_model(arch)
    torch.manual_seed(3)
    peft_model = get_peft_model(model, make_config())
    encoder = peft_model.prompt_encoder["default"]
    meta = {}
    if case == "prompt_vocab":
        # The ids SAMPLE_VOCAB drew: every initial row is a row of the word embeddings.
        table = peft_model.word_embeddings.weight
        init = encoder.embedding.weight.detach()
        meta["init_ids"] = [int((table - row).abs().sum(1).argmin()) for row in init]
        assert torch.equal(table[meta["init_ids"]], init)
    train_a_few_steps(peft_model)
    trainable, total = peft_model.get_nb_trainable_parameters()
    meta.update({"trainable_params": trainable, "all_params": total})
    mask = attention_mask()
    with torch.no_grad():
        out = peft_model(input_ids=ids, attention_mask=mask).logits.float().contiguous()
    # Training-mode loss and encoder gradients (dropouts are 0).
    peft_model.train()
    peft_model.zero_grad()
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    tensors = {"input_ids": ids.float(), "attention_mask": mask.float(), "logits": out,
               "train_loss": loss.detach().reshape(1)}
    for name, p in encoder.named_parameters():
        tensors["grad." + name] = p.grad.detach().clone()
    peft_model.zero_grad()
    peft_model.eval()
    gen, gen_logits = greedy(peft_model, ids[:1])
    with peft_model.disable_adapter():
        base_gen, base_logits = greedy(peft_model, ids[:1])
    # Tiny random models barely listen to their input, so the ids may agree
    # with the base model's; the step logits must not.
    assert (gen_logits - base_logits).abs().max() > 1e-2, "the tuned prompt must change generation"
    tensors["generated"] = torch.tensor(gen).float()
    tensors["generated_logits"] = gen_logits
    peft_model.save_pretrained(out_dir)
    save_file({k: v.detach().contiguous() for k, v in encoder.state_dict().items()},
              os.path.join(out_dir, "encoder.safetensors"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "expected.safetensors"))
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(arch, case, trainable, total, "logits", tuple(out.shape), "generated", gen, "base", base_gen)


def main():
    torch.set_num_threads(2)
    for arch in ["llama", "gpt2"]:
        ids = inputs(arch)
        for case, make_config in CASES.items():
            write_case(arch, case, make_config, ids)


if __name__ == "__main__":
    main()
