#!/usr/bin/env bash
# Every GPU check of the project in one script, under 8 minutes on one GPU (issue 13):
#   bash benchmarks/gpu_check.sh          # results in benchmarks/results/gpu/ (or $OUT/gpu/)
# Steps, each under its own timeout so that one slow part cannot eat the budget
# (60 + 2 x 75 + 150 + 240 + 120 s = 12 min at the very worst; about 6-7 min expected):
#   1. tests/test_devices.py on cuda: every registered rule, float64 and float32, equals the CPU;
#      every optimizer class with each of torch's kernels follows its functional rule; vmap,
#      torch.compile and a small study on cuda equal the CPU's.
#   2. python -m verification --quick --device cuda, in float64 and in float32 (JSON reports).
#   3. python -m verification --device cuda on two problems (the full set of checks there).
#   4. benchmarks/gpu_bench.sh: the optimizer classes on cuda against the functional rules and
#      torch.optim (bit for bit at hypergrad_lr=0, compiled steps), then bench_optim.py's tables.
#   5. benchmarks/bench_studies.py on cuda: S = 256 and 1024 seeds in one vmap against a Python
#      loop of single runs (target >= 100x).
# Without a CUDA device it stops at once with exit status 2 and says so. The exit status is the
# number of steps that failed (0: all passed); the summary lists them.
set -uo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
[ -x "$py" ] || py=python3
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check.sh: no CUDA device visible to torch ($("$py" -c 'import torch; print("torch", torch.__version__, "cuda build", torch.version.cuda)' 2>&1)); nothing was run." >&2
    exit 2
fi
out="${OUT:-benchmarks/results}/gpu"
mkdir -p "$out"
failed=()
start=$(date +%s)

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $out/NAME.log, record a failure
    local name=$1 limit=$2
    shift 2
    local t0=$(date +%s)
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local status=$?
    tail -n 5 "$out/$name.log"
    echo "== $name: exit $status after $(( $(date +%s) - t0 ))s"
    [ "$status" -eq 0 ] || failed+=("$name (exit $status)")
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
    "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} | tee "$out/env.txt"

step tests 60 "$py" -m pytest -q -x -p no:cacheprovider tests/test_devices.py -k cuda
step verify_quick_float64 75 "$py" -m verification --quick --device cuda --no-progress \
    --json "$out/verify_quick_float64.json"
step verify_quick_float32 75 "$py" -m verification --quick --device cuda --dtype float32 \
    --no-progress --json "$out/verify_quick_float32.json"
step verify_full_two_problems 150 "$py" -m verification --device cuda --no-progress \
    --problems quadratic relu_mlp --json "$out/verify_full.json"
step optimizers 240 env OUT="$out" bash benchmarks/gpu_bench.sh
# the synthetic classification problem (MNIST is not on the GPU machine), S = 256 then 1024
step studies 120 bash -c 'for seeds in 256 1024; do
    "$0" benchmarks/bench_studies.py --device cuda --seeds "$seeds" --steps 20 --loop-steps 5 \
        --problems classification --repeat 1 || exit 1
done' "$py"

echo
echo "gpu_check.sh: $(( $(date +%s) - start ))s in all; logs and reports in $out"
if [ ${#failed[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit ${#failed[@]}
fi
echo "all steps passed"
