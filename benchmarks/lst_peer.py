"""The peer of the `ladder` method: the same Prompt-Ladder written the way a user writes LST in plain
PyTorch, without this package's ops or its text cache. It is the `lst` method of the package
(ladder_clip/methods/ladder/lst.py, where what it does differently is listed); this name stays for
benchmarks/train_step.py and the benchmark tests."""
from ladder_clip.methods.ladder.lst import LST as LSTPeer

__all__ = ["LSTPeer"]
