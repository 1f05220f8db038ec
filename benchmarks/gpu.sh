#!/usr/bin/env bash
# The GPU run of dp-microclip, for a machine that has a copy of this repository and no internet.
#
#   bash benchmarks/gpu.sh [--out DIR] [--device cuda|cpu] [--quick] [--realsize-only] [-- ARGS for python -m benchmarks.gpu]
#
# 1. finds a python whose torch imports (and sees CUDA for --device cuda; $PYTHON overrides), says
#    clearly what is missing, installs wheels carried in .whl/ (or $WHEELS) that do not import yet
#    (pip --no-index --no-deps, into a private folder), and uses this checkout through PYTHONPATH
#    (nothing is installed into the system);
# 2. runs `python -m benchmarks.gpu` section by section, each under a hard `timeout`
#    (env 45 s, correctness 150 s, bench 270 s, realsize 230 s), so one hung case cannot eat
#    the rest; a section that fails or times out is reported and the next one still runs;
#    realsize (`python -m benchmarks.realsize`: GPT-2 small 124M and a LLaMA-style 162M, B=16, T=512,
#    bf16, AdamW; plain, engine b=1/b=8 noise-free and DP, Opacus ghost) writes realsize.md/.json;
#    --realsize-only runs just it (under 4 minutes on one H100/H200); --quick makes it the tiny CPU smoke;
# 3. writes everything to DIR (default $OUT, else benchmarks/results/gpu): gpu-env.json,
#    gpu-correctness.md/.json, gpu-bench.md/.json, gpu-summary.md and gpu.log (7 files), and prints a summary.
#
# CPU smoke path (what CI tests): bash benchmarks/gpu.sh --device cpu --quick --out /tmp/gpu-smoke
set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
DEVICE=cuda
QUICK=()
REALSIZE_ONLY=0
OUT_DIR="${OUT:-}"
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT_DIR="$2"; shift 2 ;;
    --device) DEVICE="$2"; shift 2 ;;
    --quick) QUICK=(--quick); shift ;;
    --realsize-only) REALSIZE_ONLY=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument $1 (see --help)"; exit 2 ;;
  esac
done
OUT_DIR="${OUT_DIR:-$REPO/benchmarks/results/gpu}"
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG="$OUT_DIR/gpu.log"
exec > >(tee -a "$LOG") 2>&1
T_ENV=${T_ENV:-45}
T_CORRECTNESS=${T_CORRECTNESS:-150}
T_BENCH=${T_BENCH:-270}
T_REALSIZE=${T_REALSIZE:-230}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
START=$(date +%s)
echo "== dp-microclip gpu.sh: $(date -Is) device=$DEVICE quick=${QUICK[*]:-no} out=$OUT_DIR repo=$REPO"

# ---------------------------------------------------------------- python and torch
probe='import sys, torch; print(torch.__version__, torch.cuda.is_available())'
PY=""
for cand in ${PYTHON:-} python3 "$REPO/.venv/bin/python" python; do
  command -v "$cand" >/dev/null 2>&1 || [ -x "$cand" ] || continue
  if res=$("$cand" -c "$probe" 2>/dev/null); then
    echo "  $cand: torch ${res% *}, cuda available: ${res#* }"
    if [ "$DEVICE" = cpu ] || [ "${res#* }" = True ]; then PY="$cand"; break; fi
    [ -z "$PY" ] && FALLBACK="$cand"
  else
    echo "  $cand: no torch ($("$cand" -c 'import torch' 2>&1 | tail -1))"
  fi
done
if [ -z "$PY" ]; then
  if [ -n "${FALLBACK:-}" ]; then
    echo "MISSING: CUDA. torch imports under ${FALLBACK} but torch.cuda.is_available() is False"
    echo "  (a CPU-only torch build, or no driver/GPU visible). Check nvidia-smi; or run --device cpu."
    "$FALLBACK" -c 'import torch; print("  torch", torch.__version__, "built for CUDA", torch.version.cuda)'
  else
    echo "MISSING: torch. No python here imports torch: install PyTorch (a CUDA build) for python3,"
    echo "  or carry its wheels in .whl/ and set PYTHON to the python to use."
  fi
  exit 3
fi
echo "  using $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"

