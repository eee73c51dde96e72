"""Plain PyTorch kernels: every op, on any device, with the same memory contract as the compiled ones."""
from typing import Optional

DEVICES = None  # any device type
AUTOMATIC = None  # picked automatically on any device type: the fallback
PRIORITY = 9  # last


def status():
    return True, "plain PyTorch (always available)"


def why_not(device_type: str, kernel: Optional[str]) -> Optional[str]:
    return None
