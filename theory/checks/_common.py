"""What every check shares: where results go, atomic writes, a plain-text table."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparsetune.files import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"


def write_json(target: Path, payload: dict[str, Any]) -> Path:
    text = json.dumps(payload, indent=1, allow_nan=False) + "\n"
    return atomic_write(target, lambda tmp: Path(tmp).write_text(text))


def save_figure(fig: Any, target: Path) -> Path:
    return atomic_write(target, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Right-aligned columns; floats with 4 significant digits."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
