"""lk.SavedTensors: the one counter of bytes kept for backward used by tests, benchmarks and the pipeline."""
import torch

import ladder_kernels as lk


def test_counts_each_storage_once():
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(32, 16, requires_grad=True)
    with lk.SavedTensors(keep=True) as saved:
        y = x @ w  # saves x and w
        z = (x[:8] * 2).sum()  # x[:8]: a view of x's storage, counted with x
    assert saved.bytes == x.numel() * 4 + w.numel() * 4
    assert len(saved.tensors) >= 2
    (y.sum() + z).backward()  # the hooks pass tensors through untouched


def test_excluded_storages_are_not_counted():
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(32, 16))
    with lk.SavedTensors(exclude=[w]) as saved:
        x @ w
    assert saved.bytes == x.numel() * 4


def test_records_only_inside_the_block_and_keeps_only_when_asked():
    x = torch.randn(16, requires_grad=True)
    with lk.SavedTensors() as saved:
        x.exp()  # saves its output
    x.sin()  # after the block: not recorded
    assert saved.bytes == 16 * 4 and saved.tensors == []
