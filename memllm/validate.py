"""Checks for structured data read from outside memllm (snapshot manifests, saved document memories,
imported records): each takes a parsed JSON value, the place it came from, and the named error to
raise, and returns the value when it has the expected type and range. A bool is never taken for an
int, a float never for an int, and every size is bounded, so a hand-edited or corrupt file gives one
clear line (the CLI turns the named error into an exit code), never a traceback further down.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

MAX_COUNT = 1 << 48  # tokens, units, positions: far above anything real, far below overflow
MAX_DEPTH = 32  # nesting of free-form JSON (record metadata)

Raise = Callable[[str], Exception]


def _name(value: Any) -> str:
    return "a bool" if isinstance(value, bool) else type(value).__name__


def obj(value: Any, where: str, err: Raise) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise err(f"{where} must be a JSON object, got {_name(value)}")
    return value


def seq(value: Any, where: str, err: Raise, max_len: int = MAX_COUNT) -> list[Any]:
    if not isinstance(value, list):
        raise err(f"{where} must be a list, got {_name(value)}")
    if len(value) > max_len:
        raise err(f"{where} has {len(value):,} entries, more than {max_len:,}")
    return value


def integer(value: Any, where: str, err: Raise, lo: int = 0, hi: int = MAX_COUNT) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise err(f"{where} must be an integer, got {_name(value)}")
    if not lo <= value <= hi:
        raise err(f"{where} must be between {lo:,} and {hi:,}, got {value:,}")
    return value


def number(value: Any, where: str, err: Raise, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise err(f"{where} must be a number, got {_name(value)}")
    if not (math.isfinite(value) and lo <= value <= hi):
        raise err(f"{where} must be between {lo:g} and {hi:g}, got {value!r}")
    return float(value)


def text(value: Any, where: str, err: Raise, max_len: int = 1 << 20, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise err(f"{where} must be a string, got {_name(value)}")
    if len(value) > max_len:
        raise err(f"{where} is {len(value):,} characters, more than {max_len:,}")
    return value


def boolean(value: Any, where: str, err: Raise) -> bool:
    if not isinstance(value, bool):
        raise err(f"{where} must be true or false, got {_name(value)}")
    return value


def one_of(value: Any, choices: tuple[str, ...], where: str, err: Raise) -> str:
    if not isinstance(value, str) or value not in choices:
        raise err(f"{where} must be one of {', '.join(choices)}, got {value!r}")
    return value


def plain_json(value: Any, where: str, err: Raise, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """Free-form JSON (dicts with string keys, lists, strings, finite numbers, bools, null), at most
    `max_depth` deep and `max_bytes` long once written."""

    def walk(v: Any, depth: int) -> None:
        if depth > max_depth:
            raise err(f"{where} is nested more than {max_depth} levels deep")
        if isinstance(v, dict):
            for k, item in v.items():
                if not isinstance(k, str):
                    raise err(f"{where} has a key that is not a string ({_name(k)})")
                walk(item, depth + 1)
        elif isinstance(v, list | tuple):
            for item in v:
                walk(item, depth + 1)
        elif isinstance(v, float) and not math.isfinite(v):
            raise err(f"{where} holds {v!r}, which JSON cannot store")
        elif v is not None and not isinstance(v, str | int | float | bool):
            raise err(f"{where} holds a {_name(v)}, which JSON cannot store")

    walk(value, 0)
    size = len(json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise err(f"{where} is {size:,} bytes once written, more than {max_bytes:,}")
    return value
