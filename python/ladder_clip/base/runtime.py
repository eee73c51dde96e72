"""What a run checks and sets up on its device: the --device and LADDER_KERNELS_BACKEND checks, autocast
for --precision, and whether the progress bars show."""
import os

import torch

from .errors import UserError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: this torch sees no CUDA GPU")
    check_backend_env(device)


def check_backend_env(device: str) -> None:
    """LADDER_KERNELS_BACKEND forces every op's backend: an unknown name, or one that runs none of the
    ops here, is refused naming the variable (the ops' own message blames their 'backend' argument,
    which the pipeline never passes). One that runs only some ops is left to the op a method calls
    (cli.py names the variable then too): coop needs assemble_prompts alone."""
    import ladder_kernels as lk

    value = os.environ.get("LADDER_KERNELS_BACKEND")
    if not value:
        return
    reasons = []
    for op in ("assemble_prompts", "gated_fusion", "apt_diffusion"):
        try:
            lk.backend_for(op, device)
        except (ValueError, RuntimeError) as exc:
            reasons.append(str(exc).replace(f"{op}: argument 'backend' must be", "it must be"))
            if "must be" in reasons[-1]:
                break
    if reasons and (len(reasons) == 3 or "must be" in reasons[-1]):
        raise UserError(f"LADDER_KERNELS_BACKEND={value!r}: {reasons[-1]}; unset it to let each op choose")


def autocast(device: torch.device, precision: str):
    dtype = DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def bar_off(quiet: bool):
    """tqdm's `disable`: off when asked, and when stderr is not a terminal (tqdm's None), so a log file
    gets the one summary line per epoch and not the bar's carriage-return frames."""
    return True if quiet else None
