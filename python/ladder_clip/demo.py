"""`ladder-clip demo`: CoOp and Prompt-Ladder side by side on the tiny random CLIP and a generated image
set, on CPU in a couple of minutes, with no downloads."""
import os
import tempfile

from .synthetic import make_imagefolder
from .config import TrainConfig
from .peak import follow_live_memory
from .train import train

DISCLAIMER = ("Note: the 'tiny' CLIP is randomly initialised and the images are generated shapes, so these "
              "figures show the mechanics\n(what trains, how much it stores for backward, how fast it runs), "
              "not CLIP accuracy. For real numbers pass --model PATH to a save_pretrained CLIP.")


def _mib(b):
    return "n/a" if b is None else f"{b / 2**20:.2f} MiB"


def demo(out=None, epochs: int = 8, device: str = "cpu") -> int:
    follow_live_memory()  # two runs in one process: each peak must not depend on the other's heap
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="ladder-clip-demo-")
        out = tmp.name
    data = os.path.join(out, "data")
    if not os.path.isdir(os.path.join(data, "train")):
        make_imagefolder(data, train_per_class=16, test_per_class=16)
    zs = train(TrainConfig(model="tiny", data=data, method="zeroshot", out=os.path.join(out, "zeroshot"), shots=8,
                           device=device, seed=1, recipe="demo", quiet=True))
    rows = []
    # the demo's own short recipe (recipes.py "demo"), not the authors' 200-epoch ones; the ladder trains
    # a whole side network and takes a larger lr
    for method, lr in (("coop", 2e-3), ("ladder", 1e-2)):
        print(f"== training {method} on the tiny model ({epochs} epochs, 8 shots x 4 classes)")
        cfg = TrainConfig(model="tiny", data=data, method=method, out=os.path.join(out, method), shots=8,
                          epochs=epochs, lr=lr, device=device, seed=1, recipe="demo", augment=False)
        rows.append(train(cfg))
    head = f"{'method':<8} {'accuracy':>9} {'first loss':>10} {'last loss':>9} {'saved for backward':>19} " \
           f"{'peak memory':>12} {'images/s':>9} {'trainable':>9}"
    print("\n" + head + "\n" + "-" * len(head))
    print(f"{'zeroshot':<8} {zs['accuracy']:>9.3f}   (no training: every tuned method's accuracy is next to it)")
    for r in rows:
        c = r["loss_curve"]
        print(f"{r['method']:<8} {r['accuracy']:>9.3f} {c[0]:>10.3f} {c[-1]:>9.3f} "
              f"{_mib(r['saved_activation_bytes']):>19} {_mib(r['peak_memory_bytes']):>12} "
              f"{r['images_per_s']:>9.1f} {r['trainable_parameters']:>9}")
    coop, ladder = rows
    if coop["peak_memory_bytes"] and ladder["peak_memory_bytes"] is not None:
        print(f"\nladder / coop: {ladder['peak_memory_bytes'] / coop['peak_memory_bytes']:.0%} of the peak memory, "
              f"{ladder['saved_activation_bytes'] / max(1, coop['saved_activation_bytes']):.0%} of the bytes "
              "kept for backward")
    print(f"'saved for backward' is what autograd keeps per training step (saved_tensors_hooks); 'peak "
          f"memory' is the {rows[0]['peak_memory_kind']} above what was resident before training, over the "
          "training steps only (the benchmarks' rule).")
    print(DISCLAIMER)
    if tmp is not None:
        tmp.cleanup()
    else:
        print(f"runs and data kept in {out}")
    return 0
