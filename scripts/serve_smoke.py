#!/usr/bin/env python3
"""`peft serve` driven by the official `openai` Python package.

Trains two tiny adapters on SmolLM2-135M with `peft train` (a LoRA and a
prefix, one step each), serves the base with the LoRA, and checks through
`openai.OpenAI` what an application sees: the model list, completions and
chat completions (streamed and not, the streamed text equal to the whole
one), runtime loading and unloading of the prefix through vLLM's endpoints,
OpenAI's exceptions for an unknown model and a wrong key, and a clean exit
on SIGTERM. With `--encoder`, it also serves that BERT folder and checks
`embeddings.create` (the client asks for base64 by default) against the
same embeddings as floats.

    pip install "openai>=1.50,<3"
    python3 scripts/serve_smoke.py --peft target/debug/peft \
        --model ~/.cache/peft-rs/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --encoder ~/.cache/peft-rs/assets/minilm

Exits non-zero, saying what failed, on the first difference.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import httpx
import openai

KEY = "smoke-key"
TEXT = (
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money "
    "in my purse, and nothing particular to interest me on shore, I thought I would sail about a "
    "little and see the watery part of the world."
)


def train(peft, model, data, out, method):
    subprocess.run(
        [peft, "train", "--method", method, "--model", model, "--data", data,
         "--task", "causal-lm", "--out", out, "--max-steps", "1", "--batch", "2",
         "--block-size", "16", "--max-train", "2", "--lr", "1e-2"],
        check=True, stdout=subprocess.DEVNULL,
    )
    return os.path.join(out, "best")


def check(cond, what):
    if not cond:
        sys.exit(f"serve_smoke: FAILED: {what}")
    print(f"ok: {what}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peft", required=True, help="the peft binary")
    ap.add_argument("--model", required=True, help="SmolLM2-135M-Instruct GGUF")
    ap.add_argument("--encoder", help="all-MiniLM-L6-v2 folder: also check /v1/embeddings")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="peft-serve-smoke-")
    server = None
    try:
        data = os.path.join(work, "text.txt")
        with open(data, "w") as f:
            f.write(TEXT)
        root = os.path.join(work, "runs")
        lora = train(args.peft, args.model, data, os.path.join(root, "lora"), "lora")
        train(args.peft, args.model, data, os.path.join(root, "prefix"), "prefix")

        server = subprocess.Popen(
            [args.peft, "serve", "--model", args.model, "--served-model-name", "smollm2",
             "--adapter", f"lora={lora}", "--adapter-root", root, "--port", "0",
             "--api-key", KEY],
            stdout=subprocess.PIPE, text=True,
        )
        line = server.stdout.readline()
        check("listening on http://" in line, f"the server starts ({line.strip()!r})")
        url = line.strip().rsplit(" ", 1)[-1]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)

        ids = [m.id for m in client.models.list().data]
        check(ids == ["smollm2", "lora"], f"models.list gives the base and the adapter ({ids})")

        prompt = "Call me Ishmael. Some years ago"
        whole = client.completions.create(model="lora", prompt=prompt, max_tokens=8, temperature=0)
        text = whole.choices[0].text
        check(len(text) > 0 and whole.usage.completion_tokens > 0, f"completions.create ({text!r})")
        pieces = client.completions.create(
            model="lora", prompt=prompt, max_tokens=8, temperature=0, stream=True)
        streamed = "".join(c.choices[0].text for c in pieces if c.choices)
        check(streamed == text, f"the streamed completion equals the whole one ({streamed!r})")

        messages = [{"role": "user", "content": "What is the capital of France?"}]
        chat = client.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=8, temperature=0)
        answer = chat.choices[0].message.content
        check(chat.choices[0].message.role == "assistant" and answer, f"chat.completions.create ({answer!r})")
        chunks = client.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=8, temperature=0, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        check(streamed == answer, f"the streamed chat answer equals the whole one ({streamed!r})")

        auth = {"Authorization": f"Bearer {KEY}"}
        r = httpx.post(f"{url}/v1/load_lora_adapter", headers=auth,
                       json={"lora_name": "prefix", "lora_path": "prefix/best"})
        check(r.status_code == 200, f"load_lora_adapter ({r.status_code} {r.text})")
        out = client.completions.create(model="prefix", prompt=prompt, max_tokens=4, temperature=0)
        check(out.choices[0].finish_reason in ("length", "stop"), "a completion with the loaded prefix")
        r = httpx.post(f"{url}/v1/load_lora_adapter", headers=auth,
                       json={"lora_name": "escape", "lora_path": "../.."})
        check(r.status_code == 403, f"a path outside --adapter-root is refused ({r.status_code})")
        r = httpx.post(f"{url}/v1/unload_lora_adapter", headers=auth, json={"lora_name": "prefix"})
        check(r.status_code == 200, "unload_lora_adapter")
        try:
            client.completions.create(model="prefix", prompt=prompt, max_tokens=4)
            check(False, "an unloaded adapter is not found")
        except openai.NotFoundError:
            check(True, "an unloaded adapter is openai.NotFoundError")
        try:
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
            check(False, "a wrong key is refused")
        except openai.AuthenticationError:
            check(True, "a wrong key is openai.AuthenticationError")

        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        check(code == 0, f"SIGTERM stops the server cleanly (exit {code})")
        server = None

        if args.encoder:
            server = subprocess.Popen(
                [args.peft, "serve", "--model", args.encoder, "--served-model-name", "minilm",
                 "--port", "0"],
                stdout=subprocess.PIPE, text=True,
            )
            url = server.stdout.readline().strip().rsplit(" ", 1)[-1]
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
            texts = ["Hello world", "Effective but too tepid biopic"]
            packed = client.embeddings.create(model="minilm", input=texts)
            plain = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
            a = [d.embedding for d in packed.data]
            b = [d.embedding for d in plain.data]
            check(len(a) == 2 and len(a[0]) == 384, "embeddings.create gives 2 vectors of 384")
            diff = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
            check(diff < 1e-6, f"base64 and float embeddings agree ({diff:.1e})")
            norm = sum(x * x for x in b[0]) ** 0.5
            check(abs(norm - 1) < 1e-4, f"embeddings are normalised ({norm:.6f})")
            server.send_signal(signal.SIGTERM)
            check(server.wait(timeout=60) == 0, "the encoder server stops cleanly")
            server = None
    finally:
        if server is not None:
            server.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
