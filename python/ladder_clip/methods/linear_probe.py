"""`linear-probe`: logistic regression on frozen, L2-normalised CLIP image features, the baseline of every
CoOp-family table (CLIP's linear probe; CoOp's lpclip/linear_probe.py runs scikit-learn's
LogisticRegression with lbfgs and an L2 penalty, its C searched on a few-shot validation split).

Here in torch, with no scikit-learn: the features of the few-shot training images (the eval transform, no
augmentation) are computed once, then a multinomial logistic regression is fitted by full-batch L-BFGS
from zero, in float64 on the backbone's device:

    min_W,b  mean_i CE(W x_i + b, y_i) + ||W||^2 / (2 C n)

which is scikit-learn's objective (C sum_i CE_i + ||W||^2 / 2, the bias not penalised) divided by C n,
so the same minimiser. Same features and C give the same weights, bit for bit (no randomness anywhere).

C (--opt C=auto, the default): with a validation split (a CoOp split file's "val"), CoOp's search: the
few-shot validation images (min(shots, 4) per class, drawn with --seed: CoOp's val_shot_list) score a
fit for each C in 1e6, 1e4, ..., 1e-6; then 8 rounds around the best, each fitting the two ends of an
interval in log10(C) (one decade either side at first), keeping the better end (the lower on a tie)
and halving the interval towards it; the C of the last round is used. Without a validation split
(an image folder) C is 0.316, the value of OpenAI CLIP's linear-probe example (its README). --opt C=X
fixes it.

It trains through `fit` (engine/train.py calls it instead of the SGD epochs); the class weights and biases
are its learned tensors and it predicts the argmax of W x + b. They belong to the classes they were fitted
on: scoring other classes (--other-classes, --subsample new, --base-to-new) is refused.
"""
import hashlib
import json
import math
import warnings

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from .. import data as D
from ..base.errors import UserError
from ..base.runtime import bar_off
from .base import PromptMethod
from .options import AutoOr, Float

DEFAULT_C = 0.316  # OpenAI CLIP's README, "Linear-probe evaluation": LogisticRegression(C=0.316)
C_GRID = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)  # CoOp lpclip/linear_probe.py's first search
SEARCH_ROUNDS = 8  # its num_step
VAL_SHOTS = 4  # its val_shot_list: min(shots, 4) validation images per class
MAX_ITER = 1000  # its max_iter (scikit-learn's lbfgs)
TOL = 1e-4  # scikit-learn's default tol: L-BFGS stops when no gradient entry of the mean objective is larger


def class_digest(classnames) -> torch.Tensor:
    """sha256 of the class list, as 32 bytes: what a checkpoint's weights were fitted for."""
    return torch.tensor(list(hashlib.sha256(json.dumps(list(classnames)).encode()).digest()), dtype=torch.uint8)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, c: float):
    """(W (K, E), b (K,)) minimising mean CE(x W^T + b, y) + ||W||^2 / (2 C n), by full-batch L-BFGS with a
    strong-Wolfe line search, from zero, in x's dtype (float64 here), until no gradient entry exceeds TOL
    or after MAX_ITER iterations."""
    n = x.shape[0]
    w = torch.zeros(n_classes, x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros(n_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=MAX_ITER, tolerance_grad=TOL, tolerance_change=1e-12,
                            history_size=10, line_search_fn="strong_wolfe")
    penalty = 1.0 / (2.0 * c * n)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.t() + b, y) + penalty * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def accuracy(x, y, w, b) -> float:
    return (x @ w.t() + b).argmax(-1).eq(y).double().mean().item()


def search_c(train, val, n_classes: int, quiet: bool = True) -> float:
    """CoOp's search of C on the validation features (module docstring); `train`, `val`: (features, labels)."""
    bar = tqdm(total=len(C_GRID) + 2 * SEARCH_ROUNDS, desc="linear-probe C search", disable=bar_off(quiet),
               leave=False)

    def score(c):
        bar.update()
        return accuracy(*val, *fit_logistic(*train, n_classes, c))

    scores = [score(c) for c in C_GRID]
    best = C_GRID[scores.index(max(scores))]  # the first best, as numpy's argmax
    lo, hi = math.log10(best) - 1, math.log10(best) + 1
    chosen = best
    for _ in range(SEARCH_ROUNDS):
        left, right = score(10 ** lo), score(10 ** hi)
        mid = (lo + hi) / 2
        if left < right:
            chosen, lo = 10 ** hi, mid
        else:
            chosen, hi = 10 ** lo, mid
    bar.close()
    return chosen


