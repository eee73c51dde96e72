"""What a run tells its reader: the one summary line per epoch, and the end of training (the test
accuracy, base-to-new's base / new / harmonic mean, OUT/metrics.json with the recipe and the memory).
The accuracies come in measured (train.py runs the evaluation)."""
import json
import os

from ..base import files


def epoch_line(cfg, epoch: int, loss: float, acc: float, seconds: float, peak: int, lr: float) -> str:
    """One line per epoch that reads the same in a log file as under the tqdm bar (which is cleared)."""
    return (f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}: loss {loss:.4f}, train accuracy {acc:.3f}, "
            f"lr {lr:.2e}, {seconds:.1f} s, peak {peak / 2 ** 20:.1f} MiB")


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def finish(cfg, method, backbone, world, history, meter, params, train_items, test_items, acc, new=None,
           new_acc=None) -> dict:
    """OUT/metrics.json from the test accuracy `acc` (of the base classes with --base-to-new, `new` then
    being (new class names, their test items) and `new_acc` their accuracy); returns its dict."""
    result = {
        "method": cfg.method, "model": backbone.name, "dataset": cfg.dataset, "data": os.path.abspath(cfg.data),
        "accuracy": acc, "test_images": len(test_items),
        "train_images": len(train_items), "shots": cfg.shots, "epochs": cfg.epochs, "seed": cfg.seed,
        "recipe": cfg.recipe_values, "augment": cfg.augment,
        "precision": cfg.precision, "world_size": world, "loss_curve": history.loss_curve,
        "peak_memory_bytes": history.peak_bytes, "peak_memory_kind": meter.kind,
        "peak_memory_rule": "peak above what was resident before training, over training steps only",
        "saved_activation_bytes": history.saved_bytes,
        "images_per_s": history.images / history.train_time if history.train_time else None,
        "trainable_parameters": sum(p.numel() for p in params), "classnames": method.classnames,
        "config": method.config(),
    }
    if new is not None:
        new_names, new_items = new
        result.update(base_accuracy=acc, new_accuracy=new_acc, harmonic_mean=harmonic_mean(acc, new_acc),
                      new_test_images=len(new_items), new_classnames=new_names)
    text = json.dumps(result, indent=2)
    files.atomic_write(os.path.join(cfg.out, "metrics.json"), lambda tmp: _write_text(tmp, text))
    return result


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
