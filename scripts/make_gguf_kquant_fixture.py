#!/usr/bin/env python3
"""Writes fixtures/gguf/kquants.gguf: two small tensors stored as Q4_K and
Q6_K (random blocks with sane f16 scales), and fixtures/gguf/kquants.safetensors
with their values as gguf-py (llama.cpp's reference Python package)
dequantises them. The Rust GGUF reader must give the same floats.

    ref/bin/python scripts/make_gguf_kquant_fixture.py   (needs `pip install gguf safetensors numpy`)
"""
import os

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter, quants
from safetensors.numpy import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "gguf")
QK_K = 256


def random_blocks(rng, n_blocks, block_bytes, f16_at):
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for off in f16_at:  # scales: small positive f16 values, never NaN/Inf
        vals = rng.uniform(0.001, 0.05, size=n_blocks).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
        blocks[:, off:off + 2] = vals
    return blocks


def main():
    os.makedirs(ROOT, exist_ok=True)
    rng = np.random.default_rng(0)
    # Q4_K: d, dmin (f16), 12 scale bytes, 128 nibble bytes. Q6_K: ql 128, qh 64, 16 i8 scales, d (f16).
    q4k = random_blocks(rng, 6, 144, [0, 2])   # a [3, 512] tensor
    q6k = random_blocks(rng, 4, 210, [208])    # a [2, 512] tensor
    expected = {
        "q4k": quants.dequantize(q4k, T.Q4_K).reshape(3, 512).astype(np.float32),
        "q6k": quants.dequantize(q6k, T.Q6_K).reshape(2, 512).astype(np.float32),
    }
    w = GGUFWriter(os.path.join(ROOT, "kquants.gguf"), "llama")
    w.add_tensor("q4k", q4k.reshape(3, 2 * 144), raw_dtype=T.Q4_K)
    w.add_tensor("q6k", q6k.reshape(2, 2 * 210), raw_dtype=T.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_file(expected, os.path.join(ROOT, "kquants.safetensors"))
    print({k: (v.shape, float(abs(v).max())) for k, v in expected.items()})


if __name__ == "__main__":
    main()
