"""Moved: the int8 backbone to ladder_clip.model.int8, how the ladder runs it to
ladder_clip.methods.ladder.frozen, the measurement to ladder_clip.apps.int8_report; this path stays, and

    python -m ladder_clip.quantize report [--epochs N] [--seeds S ...]

still prints the report."""
import sys

from ._alias import alias

if __name__ == "__main__":
    from .apps.int8_report import main

    sys.exit(main())
alias(__name__, "ladder_clip.model.int8", "ladder_clip.methods.ladder.frozen", "ladder_clip.apps.int8_report")
