"""One measured run of one case in one mode: what every scenario returns and the report reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Row:
    scenario: str
    case: str
    mode: str
    rep: int
    metrics: dict[str, float]
    ok: bool
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
