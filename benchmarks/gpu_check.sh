#!/usr/bin/env bash
# One GPU check for a bare machine with no network, from a fresh checkout, in at most 8 minutes of wall time:
#
#   benchmarks/gpu_check.sh OUT            # run everything, results under OUT/
#   benchmarks/gpu_check.sh OUT --dry-run  # run nothing: check every step's command, and that each pytest
#                                          # selection of the GPU branch collects (no GPU needed)
#   benchmarks/gpu_check.sh --find-cuda    # print the CUDA toolkit this script would use, and exit
#
# Steps, in the order that keeps the most for the least time (each one's wall time is printed, and each
# runs under its share of the budget; OUT/report/report.md is written first and rewritten after every
# step, so a run killed at any point still leaves a report of what finished):
#   0. the static gate table (OUT/static_gate.md: every Triton launch compiled for sm_90/sm_80, CPU only)
#      in the background, and the traffic model's floors (OUT/traffic.md)
#   1. what is installed (python, torch and its CUDA, triton, the GPU); torch is never reinstalled
#   2. CUDA_HOME: the real toolkit, even when `nvcc` on the PATH is a wrapper outside it
#   3. the package, built strictly (a kernel that fails to compile fails the step), offline and without
#      dependencies (PIP_NO_INDEX=1: the GPU machine has no network; a missing dependency is named);
#      lk.backends() printed; on a GPU, Triton and the CUDA kernels must both be available
#   4. the CUDA tests: a curated subset that runs every kernel in every dtype once (tests/conftest.py,
#      LADDER_TESTS_GPU_QUICK), in parallel when pytest-xdist is there
#   5. the kernel benchmarks on CUDA tensors only, without torch.compile -> OUT/kernels.json (wall time,
#      the kernels' own time from the profiler, both against the traffic model's floor)
#   6. the training-step benchmarks (ViT-B/16 on the GPU): CoOp, the LST peer and this package's methods,
#      without the compile variants, and the side network's step on given taps -> OUT/train.json
#   7. torch.compile of each op's reference in its first case, a fresh compile per case -> OUT/compiled.json
#   8. the report with the static gate and the traffic model appended (OUT/report/report.md, charts)
# A step that runs out of its time gets SIGINT: pytest-benchmark still writes the cases that finished.
# Without a CUDA GPU the same steps run at smoke size (LADDER_BENCH_SMOKE=1) on the CPU, the CUDA build and
# tests are skipped, and it says so loudly; a GPU that nvidia-smi sees but torch does not fails at once.
set -euo pipefail
cd "$(dirname "$0")/.."

