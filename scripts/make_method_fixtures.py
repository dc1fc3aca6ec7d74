#!/usr/bin/env python3
"""Writes the Hugging Face PEFT parity fixtures for the newer slot methods
(LoHa, LoKr, OFT, BOFT, VeRA, LN tuning, trainable tokens) under fixtures/<arch>/<case>/ (tiny
Llama, BERT and GPT-2 of make_fixtures.py; GPT-2's Conv1D layers are refused
by PEFT's LyCORIS and OFT methods, and by ours; VeRA takes them, and LN
tuning adapts GPT-2's norms).

Reference environment as for make_fixtures.py (not needed in CI):
    ref/bin/python scripts/make_method_fixtures.py [loha|lokr|oft|boft|vera|ln|trainable ...]

Each case: PEFT's save_pretrained of two adapters (`default` in the folder,
`other` in other/), and expected.safetensors with input_ids, logits of the
base model, of each adapter, of both active at once, disabled, merged and
unmerged again, a mixed batch (rows of the single-adapter logits), the
training loss and every factor's gradient (no `logits_both` for LN tuning,
whose forward pass PEFT refuses with two adapters active, nor for
trainable tokens, whose two adapters retrain the same tokens);
expected.json with parameter counts; and `steps.*`: two Adam steps
(PyTorch's defaults, lr STEP_LR) of the saved `default`, loaded as a user
loads it, on two recorded batches, and every trained tensor after them.
"""
import contextlib
import json
import os
import shutil
import sys

import torch
import peft.tuners.boft.layer as boft_layer
from peft import (BOFTConfig, LNTuningConfig, LoHaConfig, LoKrConfig, OFTConfig, PeftModel, TrainableTokensConfig,
                  VeraConfig, get_peft_model)
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import BATCH, CLASSIFIERS, ROOT, SEQ, base_model, inputs, logits, train_a_few_steps, training_gradients  # noqa: E402

