"""Target matching on random module trees, decided by Hugging Face PEFT
itself: writes `fixtures/targets/peft_cases.json`, which
`crates/peft-core/tests/targets.rs` replays against `peft_core::target`.

Each case is a config (`target_modules` as a list or a regex,
`exclude_modules`, `layers_to_transform`, `layers_pattern`, rank-pattern
keys) and a random module tree; PEFT's `check_target_module_exists` and
`get_pattern_key` give the expected answer for every module path.

Run with the PEFT environment: `/work/pyenv/ref/bin/python
scripts/make_target_fixtures.py` (peft 0.21.x). Seeded: the output is the
same on every run.
"""

import json
import random
from pathlib import Path
from types import SimpleNamespace

import peft
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "targets" / "peft_cases.json"

ROOTS = ["model", "transformer", "encoder", "model.decoder", "base_model.model.model"]
CONTAINERS = ["layers", "h", "layer", "blocks", "block"]
MIDDLES = ["self_attn", "mlp", "attention.self", "attention.output", "attn", "ffn", "experts"]
LEAVES = ["q_proj", "k_proj", "v_proj", "o_proj", "dense", "query", "value", "c_attn", "fc1", "proj"]


def tree(rng: random.Random) -> list[str]:
    root = rng.choice(ROOTS)
    container = rng.choice(CONTAINERS)
    paths = []
    for layer in range(rng.randint(1, 12)):
        for middle in rng.sample(MIDDLES, rng.randint(1, 3)):
            for leaf in rng.sample(LEAVES, rng.randint(1, 3)):
                if middle == "experts":
                    expert = rng.randint(0, 3)
                    paths.append(f"{root}.{container}.{layer}.mlp.experts.{expert}.{leaf}")
                else:
                    paths.append(f"{root}.{container}.{layer}.{middle}.{leaf}")
    paths.append(rng.choice(["lm_head", "classifier", "pooler.dense", f"{root}.embed_out"]))
    if rng.random() < 0.3:
        # A module outside any numbered container, and a numbered one at the root.
        paths.append(f"{root}.proj")
        paths.append(f"{container}.{rng.randint(0, 3)}.{rng.choice(LEAVES)}")
    return sorted(set(paths))


def list_targets(rng: random.Random, paths: list[str]) -> list[str]:
    out = []
    for _ in range(rng.randint(1, 3)):
        p = rng.choice(paths).split(".")
        kind = rng.random()
        if kind < 0.55 or len(p) < 2:
            out.append(p[-1])  # a leaf name
        elif kind < 0.8:
            out.append(".".join(p[-rng.randint(2, min(3, len(p))):]))  # a dotted suffix
        elif kind < 0.9:
            out.append(".".join(p))  # a full path
        else:
            out.append(rng.choice(LEAVES + ["proj", "attn", "mlp"]))  # maybe nothing
    return out


def regex_target(rng: random.Random, paths: list[str]) -> str:
    leaf = rng.choice(LEAVES)
    other = rng.choice(LEAVES)
    c = rng.choice(CONTAINERS)
    return rng.choice([
        rf".*\.({leaf}|{other})",
        rf".*{c}\.[0-{rng.randint(0, 9)}]\..*\.{leaf}",
        rf".*\.(self_attn|attn)\.\w+",
        leaf,  # a bare name as a regex: fullmatch, so only an exact path
        rng.choice(paths),
        rf".*\.{leaf}$",
        rf".*\.{c}\.\d*[13579]\..*",
    ])


def layer_indices(rng: random.Random):
    return rng.choice([None, None, rng.randint(0, 5), sorted(rng.sample(range(8), rng.randint(1, 4))), []])


def layers_pattern(rng: random.Random):
    return rng.choice([None, None, rng.choice(CONTAINERS), rng.sample(CONTAINERS, 2), "", [], "experts"])


def exclude(rng: random.Random, paths: list[str]):
    r = rng.random()
    if r < 0.6:
        return None
    if r < 0.85:
        return list_targets(rng, paths)[:1]
    return regex_target(rng, paths)


def main() -> None:
    rng = random.Random(20261128)
    cases = []
    for _ in range(300):
        paths = tree(rng)
        target = list_targets(rng, paths) if rng.random() < 0.7 else regex_target(rng, paths)
        config = {
            "target_modules": target,
            "exclude_modules": exclude(rng, paths),
            "layers_to_transform": layer_indices(rng) if isinstance(target, list) else None,
            "layers_pattern": layers_pattern(rng),
        }
        ns = SimpleNamespace(modules_to_save=None, target_parameters=None, **config)
        matched = [bool(check_target_module_exists(ns, p)) for p in paths]
        # `_ExcludedModule` is falsy, so bool() is PEFT's own decision.
        pattern_keys = list_targets(rng, paths)
        pattern = [get_pattern_key(pattern_keys, p) for p in paths]
        # get_pattern_key returns the path itself when no key matches.
        pattern = [k if k in pattern_keys else None for k in pattern]
        cases.append({"config": config, "paths": paths, "matched": matched,
                      "pattern_keys": pattern_keys, "pattern_key": pattern})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"peft_version": peft.__version__, "cases": cases}, indent=None))
    n = sum(len(c["paths"]) for c in cases)
    hits = sum(sum(c["matched"]) for c in cases)
    print(f"{len(cases)} cases, {n} paths, {hits} matched -> {OUT}")


if __name__ == "__main__":
    main()
