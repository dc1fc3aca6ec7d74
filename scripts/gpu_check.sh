#!/usr/bin/env bash
# The GPU check: every `backend_tests!` / `autodiff_backend_tests!` body on
# CUDA and WGPU, the main job's recipe with `--backend cuda`, and the MiniLM
# bench against PEFT + PyTorch on the same GPU.
#
# Two halves, because the lent GPU machine has no Rust toolchain and no
# network (it has PyTorch, transformers and peft):
#
#   scripts/gpu_check.sh build      # here: builds everything with --features cuda,wgpu
#                                   # into .device-out/gpu/ (test binaries, peft, peft-bench,
#                                   # MiniLM + Rotten Tomatoes), compressed
#   scripts/gpu_check.sh run        # on the GPU machine (device tool: carry .device-out/gpu):
#                                   # runs them, writes logs and bench JSON to $OUT (or target/gpu-check)
#
# On a machine with both a GPU and cargo, `scripts/gpu_check.sh` does both.
set -uo pipefail
cd "$(dirname "$0")/.."
PACK=.device-out/gpu
OUT=${OUT:-target/gpu-check}
FEATURES=cuda,wgpu

build() {
    set -e
    python3 scripts/fetch_assets.py minilm rotten-tomatoes
    rm -rf "$PACK" && mkdir -p "$PACK/bin" "$PACK/assets"
    # Test binaries of the crates whose tests are backend_tests! bodies.
    local crates=(peft-core peft-lora peft-adapter peft-prefix peft-prompt peft-models)
    local args=()
    for c in "${crates[@]}"; do args+=(-p "$c"); done
    cargo test --release "${args[@]}" --features "peft-core/$FEATURES" --no-run \
        --message-format=json 2>/dev/null |
        python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        print(m["executable"])' >"$PACK/tests.txt"
    cargo build --release -p peft-cli -p peft-bench --features "peft-core/$FEATURES"
    while read -r exe; do cp "$exe" "$PACK/bin/"; done <"$PACK/tests.txt"
    cp target/release/peft target/release/peft-bench "$PACK/bin/"
    strip "$PACK"/bin/* 2>/dev/null || true
    (cd "$PACK/bin" && ls >../binaries.txt)
    tar -C "$PACK" -cJf "$PACK/bin.tar.xz" bin && rm -rf "$PACK/bin"
    local a=~/.cache/peft-rs/assets
    cp -r "$a/minilm" "$PACK/assets/"
    head -n 2000 "$a/rotten-tomatoes/rotten_tomatoes.jsonl" >"$PACK/assets/rt.jsonl"
    cp benches/peft_reference.py "$PACK/"
    du -sh "$PACK"
}

run() {
    mkdir -p "$OUT"
    nvidia-smi | tee "$OUT/nvidia-smi.txt" || true
    tar -C "$PACK" -xJf "$PACK/bin.tar.xz"
    local bin=$PACK/bin status=0
    # 1. Every test body on CUDA and WGPU (the `::cuda` / `::wgpu` cases).
    # The loop writes to the log itself (a `| tee` would run it in a
    # subshell and lose `status`).
    for t in "$bin"/*-*; do
        case "$(basename "$t")" in peft | peft-bench) continue ;; esac
        for backend in cuda wgpu; do
            echo "== $(basename "$t") ::$backend"
            "$t" "::$backend" --test-threads 1 2>&1 | tail -n 5 || status=1
        done
    done >"$OUT/tests.log"
    cat "$OUT/tests.log"
    grep -E "test result|FAILED|panicked" "$OUT/tests.log" | sort | uniq -c | tee "$OUT/tests-summary.txt"
    # 2. The main job's recipe on CUDA.
    local A=$PACK/assets
    /usr/bin/time -v "$bin/peft" train --backend cuda --method lora --model "$A/minilm" \
        --data "$A/rt.jsonl" --task seq-cls --max-train 1800 --batch 32 --lr 2e-3 \
        --out "$OUT/run-cuda" 2>&1 | tee "$OUT/train-cuda.log" || status=1
    # 3. The MiniLM bench, ours and PEFT + PyTorch on the same GPU.
    PEFT_ASSETS=$A "$bin/peft-bench" --backend cuda --device 0 --suite minilm |
        tee "$OUT/bench-ours.jsonl" || status=1
    python3 "$PACK/peft_reference.py" --model "$A/minilm" --device cuda:0 |
        tee "$OUT/bench-peft.jsonl" || status=1
    return $status
}

case "${1:-all}" in
build) build ;;
run) run ;;
all) build && run ;;
*) echo "usage: $0 [build|run|all]" >&2 && exit 2 ;;
esac