# case -> (config class, arguments). Tiny Llama: hidden 16, q_proj 16 -> 16,
# v_proj 16 -> 8, up_proj 16 -> 40; BERT: hidden 16, intermediate 40.
CASES = {
    "llama": {
        # No targets: PEFT's defaults for `llama` (q_proj, v_proj).
        "loha": (LoHaConfig, dict(r=4, alpha=8)),
        "loha_custom": (LoHaConfig, dict(r=4, alpha=6, target_modules=r".*\.(q_proj|up_proj|o_proj)",
                                         rank_pattern={"up_proj": 2}, alpha_pattern={"o_proj": 3})),
        # r 8 is not below half of any factor's larger side: lokr_w1 and
        # lokr_w2 are full matrices (PEFT's default layout at these sizes).
        "lokr": (LoKrConfig, dict(r=8, alpha=8)),
        # decompose_both with r 1: both factors of q_proj (16 -> 16, sides
        # 4 x 4) and up_proj (16 -> 40: 4 x 4 in, 5 x 8 out) are rank-1
        # pairs; o_proj at rank 2 (rank_pattern) is not below half a side:
        # full matrices. An alpha pattern, the LyCORIS initialisation and
        # rank_dropout_scale (inactive at inference) too.
        "lokr_custom": (LoKrConfig, dict(r=1, alpha=3, decompose_both=True,
                                         target_modules=r".*\.(q_proj|up_proj|o_proj)",
                                         rank_pattern={"o_proj": 2}, alpha_pattern={"up_proj": 5},
                                         init_weights="lycoris", rank_dropout_scale=True)),
        # 4 x 4 blocks (q_proj, v_proj: 16 inputs).
        "oft": (OFTConfig, dict(oft_block_size=4, r=0), dict(lr=0.01)),
        # r = 2 blocks per layer (8 x 8 for 16 inputs, 20 x 20 for
        # down_proj's 40), one generator shared by a layer's blocks, and a
        # 3-term Neumann series.
        "oft_custom": (OFTConfig, dict(r=2, oft_block_size=0, block_share=True,
                                       num_cayley_neumann_terms=3,
                                       target_modules=r".*\.(q_proj|down_proj|o_proj)"), dict(lr=0.01)),
        # One butterfly factor, 4 x 4 blocks on PEFT's default targets:
        # OFT's layout with BOFT's exact Cayley transform and boft_s.
        "boft": (BOFTConfig, dict(boft_block_size=4, init_weights=False), dict(lr=0.01)),
        # Three butterfly factors of 4 blocks (q_proj, o_proj: 16 inputs in
        # blocks of 4; down_proj: 40 inputs in blocks of 10), the second and
        # third interleaving half-blocks across 2 and 4 blocks (the third
        # permutation is not its own inverse): PEFT computes them only with
        # its CUDA extension, which `butterfly` stands in for on the CPU.
        "boft_butterfly": (BOFTConfig, dict(boft_block_num=4, boft_block_size=0, boft_n_butterfly_factor=3,
                                            init_weights=False,
                                            target_modules=r".*\.(q_proj|down_proj|o_proj)"),
                           dict(lr=0.01, butterfly_factors=True)),
        # The exact Cayley transform (PEFT's torch.linalg.solve) on
        # q/v/up_proj, random start.
        "oft_exact": (OFTConfig, dict(oft_block_size=4, r=0, use_cayley_neumann=False, init_weights=False,
                                      target_modules=["q_proj", "v_proj", "up_proj"]), dict(lr=0.01)),
        # No targets: q_proj (16 -> 16) and v_proj (16 -> 8) share one
        # vera_A [4, 16] and vera_B [16, 4].
        "vera": (VeraConfig, dict(r=4)),
        # up_proj 16 -> 40 and down_proj 40 -> 16: the projections take the
        # largest side of each (vera_A [6, 40], vera_B [40, 6]), and every
        # layer its leading slices; another key and d_initial.
        "vera_custom": (VeraConfig, dict(r=6, projection_prng_key=7, d_initial=0.5,
                                         target_modules=r".*\.(q_proj|up_proj|down_proj)")),
        # The projections are not saved: a load draws them again from the
        # key, so this case holds only if our generator is PyTorch's.
        "vera_unsaved": (VeraConfig, dict(r=4, projection_prng_key=123, save_projection=False,
                                          target_modules=["q_proj", "v_proj", "up_proj"])),
        # PEFT's defaults for llama: input_layernorm, post_attention_layernorm
        # and the final norm (RMSNorms: a scale only).
        "ln_tuning": (LNTuningConfig, dict()),
        # Trainable tokens alone: rows of embed_tokens (no targets: the
        # input embedding).
        "trainable_tokens": (TrainableTokensConfig, dict(token_indices=[1, 3, 5, 7])),
    },
    "gpt2": {
        # GPT-2's fused c_attn (Conv1D 16 -> 48) and c_fc (16 -> 64): PEFT
        # sets fan_in_fan_out for them.
        "vera": (VeraConfig, dict(r=4, target_modules=["c_attn", "c_fc"])),
        # PEFT's defaults for gpt2: ln_1, ln_2, ln_f (LayerNorms with a
        # shift).
        "ln_tuning": (LNTuningConfig, dict()),
        # No trainable tokens case: PEFT 0.21 wraps GPT-2's tied lm_head a
        # second time for a second adapter and then fails its forward pass
        # ("TrainableTokensLayer wraps an unknown layer type"); LoRA's
        # trainable_token_indices on GPT-2 (make_seqcls_fixtures.py) covers
        # the tied head.
    },
    "bert": {
        "loha": (LoHaConfig, dict(r=2, alpha=4, target_modules=["query", "value", "output.dense"])),
        # decompose_factor 2: every side pair is 2 x n, so W1 stays a full
        # 2 x 2 matrix while W2 (8 x 8, 8 x 20) is a rank-1 pair.
        "lokr": (LoKrConfig, dict(r=1, alpha=2, decompose_both=True, decompose_factor=2,
                                  target_modules=["query", "value", "output.dense"])),
        "oft": (OFTConfig, dict(oft_block_size=8, r=0, target_modules=["query", "value", "output.dense"]),
                dict(lr=0.3)),
        "boft": (BOFTConfig, dict(boft_block_size=4, target_modules=["query", "value", "output.dense"]),
                 dict(lr=0.5)),
        "vera": (VeraConfig, dict(r=4, target_modules=["query", "value", "output.dense"])),
        # BERT has no default LN tuning targets in PEFT: every LayerNorm but
        # the embeddings' (LayerNorm with a shift).
        "ln_tuning": (LNTuningConfig, dict(target_modules=["LayerNorm"], exclude_modules=["embeddings.LayerNorm"])),
    },
}

STEP_LR = 0.01


@contextlib.contextmanager
def butterfly():
    """PEFT 0.21 computes several butterfly factors only with its CUDA
    extension (`fbd_cuda`); without it, it warns and uses one. This stands
    in for the extension with the same block-diagonal assembly in PyTorch
    ([N, D, H, H] -> [N, D*H, D*H], as fbd_cuda_kernel.cu indexes it), so
    that PEFT's own definition of the factors runs on the CPU."""
    class BlockDiag:
        @staticmethod
        def apply(blocks):
            return torch.stack([torch.block_diag(*factor) for factor in blocks])

    saved = boft_layer.get_fbd_cuda, boft_layer.FastBlockDiag
    boft_layer.get_fbd_cuda = lambda: True
    boft_layer.FastBlockDiag = BlockDiag
    try:
        yield
    finally:
        boft_layer.get_fbd_cuda, boft_layer.FastBlockDiag = saved


