"""Training recipes: each method's defaults are the recipe its authors published, so that a run of
`ladder-clip train` without tuning flags compares with the papers' numbers. A recipe fixes the optimizer,
learning rate, batch size, weight decay, the warm-up and the cosine schedule, and the epochs (CoOp's by
the number of shots); `--epochs`, `--lr`, `--batch-size`, `--optimizer`, `--weight-decay` override a
value each. Sources (the authors' configs, read for this table):

- coop: CoOp `configs/trainers/CoOp/vit_b16.yaml` (+ `_ep100`, `_ep50` for 4-8 and 1-2 shots) and Dassl
  `config/defaults.py` (SGD momentum 0.9, weight decay 5e-4): lr 0.002, batch 32, cosine per epoch after
  1 warm-up epoch at a constant 1e-5; 200 / 100 / 50 epochs for 16 / 4-8 / 1-2 shots.
  Used for coop, rlp, apt, ladder, ladder+apt (and zeroshot, which trains nothing).
- maple: MaPLe `configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml`: SGD lr 0.0035, batch 4,
  5 epochs, the same warm-up and cosine (its N_CTX 2 and PROMPT_DEPTH 9 are maple's option defaults).
- vpt: MaPLe's repository `configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml`: SGD lr 0.0025, batch 4,
  5 epochs, the same warm-up and cosine (its N_CTX_VISION 8 and PROMPT_DEPTH_VISION 12, every layer of
  ViT-B/16, are vpt's option defaults n_prompts=8 depth=0).
- lst: LST (Sung, Cho and Bansal, NeurIPS 2022), its repository ylsung/Ladder-Side-Tuning,
  `VL-T5/scripts/image/LST.sh` (CLIP features, VL-T5 side network): AdamW, lr 3e-3, weight decay 3e-2,
  20 epochs, warm-up over 10% of training (`--warmup_ratio 0.1`, here 2 of the 20 epochs at the constant
  warm-up lr, as this package's scheduler warms up), batch 32: LST's 300 is more than a few-shot set of
  most datasets holds (an epoch would be one step), so CoOp's few-shot batch; its linear decay and
  gradient clipping (norm 5) are not reproduced (the cosine per epoch is every recipe's here).
- linear-probe: CoOp `lpclip/linear_probe.py` (CLIP's linear probe as CoOp's tables report it):
  L-BFGS on a multinomial logistic regression with an L2 penalty (its C an option of the method,
  searched on the validation split as CoOp does: methods/linear_probe.py), on features computed once;
  no SGD, so lr, momentum, weight decay and warm-up do not apply; "epochs" 1 (the one fit); the batch is
  that of the feature pass.
- demo: short settings for a run of your own on a CPU (AdamW, no warm-up, 8 epochs): not an authors' recipe,
  and not what `ladder-clip demo` uses (each method's default recipe, its epochs cut).
"""
from dataclasses import asdict, dataclass
from typing import Optional

from ..base.errors import UserError


@dataclass(frozen=True)
class Recipe:
    name: str
    source: str
    optimizer: str
    lr: float
    batch_size: int
    epochs: Optional[int]           # None: by shots, as CoOp (coop_epochs)
    weight_decay: float = 5e-4      # Dassl's OPTIM.WEIGHT_DECAY
    momentum: float = 0.9           # Dassl's OPTIM.MOMENTUM (SGD only)
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5         # constant during the warm-up (WARMUP_TYPE constant)


RECIPES = {
    "coop": Recipe("coop", "CoOp configs/trainers/CoOp/vit_b16{,_ep100,_ep50}.yaml + Dassl defaults",
                   "sgd", 0.002, 32, None),
    "maple": Recipe("maple", "MaPLe configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml", "sgd", 0.0035,
                    4, 5),
    "vpt": Recipe("vpt", "MaPLe repository configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml", "sgd", 0.0025,
                  4, 5),
    "lst": Recipe("lst", "LST (Sung et al., NeurIPS 2022), ylsung/Ladder-Side-Tuning VL-T5/scripts/image/LST.sh; "
                  "batch 32 (CoOp's few-shot batch), not its 300", "adamw", 3e-3, 32, 20, weight_decay=3e-2,
                  warmup_epochs=2),
    "linear-probe": Recipe("linear-probe", "CoOp lpclip/linear_probe.py (L-BFGS logistic regression, C searched on "
                           "the validation split)", "lbfgs", 1.0, 64, 1, weight_decay=0.0, warmup_epochs=0),
    "demo": Recipe("demo", "this package: short settings for a CPU in about a minute", "adamw", 2e-3, 8,
                   8, weight_decay=0.0, warmup_epochs=0),
}

# a method's default recipe: CoOp's for the CoOp-family text/side methods (the RLP and APT papers train
# with CoOp's recipe), the authors' own for MaPLe, VPT and LST, CoOp's linear probe for linear-probe
METHOD_RECIPE = {"zeroshot": "coop", "coop": "coop", "rlp": "coop", "apt": "coop", "ladder": "coop",
                 "ladder+apt": "coop", "maple": "maple", "vpt": "vpt", "lst": "lst", "linear-probe": "linear-probe"}


def coop_epochs(shots: int) -> int:
    """CoOp's epochs by shots: 200 for 16 (and for all images, shots 0), 100 for 4-8, 50 for 1-2; in
    between, the schedule of the nearest smaller setting."""
    if shots == 0 or shots >= 16:
        return 200
    return 100 if shots >= 4 else 50


def resolve(name: Optional[str], method: str, shots: int, **given) -> dict:
    """The run's training settings: the recipe's values, each replaced by an explicit (not None) value
    in `given` (epochs, lr, batch_size, optimizer, weight_decay, warmup_epochs). Returns the recipe's
    name and source and every resolved value (written into metrics.json and the checkpoint header)."""
    name = name or METHOD_RECIPE[method]
    if name not in RECIPES:
        raise UserError(f"--recipe must be one of {', '.join(RECIPES)}, got {name!r}")
    r = RECIPES[name]
    out = asdict(r)
    out["epochs"] = r.epochs if r.epochs is not None else coop_epochs(shots)
    overridden = sorted(k for k, v in given.items() if v is not None and v != out.get(k))
    out.update({k: v for k, v in given.items() if v is not None})
    out["overridden"] = overridden
    return out


def describe() -> str:
    """One line per recipe, for --help."""
    lines = []
    for r in RECIPES.values():
        if r.optimizer == "lbfgs":
            lines.append(f"  {r.name:<6} one full-batch L-BFGS fit on frozen features (batch {r.batch_size} for "
                         "the feature pass), the penalty from the method's C option")
            continue
        epochs = r.epochs if r.epochs is not None else "200/100/50 by shots"
        lines.append(f"  {r.name:<6} {r.optimizer} lr {r.lr:g}, batch {r.batch_size}, epochs {epochs}, "
                     f"weight decay {r.weight_decay:g}, {r.warmup_epochs} warm-up epoch(s) at {r.warmup_lr:g}, "
                     "cosine per epoch")
    used = ", ".join(f"{m}: {n}" for m, n in METHOD_RECIPE.items())
    return "recipes (--recipe NAME; each flag given overrides its value):\n" + "\n".join(lines) + \
        f"\n  default recipe by method: {used}"
