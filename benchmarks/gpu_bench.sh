#!/usr/bin/env bash
# The speed issue's measurements on a lent, offline GPU machine (the `device` tool), in ONE call,
# then the default model's training (benchmarks/gpu_continue.sh) with the minutes left.
#
#   bash benchmarks/gpu_bench.sh prepare          # here (registries reachable): .whl/ and .devdata/
#   bash benchmarks/gpu_bench.sh run MINUTES      # there, carry [".whl", ".devdata"], timeout_s = 60 * MINUTES
#
# `run` writes to $OUT: bench_cuda.{json,md} (sdseg3d bench on the GPU: tiny, paper, sd-v1, DDIM,
# SwinUNETR, FLOP/s against a matmul), precision_cuda.json and precision_cpu.json (bf16 against fp32,
# per-organ Dice on the test phantoms and the real CT, on the GPU and on the machine's CPU, which has
# AMX), bench_cpu2.{json,md} (sdseg3d bench on 2 of its CPU cores: the "<= 60 s on 2 cores with bf16"
# target), stability.json (sdseg3d stability of the default model, 10 seeds, test phantoms, on the GPU),
# and, with the minutes left, training as `gpu_continue.sh train` writes it (run.log, run/). The CPU
# measurements run beside the GPU ones, pinned to cores the GPU jobs do not use.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
    bash benchmarks/gpu_continue.sh prepare
    ;;
run)
    minutes="${2:?give the minutes of the call, e.g. 9}"
    : "${OUT:?the device tool sets OUT, the folder whose files come back}"
    start=$(date +%s)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    lscpu | grep -E "Model name|^CPU\(s\)|amx|avx512_bf16" | cut -c1-200 || true
    cores=$(nproc)
    sdseg() { python3 -m sdseg_monai.cli "$@"; }
    phantoms=/tmp/phantoms
    sdseg phantom -o "$phantoms" --n 8 --seed 9000 --split test >/dev/null

    # CPU, beside the GPU: 2 cores for the 2-core target, 4 for the precision check.
    (taskset -c 0-1 env OMP_NUM_THREADS=2 timeout 300 python3 -m sdseg_monai.cli bench --device cpu --networks tiny --no-peer \
        --real-ct .devdata/ct --json "$OUT/bench_cpu2.json" --markdown "$OUT/bench_cpu2.md" -q >"$OUT/bench_cpu2.log" 2>&1 || true) &
    (taskset -c 2-5 env OMP_NUM_THREADS=4 timeout 400 python3 benchmarks/precision_dice.py --device cpu --precision bf16 \
        --phantoms "$phantoms" --real-ct .devdata/ct --json "$OUT/precision_cpu.json" >"$OUT/precision_cpu.log" 2>&1 || true) &

    gpu_cores="6-$((cores - 1))"
    taskset -c "$gpu_cores" timeout 240 python3 -m sdseg_monai.cli bench --device cuda --real-ct .devdata/ct \
        --json "$OUT/bench_cuda.json" --markdown "$OUT/bench_cuda.md" >"$OUT/bench_cuda.log" 2>&1 || true
    taskset -c "$gpu_cores" timeout 90 python3 benchmarks/precision_dice.py --device cuda --precision bf16 \
        --phantoms "$phantoms" --real-ct .devdata/ct --json "$OUT/precision_cuda.json" >"$OUT/precision_cuda.log" 2>&1 || true
    taskset -c "$gpu_cores" timeout 150 python3 -m sdseg_monai.cli stability -m sdseg_monai/default_model \
        --manifest "$phantoms/manifest.json" --data-root "$phantoms" --split test --seeds 10 --device cuda \
        --json "$OUT/stability.json" -q >"$OUT/stability.log" 2>&1 || true
    wait

    left=$(python3 -c "print(round(($minutes * 60 - ($(date +%s) - $start)) / 60 - 0.5, 1))")
    echo "measurements done; $left minutes left for training"
    if python3 -c "import sys; sys.exit(0 if $left >= 4 else 1)"; then
        bash benchmarks/gpu_continue.sh train "$left" || true
    fi
    ;;
*)
    sed -n '2,15p' "$0"
    exit 2
    ;;
esac
