"""The one validated config of each command: argparse only parses, then TrainConfig / EvalConfig /
DemoConfig check every field once, here (the method's options by the method's own declared types and
ranges), and the loops trust what they are given. A bad field is a UserError naming the argument, what
was expected and what was received."""
import math
from dataclasses import asdict, dataclass, field
from typing import Optional

from .errors import UserError

DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")
SUBSAMPLES = ("all", "base", "new")
OPTIMIZERS = ("adamw", "sgd")
MAX_SEED = 2 ** 32 - 1  # python's, torch's and numpy's generators all take it


def _int(name: str, v, low: int, high: Optional[int] = None, note: str = "") -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
        want = f"an integer in {low}..{high}" if high is not None else f"an integer >= {low}"
        raise UserError(f"{name} must be {want}{note}, got {v!r}")


def _choice(name: str, v, choices) -> None:
    if v not in choices:
        raise UserError(f"{name} must be one of {', '.join(choices)}, got {v!r}")


def _path(name: str, v, optional: bool = False) -> None:
    if v is None and optional:
        return
    if not isinstance(v, str) or not v or "\0" in v:
        raise UserError(f"{name} must be a path, got {v!r}")


def _common(c) -> None:
    _path("--model", c.model)
    _path("--data", c.data)
    _path("--split-json", c.split_json, optional=True)
    _choice("--subsample", c.subsample, SUBSAMPLES)
    _choice("--device", c.device, DEVICES)
    _choice("--precision", c.precision, PRECISIONS)
    _int("--workers", c.workers, 0, 256)


@dataclass(frozen=True)
class TrainConfig:
    model: str
    data: str
    method: str
    out: str
    shots: int = 16
    epochs: int = 5
    batch_size: int = 32
    lr: float = 2e-3
    device: str = "cpu"
    seed: int = 1
    precision: str = "fp32"
    resume: bool = False
    split_json: Optional[str] = None
    subsample: str = "all"
    workers: int = 0
    eval_batch_size: int = 64
    method_options: dict = field(default_factory=dict)
    quiet: bool = False
    optimizer: str = "adamw"

    def __post_init__(self):
        from .methods import METHODS

        _common(self)
        _choice("--method", self.method, list(METHODS))
        _path("--out", self.out)
        _int("--shots", self.shots, 0, note=" (0 = all training images)")
        _int("--epochs", self.epochs, 0, 100000)
        _int("--batch-size", self.batch_size, 1, 1 << 20)
        _int("--eval-batch-size", self.eval_batch_size, 1, 1 << 20)
        _int("--seed", self.seed, 0, MAX_SEED)
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise UserError(f"--lr must be a finite number > 0, got {lr!r}")
        _choice("--optimizer", self.optimizer, OPTIMIZERS)
        try:
            opts = METHODS[self.method].check_options(self.method_options)
        except ValueError as exc:
            raise UserError(str(exc))
        object.__setattr__(self, "method_options", opts)  # every option, checked: what a resume compares

    def run_settings(self) -> dict:
        """What a resumed run must repeat to continue the same run (the rest may change on --resume). Paths
        are not compared (a resume may run from another folder): the model is checked by its signature,
        the data by its class names, and the few-shot selection comes from the commit."""
        keep = ("method", "shots", "batch_size", "lr", "seed", "precision", "subsample", "method_options",
                "optimizer")
        return {k: v for k, v in asdict(self).items() if k in keep}


@dataclass(frozen=True)
class EvalConfig:
    model: str
    data: str
    checkpoint: str
    split_json: Optional[str] = None
    subsample: str = "all"
    device: str = "cpu"
    precision: str = "fp32"
    batch_size: int = 64
    workers: int = 0
    other_classes: bool = False
    quiet: bool = False
    frozen: Optional[str] = None  # the ladder's frozen backbone (fp32 / int8); None: the checkpoint's

    def __post_init__(self):
        _common(self)
        _path("--checkpoint", self.checkpoint)
        _int("--batch-size", self.batch_size, 1, 1 << 20)
        if self.frozen is not None:
            from .methods import METHODS

            try:  # the ladder's own declared option type
                METHODS["ladder"].options["frozen"].check(self.frozen)
            except ValueError as exc:
                raise UserError(f"--frozen must be {exc}, got {self.frozen!r}")


@dataclass(frozen=True)
class DemoConfig:
    out: Optional[str] = None
    epochs: int = 8
    device: str = "cpu"

    def __post_init__(self):
        _path("--out", self.out, optional=True)
        _int("--epochs", self.epochs, 1, 100000, note=" (the demo compares loss curves)")
        _choice("--device", self.device, DEVICES)