START=$SECONDS
PY=${PYTHON:-python3}
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
command -v "$PY" >/dev/null || { echo "gpu_check: no $PY on the PATH (set PYTHON=...)" >&2; exit 2; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

HAS_GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
SEEN_GPU=0
if command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then SEEN_GPU=1; fi
if [ "$SEEN_GPU" = 1 ] && [ "$HAS_GPU" != 1 ]; then
  cat >&2 <<EOF
###########################################################################################
##  gpu_check: nvidia-smi sees a GPU but torch ($PY) does not: a CPU-only torch, or a     ##
##  driver/runtime mismatch. Refusing to fall back to smoke mode on a GPU machine.        ##
###########################################################################################
EOF
  nvidia-smi -L >&2 || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" >&2 || true
  [ "$DRY" = 1 ] || exit 3
fi
# Seconds for the whole check: 7.5 minutes on the GPU machine (16 cores). At smoke size on a small CPU
# machine (CI's 2 cores) the same steps take longer (CPU training steps, Triton's interpreter): 20
# minutes, and every step's share x 3.
if [ "$HAS_GPU" = 1 ]; then SCALE=1; else SCALE=3; fi
BUDGET=${LADDER_GPU_CHECK_BUDGET:-$((SCALE == 1 ? 450 : 1200))}
if [ "$HAS_GPU" = 1 ]; then BENCH_DEVICES=cuda; else BENCH_DEVICES=cpu; fi
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
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1

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

# collects NAME ENV... -- PYTEST-ARGS: in a dry run, prove a pytest selection collects (and is not empty).
collects() {
  local name=$1
  shift
  local out rc=0
  out=$(env "$@" --collect-only -q -p no:cacheprovider 2>&1) || rc=$?
  if [ "$rc" != 0 ]; then echo "   MISSING: $name does not collect (exit $rc)"; echo "$out" | tail -n 5; FAILED+=("$name"); return 0; fi
  local n
  n=$(echo "$out" | sed -n 's/^[^ ]*\.py: \([0-9]*\)$/\1/p' | awk '{s += $1} END {print s + 0}')
  if [ -z "$n" ] || [ "$n" = 0 ]; then echo "   MISSING: $name selects no test"; FAILED+=("$name (empty)"); return 0; fi
  echo "   collects: $n tests"
}

# The report from whatever has finished: rewritten after every step, never failing the run by itself.
report() {
  [ "$DRY" = 1 ] && { echo "== report: $PY -m benchmarks.report --partial ... --out $OUT/report"; return 0; }
  local jsons=()
  for f in "$OUT/kernels.json" "$OUT/train.json" "$OUT/compiled.json"; do [ -s "$f" ] && jsons+=("$f"); done
  timeout 60 "$PY" -m benchmarks.report --partial "${jsons[@]}" --out "$OUT/report" \
    --append "$OUT/static_gate.md" "$OUT/traffic.md" > "$OUT/report.log" 2>&1 \
    || echo "   (report not rewritten: see $OUT/report.log)"
}

# 0. The static gate compiles for the GPU on the CPU (no device needed): it runs beside the other steps.
GATE_PID=""
if [ "$DRY" = 1 ]; then
  echo "== static gate table, in the background: $PY -m benchmarks.static_gate $OUT/static_gate.md"
else
  echo "== [0 s] static gate table, in the background -> $OUT/static_gate.md ($OUT/static_gate.log)"
  # One compile worker, serial: give it the whole budget (it needs no GPU, and waits for no step).
  (timeout -s INT $((BUDGET - 15)) "$PY" -m benchmarks.static_gate "$OUT/static_gate.md" > "$OUT/static_gate.log" 2>&1) &
  GATE_PID=$!
fi
step "traffic model" 10 "$PY" -m benchmarks.traffic "$OUT/traffic.md"
report

echo "== [$((SECONDS - START)) s] what is installed"
"$PY" - <<'EOF' || true
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "triton", "numpy", "transformers", "pytest", "pytest_benchmark", "xdist", "matplotlib"):
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
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
  --format=csv,noheader || true

INSTALL_ENV=(LADDER_KERNELS_STRICT_BUILD=1)
if [ "$HAS_GPU" = 1 ] || [ "$DRY" = 1 ]; then
  if CUDA_HOME_FOUND=$(find_cuda_home); then
    export CUDA_HOME=$CUDA_HOME_FOUND
    export PATH="$CUDA_HOME/bin:$PATH"
    echo "CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -n1))"
  elif [ "$HAS_GPU" = 1 ]; then
    echo "no CUDA toolkit found: the CUDA kernels cannot be built"; FAILED+=("CUDA toolkit")
  fi
fi
if [ "$HAS_GPU" = 1 ]; then
  INSTALL_ENV+=(TORCH_CUDA_ARCH_LIST=9.0 LADDER_KERNELS_CUDA=1)
else
  INSTALL_ENV+=(LADDER_KERNELS_CUDA=0)
