"""Writes the seed corpora of the fuzz targets (`fuzz/corpus/<target>/`)
from the repository's fixtures: valid inputs in each target's framing
(see `fuzz/src/lib.rs`), for libFuzzer to mutate.

Needs only the standard library: `python3 scripts/make_fuzz_seeds.py`
(after `scripts/make_gguf_llama_fixture.py`, whose GGUF file is a seed).
"""

import json
import struct
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
OUT = ROOT / "fuzz" / "corpus"

# The adapters the first byte picks, in `ADAPTERS`' order in fuzz/src/lib.rs.
ADAPTERS = [
    ("lora", "llama/lora", "adapter_model.safetensors"),
    ("dora", "llama/dora_rslora", "adapter_model.safetensors"),
    ("ia3", "llama/ia3", "adapter_model.safetensors"),
    ("prefix", "llama/prefix_proj", "adapter_model.safetensors"),
    ("prompt", "llama/prompt_random", "adapter_model.safetensors"),
    ("ptuning", "llama/ptuning_mlp", "adapter_model.safetensors"),
    ("bottleneck", "bert/bn_seq/a", "adapter.safetensors"),
    ("lora", "gpt2/lora", "adapter_model.safetensors"),
    ("dora", "gpt2/dora", "adapter_model.safetensors"),
    ("ia3", "gpt2/ia3", "adapter_model.safetensors"),
    ("prefix", "gpt2/prefix", "adapter_model.safetensors"),
    ("prompt", "gpt2/prompt_vocab", "adapter_model.safetensors"),
    ("ptuning", "gpt2/ptuning_lstm", "adapter_model.safetensors"),
    ("lora", "bert/lora", "adapter_model.safetensors"),
    ("dora", "bert/dora", "adapter_model.safetensors"),
    ("ia3", "bert/ia3", "adapter_model.safetensors"),
    ("bottleneck", "gpt2/bn_seq_gpt2/a", "adapter.safetensors"),
]


def put(target: str, name: str, data: bytes) -> None:
    d = OUT / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def adapters() -> None:
    for i, (method, folder, weights) in enumerate(ADAPTERS):
        d = FIX / folder
        # The first seven (Llama, and BERT's bottleneck) keep their names.
        name = method if i < 7 else folder.replace("/", "-")
        put("adapter_config", f"seed-{name}", bytes([i]) + (d / "adapter_config.json").read_bytes())
        put("adapter_weights", f"seed-{name}", bytes([i]) + (d / weights).read_bytes())


def models() -> None:
    for i, arch in enumerate(["llama", "gpt2", "bert"]):
        config = (FIX / arch / "config.json").read_bytes()
        weights = (FIX / arch / "model.safetensors").read_bytes()
        put("model_checkpoint", f"seed-{arch}", bytes([i]) + struct.pack("<H", len(config)) + config + weights)


def gguf_seeds() -> None:
    put("gguf", "seed-kquants", (FIX / "gguf" / "kquants.gguf").read_bytes())
    # A tiny Llama with its tokenizer (scripts/make_gguf_llama_fixture.py).
    put("gguf", "seed-tiny-llama", (FIX / "gguf" / "tiny_llama.gguf").read_bytes())