# ---------------------------------------------------------------- carried wheels, then this checkout
SITE="${TMPDIR:-/tmp}/dp-microclip-site"
WHEELS="${WHEELS:-$REPO/.whl}"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  need=()
  for whl in "$WHEELS"/*.whl; do
    mod=$(basename "$whl" | cut -d- -f1 | tr 'A-Z-' 'a-z_')
    if "$PY" -c "import $mod" >/dev/null 2>&1; then
      echo "  wheel $(basename "$whl"): $mod already imports, not installed"
    else
      need+=("$whl")
    fi
  done
  if [ ${#need[@]} -gt 0 ]; then
    echo "  installing ${#need[@]} carried wheel(s) into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${need[@]}" \
      || echo "  WARNING: pip could not install the carried wheels (the rows that need them will say so)"
    # Opacus' wheel ships a top-level package named `benchmarks`: never let it shadow this repository's.
    rm -rf "$SITE/benchmarks"
  fi
fi
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'EOF'
import importlib
for mod, why in (("numpy", "REQUIRED"), ("scipy", "REQUIRED (dp_microclip's accounting)"),
                 ("dp_microclip", "REQUIRED (this checkout, through PYTHONPATH)"),
                 ("opacus", "optional: the Opacus rows (carry opacus-1.6.0-py3-none-any.whl in .whl/)"),
                 ("transformers", "optional: the BERT / GPT-2 / LLaMA rows")):
    try:
        m = importlib.import_module(mod)
        print(f"  {mod} {getattr(m, '__version__', '?')}")
    except Exception as err:
        print(f"MISSING: {mod} ({why}): {type(err).__name__}: {err}")
EOF
if ! "$PY" -c 'import dp_microclip, benchmarks.gpu' 2>/dev/null; then
  echo "MISSING: dp_microclip or benchmarks.gpu does not import from $REPO:"
  "$PY" -c 'import dp_microclip, benchmarks.gpu' 2>&1 | tail -3
  exit 3
fi

# ---------------------------------------------------------------- sections, each under a hard timeout
TIMEOUT=()
command -v timeout >/dev/null 2>&1 && TIMEOUT=(timeout --kill-after=15)
run_section() {  # name, seconds
  local name=$1 secs=$2 budget=$(( $2 * 3 / 4 )) rc t0
  t0=$(date +%s)
  echo "== section $name (limit ${secs} s, new cases stop after ${budget} s)"
  if [ ${#TIMEOUT[@]} -gt 0 ]; then
    "${TIMEOUT[@]}" "$secs" "$PY" -m benchmarks.gpu --sections "$name" --device "$DEVICE" --out "$OUT_DIR" \
      --budget-s "$budget" "${QUICK[@]}" "${EXTRA[@]}"
  else
    "$PY" -m benchmarks.gpu --sections "$name" --device "$DEVICE" --out "$OUT_DIR" --budget-s "$budget" \
      "${QUICK[@]}" "${EXTRA[@]}"
  fi
  rc=$?
  case $rc in
    0) echo "== section $name done in $(( $(date +%s) - t0 )) s" ;;
    124|137) echo "== section $name TIMED OUT after ${secs} s (its files hold the cases it finished)"
             printf '## section %s TIMED OUT after %s s\n\n' "$name" "$secs" >>"$OUT_DIR/gpu-summary.md" ;;
    *) echo "== section $name FAILED (exit $rc) after $(( $(date +%s) - t0 )) s"
       printf '## section %s FAILED (exit %s)\n\n' "$name" "$rc" >>"$OUT_DIR/gpu-summary.md" ;;
  esac
  return 0
}
run_realsize() {  # seconds: GPT-2 small and LLaMA-160M (tiny with --quick), its own script and timeout
  local secs=$1 rc t0 tiny=()
  t0=$(date +%s)
  [ ${#QUICK[@]} -gt 0 ] && tiny=(--tiny)
  echo "== section realsize (limit ${secs} s)"
  if [ ${#TIMEOUT[@]} -gt 0 ]; then
    "${TIMEOUT[@]}" "$secs" "$PY" -m benchmarks.realsize --device "$DEVICE" --out "$OUT_DIR" \
      --budget-s $(( secs * 3 / 4 )) "${tiny[@]}"
  else
    "$PY" -m benchmarks.realsize --device "$DEVICE" --out "$OUT_DIR" --budget-s $(( secs * 3 / 4 )) "${tiny[@]}"
  fi
  rc=$?
  case $rc in
    0) echo "== section realsize done in $(( $(date +%s) - t0 )) s"
       { echo; cat "$OUT_DIR/realsize.md"; echo; } >>"$OUT_DIR/gpu-summary.md" ;;
    124|137) echo "== section realsize TIMED OUT after ${secs} s (realsize.md holds the methods it finished)"
             printf '## section realsize TIMED OUT after %s s\n\n' "$secs" >>"$OUT_DIR/gpu-summary.md" ;;
    *) echo "== section realsize FAILED (exit $rc)"
       printf '## section realsize FAILED (exit %s)\n\n' "$rc" >>"$OUT_DIR/gpu-summary.md" ;;
  esac
  return 0
}
if [ "$REALSIZE_ONLY" = 1 ]; then
  run_realsize "$T_REALSIZE"
else
  run_section env "$T_ENV"
  run_section correctness "$T_CORRECTNESS"
  run_section bench "$T_BENCH"
  run_realsize "$T_REALSIZE"
fi

echo
echo "== summary ($(( $(date +%s) - START )) s in all); files in $OUT_DIR:"
ls -1 "$OUT_DIR"
echo
cat "$OUT_DIR/gpu-summary.md" 2>/dev/null
[ -f "$OUT_DIR/gpu-bench.md" ] && sed -n '/^## Summary/,/^## [^S]/p' "$OUT_DIR/gpu-bench.md" | sed '$d'
exit 0
