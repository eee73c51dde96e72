"""benchmarks/gpu_check.sh, the one GPU check: in CI (no GPU) its steps' commands must exist and its GPU
branch's pytest selections collect (--dry-run; a full smoke run takes minutes on CI's 2 cores), it runs with
python3 alone, it refuses to fall back to smoke mode where nvidia-smi sees a GPU that torch does not, and
its CUDA toolkit search must see through an nvcc wrapper that lives outside the toolkit (the failure a bare
GPU machine showed: torch looked for the CUDA headers next to the wrapper)."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/<group>/ -> the repository
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "TRITON_INTERPRET")}
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def test_dry_run_finds_every_step(tmp_path):
    """Every step's command exists and each pytest selection of the GPU branch collects (the curated CUDA
    tests too, on a machine without a GPU); the install is strict and offline."""
    res = subprocess.run(["bash", SCRIPT, str(tmp_path / "out"), "--dry-run"], capture_output=True, text=True,
                         env=_env(), cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    for step in ("kernel benchmarks", "training-step benchmarks", "report --partial", "static gate table",
                 "traffic model", "--benchmark-json=", "-k not compiled", "LADDER_TESTS_GPU_QUICK=1",
                 "LADDER_KERNELS_STRICT_BUILD=1", "--no-index", "LADDER_BENCH_COMPILE=first", "-k compiled"):
        assert step in res.stdout, step
    collected = [line for line in res.stdout.splitlines() if "collects:" in line]
    assert len(collected) == 2 and all(int(line.split()[1]) > 0 for line in collected), res.stdout
    if not torch.cuda.is_available():
        assert "NO CUDA GPU HERE" in res.stdout and "SMOKE SIZE" in res.stdout
    assert "MISSING" not in res.stdout


def test_python3_by_default(tmp_path):
    """The GPU machine has python3 and no `python`: the script must not need PYTHON to be set."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # this venv's python3
    os.chmod(bin_dir / "python3", 0o755)
    env = {k: v for k, v in _env().items() if k != "PYTHON"}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    res = subprocess.run(["bash", SCRIPT, str(tmp_path / "out"), "--dry-run"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "python3 -m benchmarks.traffic" in res.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that sees no GPU")
def test_gpu_that_torch_does_not_see_fails_loudly(tmp_path):
    """nvidia-smi lists a GPU but torch has no CUDA: exit 3 at once, not a quiet smoke run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0)'\n")
    os.chmod(bin_dir / "nvidia-smi", 0o755)
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}")
    res = subprocess.run(["bash", SCRIPT, str(tmp_path / "out")], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 3, res.stdout + res.stderr
    assert "nvidia-smi sees a GPU but torch" in res.stderr
    assert not (tmp_path / "out" / "kernels.json").exists()


def test_bad_arguments():
    res = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=60)
    assert res.returncode == 2 and "usage" in res.stderr
    res = subprocess.run(["bash", SCRIPT, "x", "--fast"], capture_output=True, text=True, env=_env(), cwd=ROOT,
                         timeout=60)
    assert res.returncode == 2 and "--fast" in res.stderr


def _fake_toolkit(root):
    os.makedirs(os.path.join(root, "include"))
    os.makedirs(os.path.join(root, "bin"))
    open(os.path.join(root, "include", "cuda_runtime.h"), "w").close()
    nvcc = os.path.join(root, "bin", "nvcc")
    with open(nvcc, "w") as f:
        f.write("#!/bin/sh\necho 'Cuda compilation tools, release 13.0'\n")
    os.chmod(nvcc, 0o755)


def test_finds_the_toolkit_behind_an_nvcc_wrapper(tmp_path):
    """nvcc on the PATH is a wrapper in a folder of its own (no include/ beside it); only `nvcc --dryrun`
    names the real toolkit (its TOP line). The search must return that toolkit."""
    toolkit = tmp_path / "opt" / "cuda-13.0"
    _fake_toolkit(str(toolkit))
    wrap = tmp_path / "wrappers" / "bin"
    wrap.mkdir(parents=True)
    (wrap / "nvcc").write_text(f"#!/bin/sh\necho '#$ _NVVM_BRANCH_=nvvm'\necho '#$ TOP={toolkit}/bin/..'\n")
    os.chmod(wrap / "nvcc", 0o755)
    env = _env(PATH=f"{wrap}:{os.environ['PATH']}")
    res = subprocess.run(["bash", SCRIPT, "--find-cuda"], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == os.path.realpath(toolkit)
    # CUDA_HOME, when it is a toolkit, wins; when it is not (a stale path), the search goes on.
    other = tmp_path / "other"
    _fake_toolkit(str(other))
    res = subprocess.run(["bash", SCRIPT, "--find-cuda"], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env=dict(env, CUDA_HOME=str(other)))
    assert res.stdout.strip() == os.path.realpath(other)
    res = subprocess.run(["bash", SCRIPT, "--find-cuda"], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env=dict(env, CUDA_HOME=str(tmp_path / "gone")))
    assert res.stdout.strip() == os.path.realpath(toolkit)
