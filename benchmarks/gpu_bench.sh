#!/usr/bin/env bash
# The optimizer benchmarks and a CUDA correctness check on one GPU, in under 5 minutes.
#   bash benchmarks/gpu_bench.sh            # writes benchmarks/results/gpu_*.md (or $OUT/...)
# Steps (each under its own timeout, so one slow part cannot eat the whole budget; at most
# 60 + 150 + 60 s, plus start-up):
#   1. CUDA check (~20 s): AdamHD / AdamWHD / SGDHD / SGDN-HD on cuda (fused and foreach) follow the
#      functional rules on cuda in float64, hypergrad_lr=0 is torch.optim bit for bit, and a
#      torch.compile'd step (dynamo, eager backend) takes the eager steps.
#   2. bench_optim.py on cuda, MLP and ResNet-18 parameter sets, with the compiled functional
#      update (~2-3 min); if that runs out of time, again without torch.compile.
# Without a CUDA device it stops at once with exit status 2 and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
[ -x "$py" ] || py=python3
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_bench.sh: no CUDA device visible to torch ($("$py" -c 'import torch; print("torch", torch.__version__, "cuda build", torch.version.cuda)' 2>&1)); nothing was run." >&2
    echo "On CPU run: python benchmarks/bench_optim.py" >&2
    exit 2
fi
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
"$py" -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$out/gpu_env.txt"

timeout 60 "$py" - <<'PY' 2>&1 | tee "$out/gpu_check.txt"
import copy, torch, hdfunc
from torch.func import functional_call, grad
from hdfunc.optim import AdamHD, AdamWHD, SGDHD, SGDNHD
dev = "cuda"
torch.manual_seed(0)
model0 = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).double().to(dev)
x = torch.randn(256, 32, dtype=torch.float64, device=dev); y = torch.randn(256, 1, dtype=torch.float64, device=dev)
cases = [(AdamHD, hdfunc.adam_hd, dict(lr=1e-2, hypergrad_lr=1e-3)),
         (AdamWHD, hdfunc.adamw_hd, dict(lr=1e-2, hypergrad_lr=1e-3, weight_decay=0.1)),
         (SGDHD, hdfunc.sgd_hd, dict(lr=1e-2, hypergrad_lr=1e-2)),
         (SGDNHD, hdfunc.sgdn_hd, dict(lr=1e-2, hypergrad_lr=1e-2, momentum=0.9))]
worst = 0.0
for cls, rule_fn, kw in cases:
    for kernel in (dict(fused=True), dict(foreach=True)):
        model = copy.deepcopy(model0)
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        rule = rule_fn(**kw); state = rule.init(params)
        loss = lambda p: ((functional_call(model, p, (x,)) - y) ** 2).mean()
        opt = cls(model.parameters(), **kw, **kernel)
        for _ in range(20):
            opt.zero_grad(); ((model(x) - y) ** 2).mean().backward(); opt.step()
            u, state = rule.update(grad(loss)(params), state, params); params = hdfunc.apply_updates(params, u)
        err = max((params[k] - v).abs().max().item() for k, v in model.named_parameters())
        rel = abs(opt.adapted_lrs()[0].item() / hdfunc.get_lr(state).item() - 1)
        worst = max(worst, err)
        print(f"{cls.__name__:8s} {kernel} param err {err:.1e}  alpha rel err {rel:.1e}")
assert worst < 1e-9, worst
for cls, base, kw in [(AdamHD, torch.optim.Adam, {}), (SGDHD, torch.optim.SGD, {})]:
    for kernel in (dict(fused=True), dict(foreach=True)):
        a = copy.deepcopy(model0).float(); b = copy.deepcopy(a)
        oa = cls(a.parameters(), lr=1e-2, hypergrad_lr=0.0, **kernel); ob = base(b.parameters(), lr=1e-2, **kernel)
        for _ in range(5):
            for m, o in ((a, oa), (b, ob)):
                o.zero_grad(); ((m(x.float()) - y.float()) ** 2).mean().backward(); o.step()
        same = all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
        print(f"{cls.__name__} hypergrad_lr=0 == {base.__name__} {kernel}: {same}")
        assert same
for cls, kernel in [(AdamHD, dict(fused=True)), (AdamHD, dict(foreach=True)), (SGDHD, dict(fused=True))]:
    torch._dynamo.reset()
    a = copy.deepcopy(model0).float(); b = copy.deepcopy(a)
    oa = cls(a.parameters(), lr=1e-2, hypergrad_lr=1e-3, **kernel); ob = cls(b.parameters(), lr=1e-2, hypergrad_lr=1e-3, **kernel)
    step = torch.compile(oa.step, backend="eager")
    for _ in range(5):
        for m, o, s in ((a, oa, step), (b, ob, ob.step)):
            o.zero_grad(); ((m(x.float()) - y.float()) ** 2).mean().backward(); s()
    err = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
    print(f"compiled {cls.__name__} {kernel}: param err vs eager {err:.1e}")
    assert err < 1e-4, err
print("CUDA check passed")
PY

timeout 150 "$py" benchmarks/bench_optim.py --device cuda --rounds 3 --min-run-time 0.3 \
    --out "$out/gpu_bench.md" 2> "$out/gpu_bench.log" || {
    echo "bench with torch.compile did not finish; rerunning without it" >&2
    timeout 60 "$py" benchmarks/bench_optim.py --device cuda --rounds 2 --min-run-time 0.2 \
        --no-compile --out "$out/gpu_bench.md" 2>> "$out/gpu_bench.log"
}
cat "$out/gpu_bench.md"
