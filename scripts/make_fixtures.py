#!/usr/bin/env python3
"""Writes the Hugging Face PEFT parity fixtures under fixtures/.

Reference environment (not needed in CI; the fixtures are committed):
    python3 -m venv ref && ref/bin/pip install torch "peft==0.21.*" transformers safetensors
    ref/bin/python scripts/make_fixtures.py

For each tiny random-init model (fixed seeds) it writes
    fixtures/<arch>/model.safetensors, config.json      base weights (HF format)
    fixtures/<arch>/<case>/adapter_config.json, adapter_model.safetensors
                                                        an adapter trained a few steps (B != 0)
    fixtures/<arch>/<case>/expected.safetensors          input_ids (as f32) and logits
    fixtures/<arch>/<case>/expected.json                 parameter counts, adapter names, ...
"""
import json
import os
import shutil
import sys

import torch
from peft import LoraConfig, get_peft_model, PeftModel
from safetensors.torch import save_file
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification,
                          GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
SEQ = 7
BATCH = 3
# Architectures whose fixtures classify (3 labels) rather than predict tokens.
CLASSIFIERS = ("bert", "llama_seqcls", "gpt2_seqcls")


def base_model(arch):
    torch.manual_seed(0)
    if arch in ("llama", "llama_seqcls", "llama_tied"):
        # llama_tied: the output head is the embedding matrix (as in
        # SmolLM2), for adapters that copy or retrain rows of it.
        cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          rms_norm_eps=1e-6, tie_word_embeddings=arch == "llama_tied")
        if arch in ("llama", "llama_tied"):
            model = LlamaForCausalLM(cfg)
        else:
            # LlamaForSequenceClassification: `score` on each row's last
            # token that is not padding (id 0).
            cfg.num_labels, cfg.pad_token_id = 3, 0
            model = LlamaForSequenceClassification(cfg)
    elif arch in ("gpt2", "gpt2_seqcls"):
        cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=4,
                         attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
        if arch == "gpt2":
            model = GPT2LMHeadModel(cfg)
        else:
            # GPT2ForSequenceClassification: `score` on each row's last
            # token that is not padding (id 0).
            cfg.num_labels, cfg.pad_token_id = 3, 0
            model = GPT2ForSequenceClassification(cfg)
    elif arch == "bert":
        cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=40, max_position_embeddings=32, num_labels=3,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = BertForSequenceClassification(cfg)
    else:
        raise ValueError(arch)
    # Model dropouts are 0 so that training-mode gradients are deterministic.
    # Random-init LayerNorms and biases are ones/zeros; perturb them so the
    # fixtures exercise every parameter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.config._attn_implementation = "eager"
    return model.eval()


def inputs(arch):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (BATCH, SEQ), generator=g)
    if arch in ("llama_seqcls", "gpt2_seqcls"):
        # Row 1 right-padded: it is classified at position SEQ - 3.
        ids[:, -1] = ids[:, -1].clamp(min=1)
        ids[1, -2:] = 0
        ids[1, -3] = ids[1, -3].clamp(min=1)
    return ids


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits.float().contiguous()


def train_a_few_steps(model, arch, adapter, steps=5, lr=None, seed=2):
    """Makes B != 0 (and DoRA magnitudes move) so parity means something."""
    lr = lr if lr is not None else (0.3 if arch == "bert" else 0.05)
    model.train()
    model.set_adapter(adapter)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 64, (BATCH, SEQ), generator=g)
        if arch in CLASSIFIERS:
            out = model(input_ids=ids, labels=torch.randint(0, 3, (BATCH,), generator=g))
        else:
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


LABELS = torch.tensor([2, 0, 1])


def training_gradients(peft_model, arch, ids):
    """Loss and adapter gradients of one training forward/backward (no dropout)."""
    peft_model.train()
    peft_model.zero_grad()
    if arch in CLASSIFIERS:
        out = peft_model(input_ids=ids, labels=LABELS)
    else:
        out = peft_model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {"train_loss": out.loss.detach().reshape(1)}
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            key = name.replace(".default", "")
            grads["grad." + key] = p.grad.detach().clone()
    peft_model.zero_grad()
    peft_model.eval()
    return grads


CASES = {
    "llama": {
        "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 4}, lora_dropout=0.1),
        "dora_rslora": dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, use_rslora=True),
        "regex_layers": dict(r=2, lora_alpha=6, target_modules=r".*\.1\.self_attn\.(k|o)_proj"),
    },
    "gpt2": {
        "lora": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                     layers_to_transform=[1], layers_pattern="h"),
        "dora": dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True),
    },
    "bert": {
        "lora": dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"],
                     exclude_modules=["pooler.dense"]),
        # query + value: on query + key the tiny BERT's logits moved by at
        # most 5.5e-5 (the attention pattern barely matters at this size),
        # too close to the 1e-5 tolerance; with value they move by 6.9e-3.
        "dora": dict(r=4, lora_alpha=16, target_modules=["query", "value"], use_dora=True),
    },
}


