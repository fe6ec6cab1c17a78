#!/usr/bin/env bash
# The speed issue's measurements on a lent, offline GPU machine (the `device` tool), in one or two calls.
#
#   bash benchmarks/gpu_bench.sh prepare                  # here (registries reachable): .whl/ and .devdata/
#   bash benchmarks/gpu_bench.sh run SECONDS [STEPS]      # there, carry [".whl", ".devdata"], timeout_s >= SECONDS
#
# STEPS, comma-separated (default: all but cpuct and train), each cut to what SECONDS leaves:
#   tests      tests/test_gpu.py: CUDA labels as the CPU's, bit-identical run to run, components as SciPy's, compiled
#   bench      sdseg3d bench on the GPU, fp32 beside bf16 (tiny, paper, sd-v1, pipeline, DDIM, SwinUNETR, matmul FLOP/s)
#   cpu        beside the GPU, pinned to 6 cores it does not use: sdseg3d bench on 2 cores (the "<= 60 s on
#              2 cores with bf16" target; the machine's CPU has AMX) and bf16 against fp32 on 4 cores
#   precision  bf16 against fp32 on the GPU: per-organ Dice on the 8 test phantoms and the real CT
#   stability  sdseg3d stability of the default model, 10 seeds, the 8 test phantoms, on the GPU
#   profile    benchmarks/gpu_profile.py: fp32, bf16 (cast), each with diffusers' stock upsampling, compiled,
#              bf16 decoder only, autocast; profiles
#   cpuct      beside the GPU, on 4 cores: bf16 against fp32 on the machine's CPU, the real CT alone
#   cpuprofile beside the GPU, on 4 cores: gpu_profile.py on the CPU (fp32, autocast bf16 with fused and with
#              stock upsampling, the cast network)
#   train      the default model's training (benchmarks/gpu_continue.sh train) with the minutes left
#              (after the CPU lane ends; its run.log and run/ count against $OUT's 8 files: give it alone)
# cpu, cpuprofile and cpuct share cores 2-5: give one of them per call.
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
    seconds="${2:?give the seconds of the call, e.g. 540}"
    steps=",${3:-tests,bench,cpu,precision,profile,stability},"
    : "${OUT:?the device tool sets OUT, the folder whose files come back}"
    start=$(date +%s)
    deadline=$((start + seconds - 25))  # 25 s to stop the CPU lane, pack the logs and hand the files back
    budget() { python3 -c "print(max(1, min($1, $deadline - $(date +%s))))"; }  # a step's cap, or what is left
    wants() { [[ "$steps" == *",$1,"* ]]; }
    logs=/tmp/gpu_bench_logs
    mkdir -p "$logs"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    lscpu | grep -E "Model name|^CPU\(s\)" | cut -c1-120 || true
    python3 -c "import torch; print('torch', torch.__version__, 'AMX', torch.cpu._is_amx_tile_supported())" || true
    gpu_cores="6-$(($(nproc) - 1))"
    phantoms=/tmp/phantoms
    if wants cpu || wants cpuct || wants precision || wants stability; then
        taskset -c 0-5 python3 -m sdseg_monai.cli phantom -o "$phantoms" --n 8 --seed 9000 --split test >/dev/null &
    fi
    if wants tests; then
        taskset -c "$gpu_cores" timeout "$(budget 150)" python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py \
            >"$logs/test_gpu.log" 2>&1 || true
        grep -E "differ|passed|failed|Error" "$logs/test_gpu.log" | tail -8 || true
    fi
    wait
    cpu_lane=()
    if wants cpu; then
        taskset -c 0-1 env OMP_NUM_THREADS=2 timeout "$(budget 900)" python3 -m sdseg_monai.cli bench --device cpu --networks tiny \
            --no-peer --real-ct .devdata/ct --json "$OUT/bench_cpu2.json" --markdown "$OUT/bench_cpu2.md" >"$logs/bench_cpu2.log" 2>&1 &
        cpu_lane+=($!)
        taskset -c 2-5 env OMP_NUM_THREADS=4 timeout "$(budget 900)" python3 benchmarks/precision_dice.py --device cpu --precision bf16 \
            --phantoms "$phantoms" --real-ct .devdata/ct --json "$OUT/precision_cpu.json" >"$logs/precision_cpu.log" 2>&1 &
        cpu_lane+=($!)
    fi
    if wants cpuprofile; then  # autocast bf16 (as shipped on an AMX CPU) against the cast network, on 4 cores
        taskset -c 2-5 env OMP_NUM_THREADS=4 timeout "$(budget 900)" python3 benchmarks/gpu_profile.py --device cpu --shape 512 512 12 \
            --variants fp32,bf16,bf16-stock,bf16-cast --repeats 1 --rows 10 >"$logs/cpu_profile.log" 2>&1 &
        cpu_lane+=($!)
    fi
    if wants cpuct; then
        taskset -c 2-5 env OMP_NUM_THREADS=4 timeout "$(budget 900)" python3 benchmarks/precision_dice.py --device cpu --precision bf16 \
            --cases 0 --phantoms "$phantoms" --real-ct .devdata/ct --json "$OUT/precision_cpu_ct.json" >"$logs/precision_cpu_ct.log" 2>&1 &
        cpu_lane+=($!)
    fi
    if wants bench; then
        taskset -c "$gpu_cores" timeout "$(budget 300)" python3 -m sdseg_monai.cli bench --device cuda --precision bf16 --no-isolate --real-ct .devdata/ct \
            --json "$OUT/bench_cuda.json" --markdown "$OUT/bench_cuda.md" >"$logs/bench_cuda.log" 2>&1 || true
    fi
    if wants precision; then
        taskset -c "$gpu_cores" timeout "$(budget 60)" python3 benchmarks/precision_dice.py --device cuda --precision bf16 \
            --phantoms "$phantoms" --real-ct .devdata/ct --json "$OUT/precision_cuda.json" >"$logs/precision_cuda.log" 2>&1 || true
    fi
    if wants profile; then
        taskset -c "$gpu_cores" timeout "$(budget 240)" python3 benchmarks/gpu_profile.py >"$logs/profile.log" 2>&1 || true
    fi
    if wants stability; then
        taskset -c "$gpu_cores" timeout "$(budget 900)" python3 -m sdseg_monai.cli stability -m sdseg_monai/default_model \
            --manifest "$phantoms/manifest.json" --data-root "$phantoms" --split test --seeds 10 --device cuda \
            --json "$OUT/stability.json" -q >"$logs/stability.log" 2>&1 || true
    fi
    for pid in "${cpu_lane[@]}"; do wait "$pid" || true; done
    if wants train; then
        left=$(python3 -c "print(round(($deadline - $(date +%s)) / 60, 1))")
        bash benchmarks/gpu_continue.sh train "$left" || true
    fi
    tar czf "$OUT/logs.tar.gz" -C "$logs" . || true
    for log in "$logs"/*.log; do echo "== $(basename "$log")"; tail -4 "$log"; done
    echo "gpu_bench: $(($(date +%s) - start)) s"
    ;;
*)
    sed -n '2,22p' "$0"
    exit 2
    ;;
esac
