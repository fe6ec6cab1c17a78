#!/usr/bin/env bash
# The speed issue's measurements on a lent, offline GPU machine (the `device` tool), in one or two calls.
#
#   bash benchmarks/gpu_bench.sh prepare                  # here (registries reachable): .whl/ and .devdata/
#   bash benchmarks/gpu_bench.sh run SECONDS [STEPS]      # there, carry [".whl", ".devdata"], timeout_s >= SECONDS + 20
#
# STEPS, comma-separated; the default, tests,bench,cpuprofile, fits one call of 560 s (timeout_s 580):
# the GPU steps one after another (tests 150 s, bench 300 s), cpuprofile beside them on the CPU.
# GPU steps, in this order, each capped (s) and, when the call is short, given its share of what is left
# in proportion to the caps of it and the wanted GPU steps after it, so each later step keeps its part:
#   tests      150  tests/test_gpu.py: CUDA labels as the CPU's, bit-identical run to run, components as SciPy's, compiled
#   bench      300  sdseg3d bench on the GPU, fp32 beside bf16 (tiny, paper, sd-v1, pipeline plain and compiled, DDIM,
#                   SwinUNETR, matmul FLOP/s)
#   precision   60  bf16 against fp32 on the GPU: per-organ Dice on the 8 test phantoms and the real CT
#   profile    240  benchmarks/gpu_profile.py: fp32, bf16 (cast), each with diffusers' stock upsampling, compiled,
#                   bf16 decoder only, autocast; profiles
#   stability  480  sdseg3d stability of the default model, 10 seeds, the 8 test phantoms, on the GPU
# CPU steps, beside the GPU steps on cores they do not use, until the call's end:
#   cpu        sdseg3d bench on 2 cores (the "<= 60 s on 2 cores with bf16" target; the machine's CPU has AMX) and
#              bf16 against fp32 on 4 cores
#   cpuprofile on 4 cores: gpu_profile.py on the CPU (fp32, autocast bf16 with fused and with stock upsampling,
#              the cast network)
#   cpuct      on 4 cores: bf16 against fp32 on the machine's CPU, the real CT alone
# cpu, cpuprofile and cpuct share cores 2-5: give one of them per call. Last, once the CPU steps end:
#   train      the default model's training on the GPU (benchmarks/gpu_continue.sh train) with the minutes left,
#              when at least 6 (its run.log and run/ count against $OUT's 8 files: give it alone)
# Every step runs under `timeout -k 10` (a process that ignores SIGTERM, e.g. in CUDA teardown, is killed
# 10 s later), so all end by the call's SECONDS less 15 s, left to pack the logs and hand the files back.
# Reports land in $OUT as they are written (bench_cuda.{json,md}, bench_cpu2.{json,md}, precision_cuda.json,
# precision_cpu.json or precision_cpu_ct.json, stability.json: at most 7 files); the logs, the profiles'
# among them, come back as logs.tar.gz (the 8th).
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
    bash benchmarks/gpu_continue.sh prepare
    ;;
