"""JSON the model wrote, read the way the real service's JavaScript reads it."""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_null(text: str) -> float | None:
    # JSON's grammar allows 1e999; JSON.parse makes it Infinity and JSON.stringify writes that as null. Python
    # would make it inf, which no JSON answer can carry.
    value = float(text)
    return value if math.isfinite(value) else None


def parse_model_json(text: str) -> Any:
    """json.loads, with numbers beyond a double's range as null. Raises json.JSONDecodeError."""
    return json.loads(text, parse_float=finite_or_null)
