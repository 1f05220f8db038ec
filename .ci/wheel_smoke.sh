#!/usr/bin/env bash
# Wheel smoke test: build the wheel, install it into a fresh venv, and run it from outside the checkout.
#
#   PYTHON=.venv/bin/python bash .ci/wheel_smoke.sh      (or `make wheel-smoke`; .ci/run calls it after `make test`)
#
# Offline and fast (about 30 s on 2 CPU cores), by design:
# - The wheel is built with `pip wheel --no-deps --no-build-isolation`, so the build backend is the setuptools
#   already in the project venv: no download of a build environment.
# - The fresh venv gets the wheel with `--no-deps`. Its dependencies (torch==2.13.0, opacus, numpy, scipy) are not
#   reinstalled: a .pth file appends the project venv's site-packages to sys.path, AFTER the fresh venv's own
#   site-packages. A path line in a .pth file does not run that directory's own .pth files, so the project's
#   editable-install hook stays off and `dp_microclip` can only come from the wheel (checked below).
#   `--system-site-packages` would not do: it exposes the base interpreter's packages, which lack torch.
# - Every check runs in an empty temporary directory, so the checkout is never on sys.path.
# Fails (exit status != 0) when any check fails; prints the time taken.
set -euo pipefail
start=$SECONDS
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-.venv/bin/python}
PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

rm -rf "$ROOT/build"  # setuptools' staging folder (ignored by git): a file left there by an older build would ship
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$ROOT"
WHEEL=$(ls "$WORK"/dist/dp_microclip-*.whl)
echo "built $(basename "$WHEEL")"
# The wheel holds the two library packages and nothing else from the checkout.
"$PYTHON" - "$WHEEL" <<'EOF'
import sys, zipfile
tops = {name.split("/")[0] for name in zipfile.ZipFile(sys.argv[1]).namelist()}
packages = {t for t in tops if not t.endswith(".dist-info")}
assert packages == {"dp_microclip", "accounting"}, f"the wheel holds {sorted(packages)}; expected dp_microclip and accounting"
EOF

echo "($((SECONDS - start)) s) fresh venv"
"$PYTHON" -m venv "$WORK/venv"
SITE=$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
DEPS=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$DEPS" > "$SITE/zz_project_dependencies.pth"
"$WORK/venv/bin/python" -m pip install -q --no-deps --no-index "$WHEEL"

mkdir "$WORK/elsewhere" && cd "$WORK/elsewhere"
PY="$WORK/venv/bin/python"
EXE="$WORK/venv/bin/dp-microclip"

"$PY" - "$SITE" <<'EOF'
import importlib.util, sys
site = sys.argv[1]
import accounting, dp_microclip
for module in (dp_microclip, accounting):
    assert module.__file__.startswith(site), f"{module.__name__} imported from {module.__file__}, not from the wheel"
# (Opacus installs a top-level package named benchmarks, so look for the checkout's module benchmarks.bench.)
for name in ("benchmarks.bench", "tutorials", "experiments"):
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:
        spec = None
    assert spec is None, f"{name} is importable next to the installed wheel, from {spec.origin}"
print(f"import dp_microclip {dp_microclip.__version__} and accounting from the wheel")
EOF

help=$("$EXE" --help)
[[ $help == "usage: dp-microclip "* ]] || { echo "dp-microclip --help printed: $help"; exit 1; }
echo "dp-microclip --help"

"$EXE" epsilon --sample-rate 0.01 --noise-multiplier 1.0 --steps 100 --delta 1e-5 --accountant rdp --json \
  | "$PY" -c 'import json, sys; eps = json.load(sys.stdin)["epsilon"]; assert 0 < eps < 10, eps; print(f"dp-microclip epsilon: {eps:.4f}")'

# demo and bench need a source checkout: from the wheel they must say so (exit 2), not fail with a traceback.
for command in demo bench; do
  set +e; err=$("$EXE" "$command" 2>&1 >/dev/null); status=$?; set -e
  [[ $status -eq 2 && $err == *"source checkout"* && $err != *Traceback* ]] \
    || { echo "dp-microclip $command from the wheel: status $status, $err"; exit 1; }
  echo "dp-microclip $command says it needs a source checkout"
done

"$PY" - <<'EOF'
import torch, torch.nn.functional as F
import dp_microclip
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
engine = dp_microclip.attach(model, optimizer, micro_batch_size=2, max_grad_norm=0.01)
before = [p.detach().clone() for p in model.parameters()]
x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
optimizer.zero_grad()
F.cross_entropy(model(x), y).backward()
optimizer.step()  # the engine writes p.grad = mean of the clipped micro-batch gradients, then SGD steps
norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
assert norm <= 0.01 * (1 + 1e-5), f"the averaged clipped gradient has norm {norm} > C = 0.01"
assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters())), "the step changed nothing"
engine.detach()
print(f"one engine step: gradient norm {norm:.4g} <= C = 0.01")
EOF
echo "wheel smoke test passed in $((SECONDS - start)) s"
