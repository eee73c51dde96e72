"""Two gloo processes under DDP end with the same trainable parameters as one process on the same global
batches (DDP all-reduces only the trainable parameters). SGD, not Adam: Adam is blind to a wrong gradient
scale (e.g. summing instead of averaging over processes), SGD is not."""
import os
import socket
import subprocess
import sys

import pytest
import torch

from ladder_clip.checkpoint import read_checkpoint
from ladder_clip.synthetic import make_imagefolder

RUN = """
import sys
from ladder_clip.train import TrainConfig, train
from ladder_clip import ddp
train(TrainConfig(model="tiny", data=sys.argv[1], method=sys.argv[2], out=sys.argv[3], shots=2, epochs=2,
                  batch_size=6, lr=0.05, seed=4, quiet=True, optimizer="sgd",
                  method_options={"n_ctx": 4} if sys.argv[2] == "coop" else {}))
ddp.teardown()
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world, data, method, out):
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if world > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", RUN, data, method, out], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]


@pytest.mark.parametrize("method", ["ladder"])  # the ladder: side network, fusions, low-rank prompts
def test_ddp_two_gloo_processes_match_one(tmp_path, method):
    data = str(tmp_path / "data")
    make_imagefolder(data, ["red_circle", "blue_square", "green_triangle"], train_per_class=3,
                     test_per_class=1, size=36, seed=2)
    _launch(1, data, method, str(tmp_path / "one"))
    _launch(2, data, method, str(tmp_path / "two"))
    h1, one = read_checkpoint(str(tmp_path / "one" / "prompt.safetensors"))
    h2, two = read_checkpoint(str(tmp_path / "two" / "prompt.safetensors"))
    assert h1["epoch"] == h2["epoch"] == 2 and one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in one.values())
