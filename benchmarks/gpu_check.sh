#!/usr/bin/env bash
# One GPU check for a bare machine, from a fresh checkout, in at most 8 minutes of wall time:
#
#   benchmarks/gpu_check.sh OUT            # run everything, results under OUT/
#   benchmarks/gpu_check.sh OUT --dry-run  # only check that every step's command exists, run nothing
#   benchmarks/gpu_check.sh --find-cuda    # print the CUDA toolkit this script would use, and exit
#
# Steps (each one's wall time is printed, and each runs under its share of the 8 minutes):
#   1. what is installed (python, torch and its CUDA, triton, the GPU); torch is never reinstalled
#   2. CUDA_HOME: the real toolkit, even when `nvcc` on the PATH is a wrapper outside it (a candidate is
#      a folder with include/cuda_runtime.h and bin/nvcc: $CUDA_HOME, the folder above the resolved nvcc,
#      the TOP that `nvcc --dryrun` reports, /usr/local/cuda*, the nvidia-cuda-nvcc pip packages)
#   3. the package with its CUDA kernels: TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation -e ".[test]"
#      (--no-deps when every dependency is already importable: such machines often have no index)
#   4. the CUDA tests (every test whose id names cuda)
#   5. the kernel benchmarks -> OUT/kernels.json (kernel times vs eager, torch.compile and the traffic floor)
#   6. the training-step benchmarks without the compile variants -> OUT/train.json
#   7. the traffic model (OUT/traffic.md), the static gate table (OUT/static_gate.md: compiled in the
#      background from the start, CPU only), and the report with both appended (OUT/report/report.md, charts)
# A step that runs out of its time gets SIGINT: pytest-benchmark still writes the cases that finished.
# Without a GPU it runs the same steps at smoke size (LADDER_BENCH_SMOKE=1), skips the CUDA install and
# says so loudly: CI runs it that way (tests/test_gpu_check.py) so that it cannot rot.
set -euo pipefail
cd "$(dirname "$0")/.."

START=$SECONDS
PY=${PYTHON:-python}
DRY=0
FIND_ONLY=0
OUT=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --find-cuda) FIND_ONLY=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    -*) echo "gpu_check: unknown option $arg" >&2; exit 2 ;;
    *) OUT=$arg ;;
  esac
done

is_toolkit() { [ -n "$1" ] && [ -f "$1/include/cuda_runtime.h" ] && [ -x "$1/bin/nvcc" ]; }

