#!/usr/bin/env python3
"""Writes `fixtures/gguf/quant_llama.gguf`: a small random Llama (2 layers,
hidden 256, so that every linear's rows are whole Q4_K / Q6_K super-blocks)
whose matrices are stored in every GGML type `--quantize gguf` keeps —
Q8_0, Q4_0, Q4_1, Q4_K, Q6_K, F16 and BF16, a different type per matrix and
per layer (so q and k, whose rows llama.cpp permutes, come in several
types) — and a Q8_0 token embedding that the output head shares (tied).

`fixtures/gguf/quant_llama.json` holds what gguf-py (llama.cpp's reference
Python package) dequantises each tensor to, in Hugging Face's layout (q/k
rows un-permuted, `[out, in]`): the tensor's sum and sum of squares (f64) and
64 sampled elements (flat index, value). The Rust loader must read the same
numbers, dense (`Llama::from_gguf`) and kept quantized.

Q8_0 / Q4_0 / Q4_1 / BF16 blocks are gguf-py's quantisation of random
normal weights; gguf-py cannot quantise K-quants, so Q4_K / Q6_K blocks are
random bytes with scales chosen to keep the weights within about ±0.1.

    python -m venv v && v/bin/pip install gguf numpy safetensors
    v/bin/python scripts/make_gguf_quant_llama_fixture.py
"""

import json
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter, quants

ROOT = Path(__file__).resolve().parent.parent / "fixtures" / "gguf"
VOCAB, HIDDEN, FF, LAYERS, HEADS, KV_HEADS = 64, 256, 256, 2, 4, 2
QK_K = 256

# Per layer, llama.cpp name → GGML type; layer 1 rotates layer 0's types.
MATRICES = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q6_K, T.F16, T.BF16]
HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
      "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
      "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def permute(w, n_head):
    """convert_hf_to_gguf.py's `LlamaModel.permute` (HF → GGUF rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w, n_head):
    """The inverse of `permute` (GGUF → HF rows)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def f16_bytes(rng, n, lo, hi):
    return rng.uniform(lo, hi, size=n).astype(np.float16).view(np.uint8).reshape(n, 2)


def kquant_blocks(rng, qtype, rows, cols):
    """Random K-quant blocks, `rows × cols / 256` of them, with small scales."""
    n = rows * cols // QK_K
    if qtype == T.Q4_K:  # d, dmin (f16), 12 scale bytes, 128 nibble bytes: |w| ≤ 945·d
        b = rng.integers(0, 256, size=(n, 144), dtype=np.uint8)
        b[:, 0:2] = f16_bytes(rng, n, 5e-5, 1.5e-4)
        b[:, 2:4] = f16_bytes(rng, n, 5e-5, 1.5e-4)
    else:  # Q6_K: ql 128, qh 64, 16 i8 scales, d (f16): |w| ≤ 4096·d
        b = rng.integers(0, 256, size=(n, 210), dtype=np.uint8)
        b[:, 208:210] = f16_bytes(rng, n, 1e-5, 3e-5)
    return b.reshape(rows, -1)


def stored(rng, qtype, rows, cols, scale):
    """(raw GGUF data, raw dtype or None, gguf-py's dequantised values), GGUF layout."""
    if qtype in (T.Q4_K, T.Q6_K):
        raw = kquant_blocks(rng, qtype, rows, cols)
        return raw, qtype, quants.dequantize(raw, qtype).reshape(rows, cols).astype(np.float32)
    w = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
    if qtype == T.F16:
        raw = w.astype(np.float16)
        return raw, None, raw.astype(np.float32)
    raw = quants.quantize(w, qtype)
    return raw, qtype, quants.dequantize(raw, qtype).reshape(rows, cols).astype(np.float32)


def summary(rng, w):
    flat = w.reshape(-1).astype(np.float64)
    idx = np.sort(rng.choice(flat.size, size=min(64, flat.size), replace=False))
    return {"shape": list(w.shape), "sum": float(flat.sum()), "sum_sq": float((flat * flat).sum()),
            "samples": [[int(i), float(w.reshape(-1)[i])] for i in idx]}


def main():
    rng = np.random.default_rng(7)
    out = ROOT / "quant_llama.gguf"
    gw = GGUFWriter(str(out), "llama")
    gw.add_block_count(LAYERS)
    gw.add_embedding_length(HIDDEN)
    gw.add_feed_forward_length(FF)
    gw.add_head_count(HEADS)
    gw.add_head_count_kv(KV_HEADS)
    gw.add_context_length(64)
    gw.add_layer_norm_rms_eps(1e-6)
    gw.add_rope_freq_base(10000.0)
    # The tiny GGUF Llama's vocabulary: letters and their doubles, two merges.
    tokens = [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(VOCAB)]
    gw.add_tokenizer_model("gpt2")
    gw.add_token_list(tokens)
    gw.add_token_types([1] * len(tokens))
    gw.add_token_merges(["a a", "b b"])

    expected = {}
    raw, dtype, deq = stored(rng, T.Q8_0, VOCAB, HIDDEN, 0.5)
    gw.add_tensor("token_embd.weight", raw, raw_dtype=dtype)
    expected["model.embed_tokens.weight"] = summary(rng, deq)
    norm = (1.0 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
    gw.add_tensor("output_norm.weight", norm)
    expected["model.norm.weight"] = summary(rng, norm)
    head_dim = HIDDEN // HEADS
    for layer in range(LAYERS):
        for j, name in enumerate(MATRICES):
            qtype = TYPES[(j + 3 * layer) % len(TYPES)]
            rows = {"attn_k": KV_HEADS * head_dim, "attn_v": KV_HEADS * head_dim,
                    "ffn_gate": FF, "ffn_up": FF}.get(name, HIDDEN)
            cols = FF if name == "ffn_down" else HIDDEN
            raw, dtype, deq = stored(rng, qtype, rows, cols, 0.05)
            gw.add_tensor(f"blk.{layer}.{name}.weight", raw, raw_dtype=dtype)
            if name == "attn_q":
                deq = unpermute(deq, HEADS)
            elif name == "attn_k":
                deq = unpermute(deq, KV_HEADS)
            entry = summary(rng, deq)
            entry["ggml_type"] = qtype.name
            expected[f"model.layers.{layer}.{HF[name]}.weight"] = entry
        for name in ("attn_norm", "ffn_norm"):
            norm = (1.0 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
            gw.add_tensor(f"blk.{layer}.{name}.weight", norm)
            expected[f"model.layers.{layer}.{HF[name]}.weight"] = summary(rng, norm)
    gw.write_header_to_file()
    gw.write_kv_data_to_file()
    gw.write_tensors_to_file()
    gw.close()
    (ROOT / "quant_llama.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(out, out.stat().st_size, {k: v.get("ggml_type") for k, v in expected.items() if "ggml_type" in v})


if __name__ == "__main__":
    main()
