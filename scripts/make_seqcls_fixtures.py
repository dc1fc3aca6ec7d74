#!/usr/bin/env python3
"""Writes PEFT's `modules_to_save` parity fixtures: sequence
classification (`task_type="SEQ_CLS"`) under fixtures/bert/seqcls_<method>/
(PEFT puts the head, `classifier`, and `score` where a model has one, in
`modules_to_save`, so every such adapter carries a trained full copy of the
head beside its method's tensors), a causal LM whose LoRA adapter
trains a copy of `lm_head` under fixtures/llama/lora_lm_head/, and LoRA
adapters that train copies of norm layers (every RMSNorm of the tiny Llama,
GPT-2's final LayerNorm) under fixtures/{llama,gpt2}/lora_norms/; and
prompt learning's SEQ_CLS adapters on the tiny BERT (prompt, P-tuning:
the head's copy saved under `base_model.classifier.*`, PEFT's
prompt-learning prefix) under fixtures/bert/seqcls_{prompt,ptuning}/,
with the logits of each adapter and of a mixed batch (rows of the
single-adapter logits), and the parameter counts.

Reference environment as for make_fixtures.py (not needed in CI):
    ref/bin/python scripts/make_seqcls_fixtures.py [seqcls_lora|lora_lm_head ...]

Each case has the layout of make_method_fixtures.py (two adapters,
`default` and `other/`, expected.safetensors with every state's logits, the
training gradients and two Adam steps), except that PEFT refuses two
adapters active at once when both carry a copy of one module, so there is
no `logits_both`; `logits_unload` is PEFT's `unload()`, which keeps the
active adapter's copy of the head in place of the original.
"""
import json
import os
import shutil
import sys

import torch
from peft import IA3Config, LoHaConfig, LoraConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import ROOT, base_model, inputs, logits, train_a_few_steps, training_gradients  # noqa: E402
from make_method_fixtures import two_adam_steps  # noqa: E402

# The tiny BERT of make_fixtures.py (hidden 16, 3 labels): LoRA on query and
# value, DoRA with rsLoRA, (IA)³ with PEFT's BERT defaults, LoHa; each with
# the head in modules_to_save, as PEFT's SEQ_CLS task sets it.
SEQ_CLS = dict(task_type="SEQ_CLS")
CASES = {
    "seqcls_lora": ("bert", LoraConfig, dict(r=4, lora_alpha=8, target_modules=["query", "value"], **SEQ_CLS),
                    0.02),
    "seqcls_dora": ("bert", LoraConfig, dict(r=4, lora_alpha=8, target_modules=["query", "value"],
                                             use_dora=True, use_rslora=True, **SEQ_CLS), 0.02),
    "seqcls_ia3": ("bert", IA3Config, dict(**SEQ_CLS), 0.05),
    "seqcls_loha": ("bert", LoHaConfig, dict(r=2, alpha=4, target_modules=["query", "value"], **SEQ_CLS), 0.05),
    # LlamaForSequenceClassification over the tiny Llama (3 labels, padding
    # id 0): `score` is the copied head.
    "seqcls_lora@llama_seqcls": ("llama_seqcls", LoraConfig, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                               **SEQ_CLS), 0.05),
    # GPT2ForSequenceClassification over the tiny GPT-2 (3 labels, padding
    # id 0), LoRA on the Conv1D c_attn.
    "seqcls_lora@gpt2_seqcls": ("gpt2_seqcls", LoraConfig, dict(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                             fan_in_fan_out=True, **SEQ_CLS), 0.05),
    # The tiny Llama's untied head (64 x 16) copied beside LoRA on q/v.
    "lora_lm_head": ("llama", LoraConfig, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                               modules_to_save=["lm_head"], task_type="CAUSAL_LM"), 0.05),
    # Copies of norm layers: PEFT's rule is a plain suffix, so "norm" names
    # the tiny Llama's five RMSNorms (input_layernorm, post_attention_
    # layernorm, model.norm); GPT-2's final LayerNorm (scale and shift).
    "lora_norms@llama": ("llama", LoraConfig, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   modules_to_save=["norm"], task_type="CAUSAL_LM"), 0.05),
    "lora_norms@gpt2": ("gpt2", LoraConfig, dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                                                 modules_to_save=["ln_f"], task_type="CAUSAL_LM"), 0.05),
    # A full copy of the input embedding: the tiny Llama's untied
    # embed_tokens (64 x 16); GPT-2's wte, tied to its output head, which
    # keeps the base matrix (PEFT ties copies only of layers it calls
    # embeddings, `embed_tokens`); the tied Llama's embed_tokens with
    # ensure_weight_tying, where the head uses the copy too.
    "lora_embed@llama": ("llama", LoraConfig, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   modules_to_save=["embed_tokens"], task_type="CAUSAL_LM"), 0.05),
    "lora_embed@gpt2": ("gpt2", LoraConfig, dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                                                 modules_to_save=["wte"], task_type="CAUSAL_LM"), 0.05),
    "lora_embed@llama_tied": ("llama_tied", LoraConfig, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                             modules_to_save=["embed_tokens"], ensure_weight_tying=True,
                                                             task_type="CAUSAL_LM"), 0.05),
    # LoRA's trainable_token_indices: only these rows of the input
    # embedding train and are saved; on GPT-2 the tied head follows them.
    "lora_tokens@llama": ("llama", LoraConfig, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    trainable_token_indices=[1, 3, 5, 7], task_type="CAUSAL_LM"),
                          0.05),
    "lora_tokens@gpt2": ("gpt2", LoraConfig, dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                                                  trainable_token_indices=[2, 4, 6], task_type="CAUSAL_LM"), 0.05),
}


