#!/usr/bin/env bash
# Continue training the packaged default model on a lent, offline GPU machine (the `device` tool).
#
#   bash benchmarks/gpu_continue.sh prepare        # here (registries reachable): fills .whl/ and .devdata/
#   bash benchmarks/gpu_continue.sh train MINUTES [ARGS]  # there, carry [".whl", ".devdata"]: one call
#
# `train` generates the phantoms, trains from sdseg_monai/default_model at 256² (the recipe of the last
# GPU runs, see the model card) for what MINUTES leaves after the phantoms, the calibration and the
# test evaluation, and writes at most 8 files to $OUT (the log; in run/: summary, training log, test
# reports, the calibrated model as tar parts). ARGS go to train_default_model.py and override the
# recipe. Back here: `cat <files_at>/run/default_model.tar.* | tar x -C runs/`, then `sdseg3d evaluate`
# it beside the shipped model on the test phantoms.
set -euo pipefail
cd "$(dirname "$0")/.."

# What the GPU image lacks (its python is 3.12), at the versions tested here (einops: the SwinUNETR of
# `sdseg3d bench`). Not SimpleITK (52 MB, over
# what a call carries): only some tests read NRRD with it; the image has SciPy for the component filters.
PACKAGES=(monai diffusers nibabel pydicom importlib_metadata einops)

case "${1:-}" in
prepare)
    mkdir -p .git/info
    for path in /.whl/ /.devdata/; do
        grep -qxF "$path" .git/info/exclude 2>/dev/null || echo "$path" >>.git/info/exclude
    done
    pins=()
    for name in "${PACKAGES[@]}"; do
        pins+=("$name==$(python -c "import importlib.metadata as m; print(m.version('$name'))")")
    done
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${pins[@]}"
    mkdir -p .devdata/ct
    cp ../shared/data/ct/abdomen_ct_3mm.nii.gz ../shared/data/ct/abdomen_ct_3mm_labels_btcv.nii.gz .devdata/ct/
    echo "ready: ${pins[*]}; the real CT in .devdata/ct"
    du -sh .whl .devdata
    ;;
train)
    minutes="${2:?give the minutes of the call, e.g. 9}"
    shift 2
    # Below 6 the budgets below go to nothing or negative (gpu_bench.sh leaves train out then too).
    awk -v m="$minutes" 'BEGIN { exit !(m + 0 >= 6) }' || { echo "gpu_continue: train needs at least 6 minutes, got $minutes" >&2; exit 2; }
    : "${OUT:?the device tool sets OUT, the folder whose files come back}"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    # 480 training phantoms take under 2 min on 16 processes (the model does not overfit them:
    # training-phantom Dice 0.784, test 0.802); the test evaluation takes seconds on the GPU.
    budget=$(python3 -c "print(max(1.0, ($minutes - 5) * 60))")
    python3 benchmarks/train_default_model.py --out runs/gpu --device cuda --workers 16 \
        --init-from sdseg_monai/default_model --real-ct .devdata/ct --n-train 480 --n-validation 6 \
        --batch-size 128 --lr 2e-4 --warmup 50 --organ-sampling organ --organs-per-slice 4 \
        --mask-loss-weight 0 --validations 4 --sdseg-seconds "$budget" \
        --max-minutes "$(python3 -c "print($minutes - 1.5)")" --export "$OUT/run" "$@" 2>&1 | tee "$OUT/run.log"
    ;;
*)
    sed -n '2,12p' "$0"
    exit 2
    ;;
esac