# Learning rates other than the architecture's default. BERT LoRA at 0.3
# saturated the tiny classifier: its stored gradients fell to ~1e-12 (some
# tensors), below f32 noise, so no relative comparison could check them; at
# 0.02 the smallest is ~3e-7 and the logits still move by ~0.02.
TRAIN_LR = {("bert", "lora"): 0.02}


def write_case(arch, case, kwargs, model_dir, ids):
    out_dir = os.path.join(model_dir, case)
    shutil.rmtree(out_dir, ignore_errors=True)
    model = base_model(arch)
    base = logits(model, ids)
    torch.manual_seed(3)
    peft_model = get_peft_model(model, LoraConfig(**kwargs))
    lr = TRAIN_LR.get((arch, case))
    train_a_few_steps(peft_model, arch, "default", lr=lr)
    trainable, total = peft_model.get_nb_trainable_parameters()
    grads = training_gradients(peft_model, arch, ids) if not kwargs.get("lora_dropout") else {}
    unmerged = logits(peft_model, ids)
    with peft_model.disable_adapter():
        disabled = logits(peft_model, ids)
    peft_model.save_pretrained(out_dir)
    tensors = {"input_ids": ids.float(), "logits_base": base, "logits_unmerged": unmerged,
               "logits_disabled": disabled}
    meta = {"trainable_params": trainable, "all_params": total, "adapters": ["default"]}
    tensors.update(grads)

    # A second adapter (same config, other seed) for multi-adapter, mixed batch and weighted merges.
    torch.manual_seed(4)
    peft_model.add_adapter("other", LoraConfig(**kwargs))
    train_a_few_steps(peft_model, arch, "other", lr=lr)
    peft_model.set_adapter("other")
    tensors["logits_other"] = logits(peft_model, ids)
    peft_model.save_pretrained(out_dir)  # default at out_dir/, other at out_dir/other/
    meta["adapters"] = ["default", "other"]
    peft_model.set_adapter("default")
    names = ["other", "__base__", "default"]
    per_adapter = {"other": tensors["logits_other"], "__base__": base, "default": unmerged}
    # PEFT refuses `adapter_names` with DoRA; the expectation is then built
    # row by row from single-adapter runs (which is what mixed batch means).
    tensors["logits_mixed"] = torch.stack([per_adapter[n][i] for i, n in enumerate(names)])
    if not kwargs.get("use_dora"):
        peft_mixed = logits(peft_model, ids, adapter_names=names)
        assert torch.allclose(peft_mixed, tensors["logits_mixed"], atol=1e-5)
    meta["mixed_adapter_names"] = names

    # Weighted combinations (deterministic ones; dare_* draw random masks).
    if not kwargs.get("use_dora") and not kwargs.get("rank_pattern"):
        for combo in ["linear", "cat", "svd", "ties"]:
            extra = {"density": 0.5} if combo == "ties" else {}
            name = f"w_{combo}"
            peft_model.add_weighted_adapter(["default", "other"], [0.7, 0.4], name,
                                            combination_type=combo, **extra)
            peft_model.set_adapter(name)
            tensors[f"logits_weighted_{combo}"] = logits(peft_model, ids)
            peft_model.delete_adapter(name)
        meta["weighted"] = {"adapters": ["default", "other"], "weights": [0.7, 0.4], "ties_density": 0.5}
    peft_model.set_adapter("default")
    peft_model.merge_adapter()
    tensors["logits_merged"] = logits(peft_model, ids)
    peft_model.unmerge_adapter()
    tensors["logits_unmerged_again"] = logits(peft_model, ids)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "expected.safetensors"))
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(arch, case, meta["trainable_params"], meta["all_params"],
          "max|unmerged-base|=%.3g" % (unmerged - base).abs().max().item())


def main():
    torch.set_num_threads(2)
    # Arguments: architectures (`bert`) or single cases (`bert/lora`).
    only = sys.argv[1:]
    for arch, cases in CASES.items():
        if only and not any(o == arch or o.startswith(arch + "/") for o in only):
            continue
        model_dir = os.path.join(ROOT, arch)
        os.makedirs(model_dir, exist_ok=True)
        model = base_model(arch)
        model.save_pretrained(model_dir, safe_serialization=True)
        ids = inputs(arch)
        for case, kwargs in cases.items():
            if only and arch not in only and f"{arch}/{case}" not in only:
                continue
            write_case(arch, case, kwargs, model_dir, ids)


if __name__ == "__main__":
    main()