def write_case(case, arch, config_class, kwargs, lr):
    model_dir = os.path.join(ROOT, arch)
    case = case.split("@")[0]
    if not os.path.exists(os.path.join(model_dir, "model.safetensors")):
        os.makedirs(model_dir, exist_ok=True)
        base_model(arch).save_pretrained(model_dir, safe_serialization=True)
    ids = inputs(arch)
    out_dir = os.path.join(model_dir, case)
    shutil.rmtree(out_dir, ignore_errors=True)
    model = base_model(arch)
    base = logits(model, ids)
    torch.manual_seed(3)
    config = config_class(**kwargs)
    peft_model = get_peft_model(model, config)
    assert peft_model.peft_config["default"].modules_to_save or kwargs.get("trainable_token_indices")
    train_a_few_steps(peft_model, arch, "default", lr=lr)
    trainable, total = peft_model.get_nb_trainable_parameters()
    tensors = {"input_ids": ids.float(), "logits_base": base}
    tensors.update(training_gradients(peft_model, arch, ids))
    tensors["logits_unmerged"] = logits(peft_model, ids)
    with peft_model.disable_adapter():
        tensors["logits_disabled"] = logits(peft_model, ids)
    torch.manual_seed(4)
    tied = kwargs.get("ensure_weight_tying")
    if tied:
        # PEFT 0.21's add_adapter does not tie the head to a second
        # adapter's copy: in the session `other` runs the base head, its
        # file lacks lm_head.weight, and PEFT cannot load it back (KeyError
        # on that key). `other` is trained as PEFT trains a first adapter,
        # in a model of its own, and saved beside `default`.
        other_model = get_peft_model(base_model(arch), config_class(**kwargs))
        train_a_few_steps(other_model, arch, "default", seed=5, lr=lr)
        tensors["logits_other"] = logits(other_model, ids)
        peft_model.save_pretrained(out_dir)
        other_model.save_pretrained(os.path.join(out_dir, "other"))
        peft_model.load_adapter(os.path.join(out_dir, "other"), "other")
    else:
        peft_model.add_adapter("other", config_class(**kwargs))
        train_a_few_steps(peft_model, arch, "other", seed=5, lr=lr)
        peft_model.set_adapter("other")
        tensors["logits_other"] = logits(peft_model, ids)
        peft_model.save_pretrained(out_dir)
    for d in (out_dir, os.path.join(out_dir, "other")):
        if os.path.exists(os.path.join(d, "README.md")):
            os.remove(os.path.join(d, "README.md"))
    try:
        peft_model.base_model.set_adapter(["default", "other"])
        raise AssertionError("PEFT activated two adapters with a copy of one module")
    except ValueError:
        pass
    peft_model.set_adapter("default")
    names = ["other", "__base__", "default"]
    per = {"other": tensors["logits_other"], "__base__": base, "default": tensors["logits_unmerged"]}
    tensors["logits_mixed"] = torch.stack([per[n][i] for i, n in enumerate(names)])
    # PEFT's `adapter_names` covers plain LoRA only (its (IA)³ and LoHa
    # layers ignore it); the expectation is the single-adapter rows.
    # PEFT refuses a mixed batch through copies of norm layers ("Mixed
    # batching is only supported for ... Linear, Embedding, Conv"); ours
    # routes each row through its own copy, and is held to these rows.
    # PEFT 0.21's mixed batch through a tied head's copy fails (KeyError on
    # the second adapter's name in the lm_head wrapper).
    if (config_class is LoraConfig and not kwargs.get("use_dora") and not case.startswith("lora_norms")
            and not kwargs.get("ensure_weight_tying")):
        peft_mixed = logits(peft_model, ids, adapter_names=names)
        assert torch.allclose(peft_mixed, tensors["logits_mixed"], atol=1e-5)
    peft_model.merge_adapter()
    tensors["logits_merged"] = logits(peft_model, ids)
    peft_model.unmerge_adapter()
    tensors["logits_unmerged_again"] = logits(peft_model, ids)
    two_adam_steps(arch, out_dir, tensors)
    # unload() keeps the active adapter's copy of the head (PEFT's
    # ModulesToSaveWrapper.unload_and_optionally_merge_module).
    tensors["logits_unload"] = logits(peft_model.unload(), ids)
    # PEFT saves a copy under the module's own key (`classifier.weight`, no
    # `modules_to_save.`), the gradients and trained tensors are keyed so; a
    # DoRA magnitude is saved without its parameter's `.weight`.
    tensors = {k.replace(".modules_to_save.", "."): v for k, v in tensors.items()}
    tensors = {k.replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): v
               for k, v in tensors.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "expected.safetensors"))
    meta = {"trainable_params": trainable, "all_params": total, "adapters": ["default", "other"],
            "mixed_adapter_names": names, "task": kwargs["task_type"]}
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump(meta, f, indent=1)
    gap = (tensors["logits_other"] - tensors["logits_unmerged"]).abs().max().item()
    head = (tensors["logits_unload"] - base).abs().max().item()
    # unload() gives trainable tokens' rows back to the base (they are
    # not a copy of a module).
    assert gap > 1e-3 and (head < 1e-6 if case == "lora_tokens" else head > 1e-3), (case, gap, head)
    print(case, trainable, total, "max|other-default|=%.3g" % gap, "max|unload-base|=%.3g" % head)


