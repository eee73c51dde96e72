"""Declared method options: every method lists each option's type and range (`PromptMethod.options`), so
a bad `--opt` or a crafted checkpoint config is refused with one line naming the option, what it wants
and what it got, before anything is built. The upper bounds are sane limits that keep a crafted
checkpoint from allocating without bound (a real CLIP has 77 text positions and a few hundred tokens)."""
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

MAX_TOKENS = 1024  # prompt tokens of any kind, and low ranks
MAX_BLOCKS = 256


@dataclass(frozen=True)
class Int:
    low: int
    high: int

    def check(self, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not self.low <= v <= self.high:
            raise ValueError(f"an integer in {self.low}..{self.high}")
        return v


@dataclass(frozen=True)
class Float:
    low: float
    high: float
    high_open: bool = False  # dropout: [0, 1)

    def check(self, v: Any) -> float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and self.low <= v \
            and (v < self.high if self.high_open else v <= self.high)
        if not ok:
            raise ValueError(f"a number in [{self.low:g}, {self.high:g}{')' if self.high_open else ']'}")
        return float(v)


@dataclass(frozen=True)
class Bool:
    def check(self, v: Any) -> bool:
        if not isinstance(v, bool):
            raise ValueError("true or false")
        return v


@dataclass(frozen=True)
class Choice:
    values: Sequence[Any]

    def check(self, v: Any):
        if isinstance(v, bool) or v not in self.values:  # True == 1 must not pass for 1
            raise ValueError("one of " + ", ".join(repr(x) for x in self.values))
        return v


@dataclass(frozen=True)
class Text:
    max_len: int = 1000

    def check(self, v: Any) -> str:
        if not isinstance(v, str) or len(v) > self.max_len:
            raise ValueError(f"a string of at most {self.max_len} characters")
        return v


@dataclass(frozen=True)
class Template:
    """A class-name template such as 'a photo of a {}.': one '{}' and nothing else to fill."""

    def check(self, v: Any) -> str:
        try:
            ok = isinstance(v, str) and len(v) <= 1000 and v.format("\0").count("\0") == 1
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError("a template with one '{}' for the class name, e.g. 'a photo of a {}.'")
        return v


@dataclass(frozen=True)
class AutoOr:
    """'auto' or the wrapped kind."""
    inner: Any

    def check(self, v: Any):
        if v == "auto":
            return v
        try:
            return self.inner.check(v)
        except ValueError as exc:
            raise ValueError(f"'auto' or {exc}")


def check_options(method: str, spec: dict, defaults: dict, given: dict, where: Optional[str] = None) -> dict:
    """defaults updated by `given`, every value checked against `spec`; a ValueError naming the option,
    what it wants and what it got otherwise. `where` names the source (default: the --opt flag)."""
    where = where or "--opt"
    if not isinstance(given, dict):
        raise ValueError(f"{where}: expected an object of {method} options, got {type(given).__name__}")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{where} {unknown[0]}: method {method!r} has no such option "
                         f"(its options: {', '.join(sorted(defaults))})")
    out = {}
    for k, v in {**defaults, **given}.items():
        try:
            out[k] = spec[k].check(v)  # every option has a spec (tests/pipeline/test_pipeline_fuzz.py checks)
        except ValueError as exc:
            raise ValueError(f"{where} {k}: method {method!r} expects {exc}, got {v!r}")
    return out