def tokenizers() -> None:
    base = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
            "post_processor": None, "decoder": None}
    word_level = dict(base, normalizer={"type": "Lowercase"}, pre_tokenizer={"type": "Whitespace"},
                      model={"type": "WordLevel", "unk_token": "[UNK]",
                             "vocab": {"[UNK]": 0, "call": 1, "me": 2, "ishmael": 3, ".": 4}})
    word_piece = dict(base, normalizer={"type": "BertNormalizer", "clean_text": True,
                                        "handle_chinese_chars": True, "strip_accents": None,
                                        "lowercase": True},
                      pre_tokenizer={"type": "BertPreTokenizer"},
                      padding={"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None,
                               "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
                      decoder={"type": "WordPiece", "prefix": "##", "cleanup": True},
                      model={"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                             "max_input_chars_per_word": 100,
                             "vocab": {"[PAD]": 0, "[UNK]": 1, "call": 2, "me": 3, "ish": 4, "##ma": 5,
                                       "##el": 6, ".": 7}})
    bpe = dict(base, normalizer=None,
               pre_tokenizer={"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                              "use_regex": True},
               decoder={"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
               model={"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": {"C": 0, "a": 1, "l": 2, "Ca": 3, "ll": 4},
                      "merges": ["C a", "l l"]})
    for name, spec in [("word-level", word_level), ("word-piece", word_piece), ("bpe", bpe)]:
        put("tokenizer", f"seed-{name}", json.dumps(spec).encode())


def datasets() -> None:
    put("dataset", "seed-jsonl", b"\0" + b'{"text": "a fine film", "label": 1}\n{"text": "dull", "label": 0}\n')
    put("dataset", "seed-csv", b"\1" + b'text,label\n"a fine, ""bright"" film",pos\ndull,neg\n')
    put("dataset", "seed-tsv", b"\2" + b"label\ttext\npos\ta fine film\nneg\tdull\n")
    put("dataset", "seed-txt", b"\3" + b"Call me Ishmael. Some years ago\n\nnever mind how long precisely.\n")


def fusion() -> None:
    d = FIX / "bert" / "bn_compose" / "fusion"
    put("fusion", "seed-config", b"\0" + (d / "adapter_fusion_config.json").read_bytes())
    put("fusion", "seed-weights", b"\1" + (d / "model_adapter_fusion.safetensors").read_bytes())


def safetensors_keys(path: Path) -> list:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return sorted(k for k in json.loads(raw[8 : 8 + n]) if k != "__metadata__")


def shard_indices() -> None:
    # The shards `shard_index` writes: the fixture's tensors alternately, in
    # name order (SHARDS in fuzz/src/lib.rs).
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for i, arch in enumerate(["llama", "gpt2", "bert"]):
        keys = safetensors_keys(FIX / arch / "model.safetensors")
        index = {"metadata": {"total_size": 0}, "weight_map": {k: shards[j % 2] for j, k in enumerate(keys)}}
        put("shard_index", f"seed-{arch}", bytes([i]) + json.dumps(index, indent=2).encode())


def safetensors_bytes(tensors: dict) -> bytes:
    header, body = {}, b""
    for name, (shape, values) in tensors.items():
        data = struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(body), len(body) + len(data)]}
        body += data
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def heads() -> None:
    # Two labels over the BERT fixture's 16 hidden units (HEAD_INPUTS).
    weight = [((i * 7) % 5 - 2) / 10 for i in range(2 * 16)]
    head = safetensors_bytes({"classifier.weight": ([2, 16], weight), "classifier.bias": ([2], [0.1, -0.1])})
    put("head", "seed-head", b"\0" + head)
    put("head", "seed-labels", b"\1" + b'["negative", "positive"]')


def adapterhub_heads() -> None:
    # Byte 0: the file (0 head_config.json, 1 model_head.safetensors);
    # byte 1: the fixture (HUB_HEADS in fuzz/src/lib.rs).
    for k, name in enumerate(["cls", "multi", "tag", "reg"]):
        d = FIX / "bert" / "bn_heads" / name
        put("adapterhub_head", f"seed-config-{name}", bytes([0, k]) + (d / "head_config.json").read_bytes())
        put("adapterhub_head", f"seed-weights-{name}", bytes([1, k]) + (d / "model_head.safetensors").read_bytes())


if __name__ == "__main__":
    # `run_state`'s seeds come from a real halted run:
    # cargo test -p peft-cli --test fuzz_regressions -- --ignored write_run_state_seeds
    fusion()
    shard_indices()
    heads()
    adapterhub_heads()
    adapters()
    models()
    gguf_seeds()
    tokenizers()
    datasets()
    for d in sorted(OUT.iterdir()):
        print(d.name, len(list(d.iterdir())))