# No prefix case: PEFT 0.21 refuses prefix tuning for SEQ_CLS on
# transformers 5's BERT, Llama and GPT-2 alike ("Model does not support past
# key values which are required for prefix tuning": it looks for
# `past_key_values` in the backbone's forward signature). The decoders'
# `*ForSequenceClassification` take prompt tuning and P-tuning: PEFT keeps a
# copy of `score`. With a soft prompt PEFT passes embeddings, not ids, so
# transformers reads every row at its last position (it warns that it
# cannot see padding in embeddings): a right-padded row is read at a pad.
PROMPT_CASES = {
    "seqcls_prompt": lambda: PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4),
    "seqcls_ptuning": lambda: PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=4, encoder_hidden_size=12),
    "seqcls_prompt@llama_seqcls": lambda: PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4),
    "seqcls_ptuning@gpt2_seqcls": lambda: PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=4,
                                                              encoder_hidden_size=12),
}


def write_prompt_case(case, make_config, lr=0.05):
    """A prompt-learning SEQ_CLS case (`name@arch`, BERT by default): PEFT
    keeps a copy of the head (`classifier`, `score`) beside the virtual
    tokens; BERT's pooler reads the first position, which a soft prompt
    makes its first virtual token."""
    case, _, arch = case.partition("@")
    arch = arch or "bert"
    ids = inputs(arch)
    out_dir = os.path.join(ROOT, arch, case)
    shutil.rmtree(out_dir, ignore_errors=True)
    model = base_model(arch)
    base = logits(model, ids)
    torch.manual_seed(3)
    peft_model = get_peft_model(model, make_config())
    assert peft_model.peft_config["default"].modules_to_save
    train_a_few_steps(peft_model, arch, "default", lr=lr)
    trainable, total = peft_model.get_nb_trainable_parameters()
    tensors = {"input_ids": ids.float(), "logits_base": base}
    tensors["logits_unmerged"] = logits(peft_model, ids)
    # No `logits_disabled`: PEFT 0.21's disable_adapter() fails on a
    # prompt-learning model without generation (UnboundLocalError on
    # old_prepare_inputs_for_generation); disabled is the base model, head
    # included.
    torch.manual_seed(4)
    peft_model.add_adapter("other", make_config())
    train_a_few_steps(peft_model, arch, "other", seed=5, lr=lr)
    peft_model.set_adapter("other")
    tensors["logits_other"] = logits(peft_model, ids)
    peft_model.save_pretrained(out_dir)
    for d in (out_dir, os.path.join(out_dir, "other")):
        if os.path.exists(os.path.join(d, "README.md")):
            os.remove(os.path.join(d, "README.md"))
    names = ["other", "__base__", "default"]
    per = {"other": tensors["logits_other"], "__base__": base, "default": tensors["logits_unmerged"]}
    tensors["logits_mixed"] = torch.stack([per[n][i] for i, n in enumerate(names)])
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "expected.safetensors"))
    meta = {"trainable_params": trainable, "all_params": total, "adapters": ["default", "other"],
            "mixed_adapter_names": names, "task": "SEQ_CLS"}
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump(meta, f, indent=1)
    gap = (tensors["logits_other"] - tensors["logits_unmerged"]).abs().max().item()
    moved = (tensors["logits_unmerged"] - base).abs().max().item()
    assert gap > 1e-3 and moved > 1e-3, (case, gap, moved)
    print(case, trainable, total, "max|other-default|=%.3g" % gap, "max|default-base|=%.3g" % moved)


def main():
    torch.set_num_threads(2)
    only = sys.argv[1:]
    for case, (arch, config_class, kwargs, lr) in CASES.items():
        if not only or case in only:
            write_case(case, arch, config_class, kwargs, lr)
    for case, make_config in PROMPT_CASES.items():
        if not only or case in only:
            write_prompt_case(case, make_config)


if __name__ == "__main__":
    main()