find_cuda_home() {
  local cands=() nvcc_path top d
  [ -n "${CUDA_HOME:-}" ] && cands+=("$CUDA_HOME")
  [ -n "${CUDA_PATH:-}" ] && cands+=("$CUDA_PATH")
  if nvcc_path=$(command -v nvcc 2>/dev/null); then
    cands+=("$(dirname "$(dirname "$(readlink -f "$nvcc_path")")")")
    # A wrapper (ccache, a module system's shim, a conda script) hides the toolkit; nvcc itself knows it.
    local tmp
    tmp=$(mktemp -d)
    : > "$tmp/x.cu"
    top=$(cd "$tmp" && timeout 20 nvcc --dryrun -c x.cu 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1 || true)
    rm -rf "$tmp"
    [ -n "$top" ] && cands+=("$(readlink -f "$top/..")" "$(readlink -f "$top")")
  fi
  for d in /usr/local/cuda /usr/local/cuda-*; do [ -d "$d" ] && cands+=("$d"); done
  # pip's nvidia-cuda-nvcc packages (site-packages/nvidia/cuda_nvcc, nvidia/cu13, ...)
  local site
  site=$("$PY" -c "import site; print(' '.join(site.getsitepackages() + [site.getusersitepackages()]))" \
    2>/dev/null || true)
  for s in $site; do
    for d in "$s"/nvidia/cuda_nvcc "$s"/nvidia/cu* "$s"/nvidia/*/; do [ -d "$d" ] && cands+=("${d%/}"); done
  done
  for d in "${cands[@]}"; do
    if is_toolkit "$d"; then readlink -f "$d"; return 0; fi
  done
  return 1
}

if [ "$FIND_ONLY" = 1 ]; then
  find_cuda_home || { echo "no CUDA toolkit found (need include/cuda_runtime.h and bin/nvcc)" >&2; exit 1; }
  exit 0
fi
[ -n "$OUT" ] || { echo "usage: benchmarks/gpu_check.sh OUT [--dry-run]" >&2; exit 2; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

HAS_GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
# Seconds for the whole check: 8 minutes on the GPU machine. At smoke size on a small CPU machine (CI's
# 2 cores) the same steps take longer (the CPU training steps, Triton's interpreter): 20 minutes, and
# every step's share x 3.
if [ "$HAS_GPU" = 1 ]; then SCALE=1; else SCALE=3; fi
BUDGET=${LADDER_GPU_CHECK_BUDGET:-$((SCALE == 1 ? 480 : 1200))}
if [ "$HAS_GPU" != 1 ]; then
  export LADDER_BENCH_SMOKE=1
  cat <<'EOF'
###########################################################################################
##  NO CUDA GPU HERE: gpu_check runs every step at SMOKE SIZE (LADDER_BENCH_SMOKE=1) and  ##
##  skips the CUDA build. Its timings mean nothing; it only proves the script still runs. ##
###########################################################################################
EOF
fi
# The GPU machine has 16 cores: let Inductor compile in parallel (benchmarks/conftest.py defaults to 1).
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$( [ "$HAS_GPU" = 1 ] && echo 16 || echo 1 )}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}

FAILED=()
# step NAME SHARE CMD...: run CMD with at most SHARE seconds (and never past the budget), print its time.
step() {
  local name=$1 share=$(($2 * SCALE))
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  local limit=$(( share < left ? share : left ))
  echo
  echo "== [$((SECONDS - START)) s] $name (limit ${limit} s)"
  echo "   $*"
  if [ "$DRY" = 1 ]; then
    command -v "$1" >/dev/null || { echo "   MISSING: $1"; FAILED+=("$name"); }
    return 0
  fi
  if [ "$limit" -le 5 ]; then echo "   SKIPPED: out of time"; FAILED+=("$name (no time)"); return 0; fi
  local t0=$SECONDS rc=0
  # SIGINT first: pytest stops as on Ctrl-C and still runs its session end, so pytest-benchmark writes
  # the JSON of the cases that finished; a step that ignores it is killed 20 s later.
  timeout -s INT --kill-after=20 "$limit" "$@" || rc=$?
  echo "== $name: $((SECONDS - t0)) s, exit $rc"
  if [ "$rc" != 0 ]; then FAILED+=("$name (exit $rc)"); fi
  return 0
}

# A module or file a step needs, for --dry-run (and a clear error otherwise).
need_module() {
  "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null \
    || { echo "   MISSING python module: $1"; FAILED+=("module $1"); }
}

# The static gate compiles for the GPU on the CPU (no device needed): it runs beside the other steps.
GATE_PID=""
if [ "$DRY" = 1 ]; then
  echo "== static gate table, in the background: $PY -m benchmarks.static_gate $OUT/static_gate.md"
else
  echo "== [0 s] static gate table, in the background -> $OUT/static_gate.md ($OUT/static_gate.log)"
  (timeout -s INT 300 "$PY" -m benchmarks.static_gate "$OUT/static_gate.md" > "$OUT/static_gate.log" 2>&1) &
  GATE_PID=$!
fi

echo "== [0 s] what is installed"
"$PY" - <<'EOF' || true
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "triton", "numpy", "transformers", "pytest", "pytest_benchmark", "matplotlib"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')}")
    except Exception as exc:
        print(f"{name}: missing ({type(exc).__name__})")
try:
    import torch
    print("torch CUDA", torch.version.cuda, "| GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
except Exception:
    pass
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

if [ "$HAS_GPU" = 1 ]; then
  if CUDA_HOME_FOUND=$(find_cuda_home); then
    export CUDA_HOME=$CUDA_HOME_FOUND
    export PATH="$CUDA_HOME/bin:$PATH"
    echo "CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -n1))"
  else
    echo "WARNING: no CUDA toolkit found: the CUDA kernels cannot be built (LADDER_KERNELS_CUDA=0)"
    export LADDER_KERNELS_CUDA=0
  fi
  DEPS_OK=$("$PY" -c "
import importlib.util as u
mods = ['numpy', 'transformers', 'safetensors', 'tqdm', 'PIL', 'pytest', 'pytest_benchmark', 'hypothesis', 'matplotlib']
print(int(all(u.find_spec(m) for m in mods)))" 2>/dev/null || echo 0)
  NODEPS=$([ "$DEPS_OK" = 1 ] && echo --no-deps || true)
  step "install with the CUDA kernels" 150 env TORCH_CUDA_ARCH_LIST=9.0 "$PY" -m pip install -q \
    --no-build-isolation $NODEPS -e ".[test]"
  step "CUDA tests" 90 "$PY" -m pytest tests -q -x -p no:cacheprovider -k cuda
else
  echo "(no GPU: the CUDA build and the CUDA tests are skipped)"
  if [ "$DRY" = 1 ]; then need_module pytest; need_module pytest_benchmark; fi
fi

if [ "$DRY" = 1 ]; then
  need_module ladder_kernels
  for f in benchmarks/report.py benchmarks/static_gate.py benchmarks/traffic.py benchmarks/bench_train_step.py; do
    [ -f "$f" ] || { echo "   MISSING file: $f"; FAILED+=("$f"); }
  done
fi
step "kernel benchmarks" 200 "$PY" -m pytest benchmarks -q -p no:cacheprovider \
  --ignore=benchmarks/bench_train_step.py --benchmark-json="$OUT/kernels.json"
step "training-step benchmarks (no compile variants)" 90 "$PY" -m pytest benchmarks/bench_train_step.py -q \
  -p no:cacheprovider -k "not compile" --benchmark-json="$OUT/train.json"
step "traffic model" 10 "$PY" -m benchmarks.traffic "$OUT/traffic.md"
if [ -n "$GATE_PID" ]; then
  t0=$SECONDS
  rc=0
  wait "$GATE_PID" || rc=$?
  echo "== static gate table: waited $((SECONDS - t0)) s, exit $rc"
  tail -n 2 "$OUT/static_gate.log" || true
  [ "$rc" = 0 ] || FAILED+=("static gate (exit $rc, see static_gate.md)")
fi
reports=()
for f in "$OUT/kernels.json" "$OUT/train.json"; do [ -s "$f" ] && reports+=("$f"); done
if [ "$DRY" = 1 ] || [ ${#reports[@]} -gt 0 ]; then
  step "report" 40 "$PY" -m benchmarks.report "${reports[@]:-$OUT/kernels.json}" --out "$OUT/report" \
    --append "$OUT/static_gate.md" "$OUT/traffic.md"
else
  echo "no benchmark JSON to report on"; FAILED+=("report (no JSON)")
fi
echo
echo "== gpu_check finished in $((SECONDS - START)) s ($([ "$HAS_GPU" = 1 ] && echo GPU || echo 'NO GPU: smoke size'))"
[ "$DRY" = 1 ] || ls -la "$OUT"
if [ ${#FAILED[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${FAILED[@]}"
  exit 1
fi