def two_adam_steps(arch, out_dir, tensors):
    """Loads `default` from out_dir onto a fresh base, takes two Adam steps
    and records the batches and the trained tensors under `steps.`."""
    model = PeftModel.from_pretrained(base_model(arch), out_dir, is_trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=STEP_LR)
    g = torch.Generator().manual_seed(9)
    model.train()
    for i in range(2):
        ids = torch.randint(0, 64, (BATCH, SEQ), generator=g)
        tensors[f"steps.input_ids.{i}"] = ids.float()
        if arch in CLASSIFIERS:
            labels = torch.randint(0, 3, (BATCH,), generator=g)
            tensors[f"steps.labels.{i}"] = labels.float()
            out = model(input_ids=ids, labels=labels)
        else:
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    # Tied parameters under each name (a copy of the embedding that
    # ensure_weight_tying shares with lm_head is saved under both).
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            tensors["steps." + name.replace(".default", "")] = p.detach().clone()
    # VeRA's projections are buffers, saved beside the trained vectors.
    for name, b in model.named_buffers(remove_duplicate=False):
        if name.startswith("base_model.vera_") and name.endswith(".default"):
            tensors["steps." + name.replace(".default", "")] = b.detach().clone()


def write_case(arch, case, config_class, kwargs, model_dir, ids, lr=None, butterfly_factors=False):
    with butterfly() if butterfly_factors else contextlib.nullcontext():
        write_case_as_peft(arch, case, config_class, kwargs, model_dir, ids, lr)


def write_case_as_peft(arch, case, config_class, kwargs, model_dir, ids, lr):
    out_dir = os.path.join(model_dir, case)
    shutil.rmtree(out_dir, ignore_errors=True)
    model = base_model(arch)
    base = logits(model, ids)
    task = "SEQ_CLS" if arch == "bert" else "CAUSAL_LM"
    peft_model = get_peft_model(model, config_class(task_type=None, **kwargs))
    train_a_few_steps(peft_model, arch, "default", lr=lr)
    trainable, total = peft_model.get_nb_trainable_parameters()
    tensors = {"input_ids": ids.float(), "logits_base": base}
    tensors.update(training_gradients(peft_model, arch, ids))
    tensors["logits_unmerged"] = logits(peft_model, ids)
    with peft_model.disable_adapter():
        tensors["logits_disabled"] = logits(peft_model, ids)
    torch.manual_seed(4)
    peft_model.add_adapter("other", config_class(task_type=None, **kwargs))
    # `other` trains on other batches (seed 5) too, so that no switching,
    # mixed-batch or saving test could mistake one for the other.
    train_a_few_steps(peft_model, arch, "other", seed=5, lr=lr)
    peft_model.set_adapter("other")
    tensors["logits_other"] = logits(peft_model, ids)
    peft_model.save_pretrained(out_dir)
    for d in (out_dir, os.path.join(out_dir, "other")):
        # PEFT's generated model card: not a fixture.
        if os.path.exists(os.path.join(d, "README.md")):
            os.remove(os.path.join(d, "README.md"))
    # Both active: PEFT adds both deltas (LN tuning refuses to run so, and
    # trainable tokens with the same indices).
    if config_class not in (LNTuningConfig, TrainableTokensConfig):
        peft_model.base_model.set_adapter(["default", "other"])
        tensors["logits_both"] = logits(peft_model, ids)
    peft_model.set_adapter("default")
    names = ["other", "__base__", "default"]
    per = {"other": tensors["logits_other"], "__base__": base, "default": tensors["logits_unmerged"]}
    tensors["logits_mixed"] = torch.stack([per[n][i] for i, n in enumerate(names)])
    peft_model.merge_adapter()
    tensors["logits_merged"] = logits(peft_model, ids)
    peft_model.unmerge_adapter()
    tensors["logits_unmerged_again"] = logits(peft_model, ids)
    two_adam_steps(arch, out_dir, tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "expected.safetensors"))
    meta = {"trainable_params": trainable, "all_params": total, "adapters": ["default", "other"],
            "mixed_adapter_names": names, "task": task}
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump(meta, f, indent=1)
    gap = (tensors["logits_other"] - tensors["logits_unmerged"]).abs().max().item()
    assert gap > 1e-3, f"{arch}/{case}: `other` is indistinguishable from `default` ({gap:.3g})"
    print(arch, case, trainable, total,
          "max|adapted-base|=%.3g" % (tensors["logits_unmerged"] - base).abs().max().item(),
          "max|other-default|=%.3g" % gap)


def main():
    torch.set_num_threads(2)
    methods = sys.argv[1:] or ["loha", "lokr", "oft", "boft", "vera", "ln", "trainable"]
    for arch, cases in CASES.items():
        model_dir = os.path.join(ROOT, arch)
        ids = inputs(arch)
        for case, (config_class, kwargs, *options) in cases.items():
            if case.split("_")[0] in methods:
                write_case(arch, case, config_class, kwargs, model_dir, ids, **(options[0] if options else {}))


if __name__ == "__main__":
    main()