run)
    seconds="${2:?give the seconds of the call, e.g. 560}"
    steps=",${3:-tests,bench,cpuprofile},"
    : "${OUT:?the device tool sets OUT, the folder whose files come back}"
    start=$(date +%s)
    deadline=$((start + seconds - 25))  # the last step's SIGKILL 10 s before it, then 15 s to pack and hand back
    wants() { [[ "$steps" == *",$1,"* ]]; }
    left() { echo $((deadline - $(date +%s))); }
    gpu_steps=(tests bench precision profile stability)
    declare -A cap=([tests]=150 [bench]=300 [precision]=60 [profile]=240 [stability]=480)
    budget() {  # a GPU step's seconds: its cap, or its share (by caps) of what is left beside the wanted steps after it
        local step=$1 later=0 after=0 s
        for s in "${gpu_steps[@]}"; do
            if ((after)) && wants "$s"; then later=$((later + cap[$s])); fi
            [[ "$s" == "$step" ]] && after=1
        done
        s=$(($(left) * cap[$step] / (cap[$step] + later)))
        echo $((s > cap[$step] ? cap[$step] : (s < 1 ? 1 : s)))
    }
    lane() { local s; s=$(left); echo $((s < 1 ? 1 : s)); }  # a CPU step's seconds: until the deadline
    run_step() {  # STEP SECONDS COMMAND...: one GPU step, on the cores the CPU steps do not use
        local step=$1 limit=$2
        shift 2
        echo "gpu_bench: $step, at most $limit s"
        taskset -c "$gpu_cores" timeout -k 10 "$limit" "$@" >"$logs/$step.log" 2>&1 || true
    }
    logs=/tmp/gpu_bench_logs
    mkdir -p "$logs"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    lscpu | grep -E "Model name|^CPU\(s\)" | cut -c1-120 || true
    python3 -c "import torch; print('torch', torch.__version__, 'AMX', torch.cpu._is_amx_tile_supported())" || true
    gpu_cores="6-$(($(nproc) - 1))"
    phantoms=/tmp/phantoms
    phantoms_pid=
    if wants cpu || wants cpuct || wants precision || wants stability; then
        taskset -c 0-5 timeout -k 10 "$(lane)" python3 -m sdseg_monai.cli phantom -o "$phantoms" --n 8 --seed 9000 --split test >/dev/null &
        phantoms_pid=$!
    fi
    if wants tests; then
        run_step test_gpu "$(budget tests)" python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py
        grep -E "differ|passed|failed|Error" "$logs/test_gpu.log" | tail -8 || true
    fi
    if [[ -n "$phantoms_pid" ]]; then wait "$phantoms_pid" || true; fi
    cpu_lane=()
    if wants cpu; then
        taskset -c 0-1 env OMP_NUM_THREADS=2 timeout -k 10 "$(lane)" python3 -m sdseg_monai.cli bench --device cpu --networks tiny \
            --no-peer --real-ct .devdata/ct --json "$OUT/bench_cpu2.json" --markdown "$OUT/bench_cpu2.md" >"$logs/bench_cpu2.log" 2>&1 &
        cpu_lane+=($!)
        taskset -c 2-5 env OMP_NUM_THREADS=4 timeout -k 10 "$(lane)" python3 benchmarks/precision_dice.py --device cpu --precision bf16 \
            --phantoms "$phantoms" --real-ct .devdata/ct --json "$OUT/precision_cpu.json" >"$logs/precision_cpu.log" 2>&1 &
        cpu_lane+=($!)
    fi
    if wants cpuprofile; then  # autocast bf16 (as shipped on an AMX CPU) against the cast network, on 4 cores
        taskset -c 2-5 env OMP_NUM_THREADS=4 timeout -k 10 "$(lane)" python3 benchmarks/gpu_profile.py --device cpu --shape 512 512 12 \
            --variants fp32,bf16,bf16-stock,bf16-cast --repeats 1 --rows 10 >"$logs/cpu_profile.log" 2>&1 &
        cpu_lane+=($!)
    fi
    if wants cpuct; then
        taskset -c 2-5 env OMP_NUM_THREADS=4 timeout -k 10 "$(lane)" python3 benchmarks/precision_dice.py --device cpu --precision bf16 \
            --cases 0 --phantoms "$phantoms" --real-ct .devdata/ct --json "$OUT/precision_cpu_ct.json" >"$logs/precision_cpu_ct.log" 2>&1 &
        cpu_lane+=($!)
    fi
    if wants bench; then
        run_step bench_cuda "$(budget bench)" python3 -m sdseg_monai.cli bench --device cuda --precision bf16 --no-isolate \
            --real-ct .devdata/ct --json "$OUT/bench_cuda.json" --markdown "$OUT/bench_cuda.md"
    fi
    if wants precision; then
        run_step precision_cuda "$(budget precision)" python3 benchmarks/precision_dice.py --device cuda --precision bf16 \
            --phantoms "$phantoms" --real-ct .devdata/ct --json "$OUT/precision_cuda.json"
    fi
    if wants profile; then
        run_step profile "$(budget profile)" python3 benchmarks/gpu_profile.py
    fi
    if wants stability; then
        run_step stability "$(budget stability)" python3 -m sdseg_monai.cli stability -m sdseg_monai/default_model \
            --manifest "$phantoms/manifest.json" --data-root "$phantoms" --split test --seeds 10 --device cuda \
            --json "$OUT/stability.json" -q
    fi
    for pid in "${cpu_lane[@]}"; do wait "$pid" || true; done
    if wants train; then
        train_s=$(($(left) - 10))  # its own SIGKILL margin
        if ((train_s >= 360)); then
            echo "gpu_bench: train, $train_s s"
            timeout -k 10 "$train_s" bash benchmarks/gpu_continue.sh train "$((train_s / 60)).$((train_s % 60 * 10 / 60))" || true
        else
            echo "gpu_bench: train left out: $train_s s left, it needs 6 min (phantoms, calibration, evaluation, 1 min of training)"
        fi
    fi
    tar czf "$OUT/logs.tar.gz" -C "$logs" . || true
    for log in "$logs"/*.log; do echo "== $(basename "$log")"; tail -4 "$log"; done
    echo "gpu_bench: $(($(date +%s) - start)) s"
    ;;
*)
    sed -n '2,31p' "$0"
    exit 2
    ;;
esac
