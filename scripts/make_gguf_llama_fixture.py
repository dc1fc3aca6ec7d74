"""Writes `fixtures/gguf/tiny_llama.gguf`: the tiny Llama of `fixtures/llama/`
as llama.cpp's converter would store it (F32 tensors under llama.cpp's names,
q/k rows permuted for its RoPE layout, the metadata `Llama::from_gguf`
reads). `peft merge` of a GGUF model is tested on it against PEFT's merged
logits of the same weights.

Run with the PEFT environment: `/work/pyenv/ref/bin/python scripts/make_gguf_llama_fixture.py`.
"""

import json
from pathlib import Path

import numpy as np
from gguf import GGUFWriter
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's `LlamaModel.permute`."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def main() -> None:
    cfg = json.loads((FIX / "llama" / "config.json").read_text())
    w = load_file(FIX / "llama" / "model.safetensors")
    out = FIX / "gguf" / "tiny_llama.gguf"
    gw = GGUFWriter(str(out), "llama")
    gw.add_block_count(cfg["num_hidden_layers"])
    gw.add_embedding_length(cfg["hidden_size"])
    gw.add_feed_forward_length(cfg["intermediate_size"])
    gw.add_head_count(cfg["num_attention_heads"])
    gw.add_head_count_kv(cfg["num_key_value_heads"])
    gw.add_context_length(cfg["max_position_embeddings"])
    gw.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    gw.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    # A small byte-level BPE vocabulary (letters and their doubles) with two merges.
    tokens = [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(cfg["vocab_size"])]
    gw.add_tokenizer_model("gpt2")
    gw.add_token_list(tokens)
    gw.add_token_types([1] * len(tokens))
    gw.add_token_merges(["a a", "b b"])
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                 "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg["num_hidden_layers"]):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf, gg in names.items():
        t = w[hf].astype(np.float32)
        if gg.endswith("attn_q.weight"):
            t = permute(t, cfg["num_attention_heads"])
        elif gg.endswith("attn_k.weight"):
            t = permute(t, cfg["num_key_value_heads"])
        gw.add_tensor(gg, np.ascontiguousarray(t))
    gw.write_header_to_file()
    gw.write_kv_data_to_file()
    gw.write_tensors_to_file()
    gw.close()
    print(out, out.stat().st_size)


if __name__ == "__main__":
    main()