class LinearProbe(PromptMethod):
    name = "linear-probe"
    defaults = {"C": "auto"}
    options = {"C": AutoOr(Float(1e-12, 1e12))}

    def build_text(self, classnames):
        # the weights are sized by the first class set; a later one (new classes) is refused when used
        if not hasattr(self, "weight"):
            dev = self.backbone.device
            self.weight = nn.Parameter(torch.zeros(len(classnames), self.backbone.embed_dim, device=dev))
            self.bias = nn.Parameter(torch.zeros(len(classnames), device=dev))
            self.register_buffer("classes_sha256", class_digest(classnames).to(dev))
            self.fitted_c = None

    def _check_classes(self):
        if not torch.equal(self.classes_sha256.cpu(), class_digest(self.classnames)):
            raise UserError(f"linear-probe: its class weights belong to the {self.weight.shape[0]} classes it was "
                            f"fitted on, not to these {len(self.classnames)} ({', '.join(self.classnames[:3])}"
                            f"{' ...' if len(self.classnames) > 3 else ''}); a linear probe cannot score other "
                            "classes (--other-classes, --subsample new, --base-to-new)")

    def text_features(self):
        """The class weights (they stand where the other methods' class text features do)."""
        self._check_classes()
        return self.weight

    def image_features(self, pixels):
        with torch.no_grad():
            return self.backbone.encode_image(pixels)

    def forward(self, pixels, text=None):
        w = self.text_features() if text is None else text
        x = F.normalize(self.image_features(pixels).float(), dim=-1)
        return x @ w.float().t() + self.bias.float()

    @torch.no_grad()
    def features(self, items, batch_size: int, workers: int = 0, quiet: bool = True):
        """(L2-normalised features in float64, labels) of `items` under the eval transform."""
        from ..data.loader import loader

        batches = [list(range(i, min(i + batch_size, len(items)))) for i in range(0, len(items), batch_size)]
        feats, labels = [], []
        for x, y in tqdm(loader(items, self.backbone, batches, workers), total=len(batches),
                         desc="linear-probe features", disable=bar_off(quiet), leave=False):
            feats.append(F.normalize(self.image_features(x.to(self.backbone.device)).float(), dim=-1))
            labels.append(y)
        return torch.cat(feats).double(), torch.cat(labels).to(self.backbone.device)

    def fit(self, cfg, train_items, val_items=None, quiet: bool = True):
        """Fits the weights on `train_items` (C searched on `val_items` when there are some and C=auto);
        returns the loss curve to report: the full-batch training loss before the fit and after it."""
        if cfg.base_to_new:
            raise UserError("--base-to-new: a linear probe learns one weight vector per training class and "
                            "cannot score new classes; train it without --base-to-new")
        unused = [f"--{k.replace('_', '-')}" for k in cfg.recipe_values.get("overridden", [])
                  if k in ("lr", "optimizer", "weight_decay", "warmup_epochs")]
        if unused:
            warnings.warn(f"linear-probe fits by L-BFGS with its own penalty (--opt C=...): {', '.join(unused)} "
                          f"{'does' if len(unused) == 1 else 'do'} not apply")
        train = self.features(train_items, cfg.batch_size, cfg.workers, quiet)
        c, where = self.cfg["C"], "--opt C"
        if c == "auto" and val_items:
            shots = min(cfg.shots, VAL_SHOTS) if cfg.shots else VAL_SHOTS
            val_items = D.few_shot(val_items, shots, cfg.seed, self.classnames)
            val = self.features(val_items, cfg.batch_size, cfg.workers, quiet)
            c = search_c(train, val, len(self.classnames), quiet)
            where = f"searched on {len(val_items)} validation images"
        elif c == "auto":
            c, where = DEFAULT_C, "no validation split: CLIP's default"
        w, b = fit_logistic(*train, len(self.classnames), c)
        with torch.no_grad():
            self.weight.copy_(w)
            self.bias.copy_(b)
        self.fitted_c = c
        if not quiet:
            tqdm.write(f"linear-probe: C {c:.4g} ({where}), fitted on {len(train_items)} images")
        before = math.log(len(self.classnames))  # zero weights: the uniform prediction
        after = F.cross_entropy(train[0] @ w.t() + b, train[1]).item()
        return [before, after]

    def config(self):
        """The options, with C=auto replaced by the C the fit used (checkpoint header, metrics.json)."""
        out = dict(self.cfg)
        if self.fitted_c is not None:
            out["C"] = self.fitted_c
        return out
