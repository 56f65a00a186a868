"""The head syntax, in one place: a head is (layer, head), zero-based; the command line writes it
`LAYER-HEAD` (`2-26,3-8`), files have `layer, head` columns. Pure Python (the CLI and the display
modules use it without torch)."""

from __future__ import annotations

import re
from typing import Any, Sequence

from .errors import UsageError

Head = tuple[int, int]


def _range_hint(n_layers: int, n_heads: int) -> str:
    return f"this model has layers 0-{n_layers - 1} and heads 0-{n_heads - 1}"


def parse_heads(spec: str, n_layers: int, n_heads: int) -> list[Head]:
    """Parse `"2-26,3-8"` into `[(2, 26), (3, 8)]` (zero-based LAYER-HEAD), duplicates dropped."""
    items = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not items:
        raise UsageError(f"no heads given: write heads as LAYER-HEAD, e.g. 2-26,3-8 ({_range_hint(n_layers, n_heads)})")
    heads: list[Head] = []
    for item in items:
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", item)
        if not m:
            raise UsageError(
                f"bad head {item!r}: write heads as LAYER-HEAD, e.g. 2-26,3-8 ({_range_hint(n_layers, n_heads)})"
            )
        head = (int(m.group(1)), int(m.group(2)))
        if not (0 <= head[0] < n_layers and 0 <= head[1] < n_heads):
            raise UsageError(f"head {item} is outside the model: {_range_hint(n_layers, n_heads)}")
        if head not in heads:
            heads.append(head)
    return heads


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """Parse `"0-5,7"` into `[0, 1, 2, 3, 4, 5, 7]`; `"all"` means every layer."""
    text = str(spec).strip()
    if text.lower() == "all":
        return list(range(n_layers))
    layers: list[int] = []
    for item in (s.strip() for s in text.split(",")):
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", item)
        if not m:
            raise UsageError(f"bad layer {item!r}: write layers like 0-5,7 (this model has layers 0-{n_layers - 1})")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if lo > hi or hi >= n_layers:
            raise UsageError(f"layers {item} are outside the model: it has layers 0-{n_layers - 1}")
        layers.extend(i for i in range(lo, hi + 1) if i not in layers)
    return layers


def head_label(head: Sequence[int]) -> str:
    """`(2, 26)` -> `"2-26"`."""
    return f"{int(head[0])}-{int(head[1])}"


def heads_text(heads: Sequence[Sequence[int]]) -> str:
    """Heads in the command line's syntax, `"2-26,3-8"` (`parse_heads` reads it back)."""
    return ",".join(head_label(h) for h in heads)


def table_heads(df: Any) -> list[Head]:
    """The (layer, head) of a score table's rows, in row order."""
    return [(int(a), int(b)) for a, b in zip(df["layer"], df["head"])]


def head_labels(df: Any) -> list[str]:
    """`"L-H"` for each row of a table with layer, head columns."""
    return [head_label(h) for h in table_heads(df)]