fi
# Offline: every dependency must already be importable (the GPU machine's image has them); name any that is not.
MISSING_DEPS=$("$PY" -c "
import importlib.util as u
mods = ['numpy', 'transformers', 'safetensors', 'tqdm', 'PIL', 'pytest', 'pytest_benchmark', 'hypothesis',
        'matplotlib', 'setuptools', 'ninja']
print(' '.join(m for m in mods if u.find_spec(m) is None))" 2>/dev/null || echo "(python failed)")
if [ -n "$MISSING_DEPS" ]; then
  echo "MISSING dependencies (no index to install them from): $MISSING_DEPS"; FAILED+=("dependencies: $MISSING_DEPS")
fi
step "install (strict build, offline)" 60 env "${INSTALL_ENV[@]}" "$PY" -m pip install -q --no-build-isolation \
  --no-deps --no-index -e .
if [ "$DRY" != 1 ]; then
  "$PY" -c "
import sys, ladder_kernels as lk
st = lk.backends()
for name, s in st.items():
    print(f'   backend {name:7s} {\"yes\" if s.available else \"no \"}  {s.detail}')
need = sys.argv[1].split(',') if sys.argv[1] else []
missing = [n for n in need if not st[n].available]
sys.exit(f'gpu_check: backends not available on this GPU machine: {missing}' if missing else 0)
" "$([ "$HAS_GPU" = 1 ] && echo triton,cuda || true)" || FAILED+=("backends")
fi

PYTEST=("$PY" -m pytest -q -p no:cacheprovider)
XDIST=()
if [ "$HAS_GPU" = 1 ] && "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 12); fi
if [ "$HAS_GPU" = 1 ]; then
  step "CUDA tests (curated: every kernel, every dtype)" 110 env LADDER_TESTS_GPU_QUICK=1 "${PYTEST[@]}" tests \
    "${XDIST[@]}" -rf --junitxml="$OUT/cuda_tests.xml"
elif [ "$DRY" = 1 ]; then
  echo "== CUDA tests (GPU only): LADDER_TESTS_GPU_QUICK=1 ${PYTEST[*]} tests -n 12 -rf"
  collects "CUDA tests selection" LADDER_TESTS_GPU_QUICK=1 "${PYTEST[@]}" tests
else
  echo "(no GPU: the CUDA tests are skipped)"
fi
report

BENCH=(env LADDER_BENCH_DEVICES="$BENCH_DEVICES")
if [ "$DRY" = 1 ]; then
  for f in benchmarks/report.py benchmarks/static_gate.py benchmarks/traffic.py benchmarks/bench_train_step.py; do
    [ -f "$f" ] || { echo "   MISSING file: $f"; FAILED+=("$f"); }
  done
  collects "kernel benchmarks selection" LADDER_BENCH_DEVICES=cpu LADDER_BENCH_COMPILE=none LADDER_BENCH_SMOKE=1 \
    "${PYTEST[@]}" benchmarks --ignore=benchmarks/bench_train_step.py -k "not compiled"
fi
step "kernel benchmarks (devices: $BENCH_DEVICES; no torch.compile)" 60 "${BENCH[@]}" LADDER_BENCH_COMPILE=none \
  "${PYTEST[@]}" benchmarks --ignore=benchmarks/bench_train_step.py -k "not compiled" \
  --benchmark-json="$OUT/kernels.json"
report
# LADDER_BENCH_VITB16: on a GPU, the ViT-B/16 case adds the side network's step on given taps (one case)
step "training-step benchmarks (devices: $BENCH_DEVICES; no compile variants)" 150 "${BENCH[@]}" \
  LADDER_BENCH_VITB16="$HAS_GPU" "${PYTEST[@]}" benchmarks/bench_train_step.py \
  -k "not compile and not vpt and not maple" --benchmark-json="$OUT/train.json"
report
step "torch.compile of each reference (first case of each op, a fresh compile each)" 45 "${BENCH[@]}" \
  LADDER_BENCH_COMPILE=first "${PYTEST[@]}" benchmarks --ignore=benchmarks/bench_train_step.py -k compiled \
  --benchmark-json="$OUT/compiled.json"

if [ -n "$GATE_PID" ]; then
  t0=$SECONDS
  rc=0
  wait "$GATE_PID" || rc=$?
  echo "== static gate table: waited $((SECONDS - t0)) s, exit $rc"
  tail -n 2 "$OUT/static_gate.log" || true
  [ "$rc" = 0 ] || FAILED+=("static gate (exit $rc, see static_gate.md)")
fi
report
[ "$DRY" = 1 ] || { tail -n 1 "$OUT/report.log" 2>/dev/null || true; }
echo
echo "== gpu_check finished in $((SECONDS - START)) s ($([ "$HAS_GPU" = 1 ] && echo GPU || echo 'NO GPU: smoke size'))"
[ "$DRY" = 1 ] || ls -la "$OUT"
if [ ${#FAILED[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${FAILED[@]}"
  exit 1
fi
