"""`ladder-clip demo`: every prompt method next to zero-shot on the tiny pretrained CLIP (pretrain.py, built
in the cache on first use) and a generated image set of the four classes it never saw captioned, drawn on
a lighter background than pretraining's (a domain shift), on CPU in a couple of minutes, with no
downloads; then the ladder's memory saving against CoOp."""
import os
import tempfile

from ..base import files
from ..base.peak import follow_live_memory
from ..data.synthetic import make_imagefolder
from ..engine.config import TrainConfig
from ..engine.recipes import resolve
from ..engine.train import train
from ..model.pretrain import SHIFTED_BACKGROUND, UNSEEN

METHODS = ("coop", "rlp", "apt", "ladder", "ladder+apt", "vpt", "maple")
SHOTS = 16

DISCLAIMER = (
    "Note: 'tiny-pretrained' is a 0.14M-parameter CLIP pretrained here in seconds on generated colour x shape\n"
    "images; the four classes are pairings it never saw captioned, drawn on lighter backgrounds than it was\n"
    "trained on. It stands in for CLIP so that learning can be checked; the figures are not CLIP accuracy.\n"
    "For real numbers pass --model PATH (a save_pretrained CLIP) to `ladder-clip train`.")


def _mib(b):
    return "n/a" if b is None else f"{b / 2**20:.2f} MiB"


def demo(out=None, epochs: int = 8, device: str = "cpu") -> int:
    follow_live_memory()  # several runs in one process: each peak must not depend on the others' heap
    tmp = None
    if out is not None:
        files.check_out_folder(out)
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="ladder-clip-demo-")
        out = tmp.name
    data = os.path.join(out, "data")
    if not os.path.isdir(os.path.join(data, "train")):
        make_imagefolder(data, [n.replace(" ", "_") for n in UNSEEN], train_per_class=SHOTS, test_per_class=16,
                         background=SHIFTED_BACKGROUND)

    def run(method, **kw):
        return train(TrainConfig(model="tiny-pretrained", data=data, method=method, shots=SHOTS, device=device,
                                 seed=1, out=os.path.join(out, method.replace("+", "_")), quiet=True, **kw))

    print("== zero-shot on the tiny pretrained CLIP (built in the cache on first use, seconds)")
    zs = run("zeroshot")
    rows = []
    for method in METHODS:  # each method's default recipe (recipes.py), its epochs cut to `epochs` at most
        n = min(epochs, resolve(None, method, SHOTS)["epochs"])
        print(f"== training {method} ({n} epochs, {SHOTS} shots x {len(UNSEEN)} classes)")
        rows.append(run(method, epochs=n))
    head = f"{'method':<10} {'recipe':<6} {'accuracy':>8} {'vs zero-shot':>12} {'saved for backward':>18} " \
           f"{'peak memory':>11} {'images/s':>8} {'trainable':>9}"
    print("\n" + head + "\n" + "-" * len(head))
    print(f"{'zeroshot':<10} {'-':<6} {zs['accuracy']:>8.3f}")
    for r in rows:
        print(f"{r['method']:<10} {r['recipe']['name']:<6} {r['accuracy']:>8.3f} "
              f"{r['accuracy'] - zs['accuracy']:>+12.3f} {_mib(r['saved_activation_bytes']):>18} "
              f"{_mib(r['peak_memory_bytes']):>11} {r['images_per_s']:>8.1f} {r['trainable_parameters']:>9}")
    by = {r["method"]: r for r in rows}
    coop, ladder = by["coop"], by["ladder"]
    print(f"\nladder / coop: {ladder['saved_activation_bytes'] / max(1, coop['saved_activation_bytes']):.0%} of "
          "the bytes kept for backward per training step (autograd's saved tensors: the figure that grows with "
          "CLIP's size\nand the batch, so the one to compare here).")
    print(f"'peak memory' is the {rows[0]['peak_memory_kind']} above what was resident before training, over "
          "the training steps only (the benchmarks' rule); at this scale it is\na few MiB of allocator pages and "
          "torch's own buffers, which hide the difference, so it is shown but not compared "
          "(benchmarks/train_step.py measures it on CLIP).")
    print(DISCLAIMER)
    if tmp is not None:
        tmp.cleanup()
    else:
        print(f"runs and data kept in {out}")
    return 0
