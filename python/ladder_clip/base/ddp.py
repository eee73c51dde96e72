"""Distributed data parallel under torchrun: gloo on CPU, nccl on CUDA; only the trainable parameters
are registered with DDP, so only they are broadcast and all-reduced."""
import os
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: str):
    """(rank, world size, torch.device); starts the process group when launched by torchrun."""
    n = world()
    if n <= 1:
        return 0, 1, torch.device(device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local}") if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=n)
    return rank, n, dev


def wrap(method, device: torch.device):
    frozen = [n for n, p in method.named_parameters(remove_duplicate=False) if not p.requires_grad]
    frozen += [n for n, _ in method.named_buffers(remove_duplicate=False)]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(method, frozen)
    with warnings.catch_warnings():  # broadcast_buffers=False is still the way to skip syncing frozen buffers
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*")
        return DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=False)


def everywhere(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on every process: a lone process's own flag, else one tiny all-reduce (so all
    processes stop together instead of one waiting for the others in the next gradient all-reduce)."""
    if not dist.is_initialized():
        return flag
    bad = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(bad)
    return bad.item() == 0.0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
