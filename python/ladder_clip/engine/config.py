"""The one validated config of each command: argparse only parses, then TrainConfig / EvalConfig /
DemoConfig check every field once, here (the method's options by the method's own declared types and
ranges), and the loops trust what they are given. A bad field is a UserError naming the argument, what
was expected and what was received."""
import math
from dataclasses import asdict, dataclass, field
from typing import Optional

from ..base.errors import UserError

DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")
SUBSAMPLES = ("all", "base", "new")
# the MLP activation of a --model checkpoint file (the weights do not say): OpenAI's CLIPs use QuickGELU,
# most LAION-trained open_clip models plain GELU
ACTIVATIONS = ("quick_gelu", "gelu")
OPTIMIZERS = ("adamw", "sgd")
MAX_SEED = 2 ** 32 - 1  # python's, torch's and numpy's generators all take it
# --lr and --weight-decay: the optimizers pass them to float32 kernels, where 1e300 overflowed (exit 1);
# below float32's largest value (3.4e38), a huge rate diverges and stops training with its own error
MAX_STEP = 1e38


def _int(name: str, v, low: int, high: Optional[int] = None, note: str = "") -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
        want = f"an integer in {low}..{high}" if high is not None else f"an integer >= {low}"
        raise UserError(f"{name} must be {want}{note}, got {v!r}")


def _number(name: str, v, low: Optional[float] = None, low_open: Optional[float] = None,
            high: Optional[float] = None) -> None:
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) \
        and (low is None or v >= low) and (low_open is None or v > low_open) and (high is None or v <= high)
    if not ok:
        bound = f" >= {low:g}" if low is not None else f" > {low_open:g}" if low_open is not None else ""
        bound += f"{' and' if bound else ''} <= {high:g}" if high is not None else ""
        raise UserError(f"{name} must be a finite number{bound}, got {v!r}")


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
    _path("--tokenizer", c.tokenizer, optional=True)
    if c.activation is not None:
        _choice("--activation", c.activation, ACTIVATIONS)
    _path("--data", c.data)
    _path("--split-json", c.split_json, optional=True)
    _dataset(c)
    _choice("--subsample", c.subsample, SUBSAMPLES)
    _choice("--device", c.device, DEVICES)
    _choice("--precision", c.precision, PRECISIONS)
    _int("--workers", c.workers, 0, 256)


def _dataset(c) -> None:
    """--dataset to CoOp's config name (data.coop_datasets), and what goes with it."""
    _path("--classnames", c.classnames_file, optional=True)
    if c.dataset is None:
        if c.classnames_file is not None:
            raise UserError("--classnames: only for --dataset imagenet and its variants")
        return
    from ..data.coop_datasets import SPECS, canonical

    if not isinstance(c.dataset, str):
        raise UserError(f"--dataset must be a dataset name, got {c.dataset!r}")
    object.__setattr__(c, "dataset", canonical(c.dataset))
    if c.split_json is not None:
        raise UserError(f"--split-json: --dataset {c.dataset} reads its own files (CoOp's layout); give --dataset "
                        "or --split-json, not both")
    if c.classnames_file is not None and SPECS[c.dataset].kind not in ("imagenet", "v2", "variant"):
        raise UserError(f"--classnames: only for imagenet and its variants, not --dataset {c.dataset}")


def _test_only(name: str) -> bool:
    from ..data.coop_datasets import TEST_ONLY

    return name in TEST_ONLY


@dataclass(frozen=True)
class TrainConfig:
    model: str
    data: str
    method: str
    out: str
    shots: int = 16
    epochs: Optional[int] = None      # None: the recipe's (recipes.py), set by __post_init__
    batch_size: Optional[int] = None
    lr: Optional[float] = None
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
    optimizer: Optional[str] = None
    recipe: Optional[str] = None      # None: the method's own (recipes.METHOD_RECIPE)
    weight_decay: Optional[float] = None
    warmup_epochs: Optional[int] = None
    augment: bool = True              # Dassl's training augmentation (data.Augment)
    template: Optional[str] = None    # zero-shot template; None: by the split file's dataset, or the method's
    base_to_new: bool = False
    recipe_values: dict = field(default_factory=dict)  # set here: the resolved recipe (metrics, checkpoint)
    tokenizer: Optional[str] = None   # for a --model checkpoint file: a tokenizer folder or CLIP's merges file
    activation: Optional[str] = None  # for a --model checkpoint file: ACTIVATIONS; None: QuickGELU (OpenAI's)
    dataset: Optional[str] = None     # CoOp's dataset name (data.coop_datasets.DATASETS); --data is its folder
    classnames_file: Optional[str] = None  # ImageNet's classnames.txt (default: in the dataset folder)

    def __post_init__(self):
        from ..methods import METHODS
        from ..data.coop_datasets import SPECS
        from ..methods.prompts import coop_template, dataset_template
        from . import recipes

        _common(self)
        _choice("--method", self.method, list(METHODS))
        if self.dataset is not None and _test_only(self.dataset):
            raise UserError(f"--dataset {self.dataset} is test-only (no training split): train on --dataset "
                            f"imagenet, then score the checkpoint with ladder-clip eval --dataset {self.dataset}")
        _path("--out", self.out)
        _int("--shots", self.shots, 0, note=" (0 = all training images)")
        if self.epochs is not None:
            _int("--epochs", self.epochs, 0, 100000)
        if self.batch_size is not None:
            _int("--batch-size", self.batch_size, 1, 1 << 20)
        _int("--eval-batch-size", self.eval_batch_size, 1, 1 << 20)
        _int("--seed", self.seed, 0, MAX_SEED)
        if self.lr is not None:
            _number("--lr", self.lr, low_open=0.0, high=MAX_STEP)
        if self.weight_decay is not None:
            _number("--weight-decay", self.weight_decay, low=0.0, high=MAX_STEP)
        if self.warmup_epochs is not None:
            _int("--warmup-epochs", self.warmup_epochs, 0, 100000)
        if self.optimizer is not None:
            _choice("--optimizer", self.optimizer, OPTIMIZERS)
        if self.recipe is not None:
            _choice("--recipe", self.recipe, list(recipes.RECIPES))
        if self.base_to_new and self.subsample != "all":
            raise UserError(f"--base-to-new trains on the base classes itself; drop --subsample {self.subsample}")
        r = recipes.resolve(self.recipe, self.method, self.shots, epochs=self.epochs, lr=self.lr,
                            batch_size=self.batch_size, optimizer=self.optimizer,
                            weight_decay=self.weight_decay, warmup_epochs=self.warmup_epochs)
        for k in ("epochs", "lr", "batch_size", "optimizer", "weight_decay", "warmup_epochs"):
            object.__setattr__(self, k, r[k])
        object.__setattr__(self, "recipe", r["name"])
        object.__setattr__(self, "recipe_values", r)
        given = dict(self.method_options) if isinstance(self.method_options, dict) else self.method_options
        if isinstance(given, dict) and "template" in METHODS[self.method].defaults and "template" not in given:
            if self.template is not None:
                given["template"] = self.template
            elif self.split_json:  # CoOp's per-dataset template, by the split file's name
                found = dataset_template(self.split_json)
                if found:
                    given["template"] = found
            elif self.dataset:
                given["template"] = coop_template(SPECS[self.dataset].coop)
        elif self.template is not None and isinstance(given, dict) and "template" not in given:
            raise UserError(f"--template: method {self.method!r} uses no template (it learns its prompt)")
        try:
            opts = METHODS[self.method].check_options(given)
        except ValueError as exc:
            raise UserError(str(exc))
        object.__setattr__(self, "method_options", opts)  # every option, checked: what a resume compares
        if self.base_to_new and opts.get("csc"):
            raise UserError("--base-to-new: a class-specific context (--opt csc=true) cannot score the new "
                            "classes; use csc=false")

    def run_settings(self) -> dict:
        """What a resumed run must repeat to continue the same run (the rest may change on --resume). Paths
        are not compared (a resume may run from another folder): the model is checked by its signature,
        the data by its class names, and the few-shot selection comes from the commit."""
        keep = ("method", "shots", "batch_size", "lr", "seed", "precision", "subsample", "method_options",
                "optimizer", "recipe", "weight_decay", "warmup_epochs", "augment", "base_to_new")
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
    tokenizer: Optional[str] = None
    activation: Optional[str] = None
    dataset: Optional[str] = None
    classnames_file: Optional[str] = None

    def __post_init__(self):
        _common(self)
        _path("--checkpoint", self.checkpoint)
        if self.dataset is not None and self.subsample != "all" and _test_only(self.dataset):
            raise UserError(f"--subsample {self.subsample}: --dataset {self.dataset}'s classes are ImageNet's, "
                            "scored whole by a checkpoint trained on imagenet; use --subsample all")
        _int("--batch-size", self.batch_size, 1, 1 << 20)
        if self.frozen is not None:
            from ..methods import METHODS

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
