"""Run options: how a request is to be run, not what the model is given. Workers AI takes them beside the inputs:
the binding's third argument (`env.AI.run(model, inputs, options)`, sent as `{"inputs", "options"}`), an
`options` object in a REST or Chat Completions body.

`rejectIfBusy`: fail at once with 429/3040 where the request would otherwise wait for capacity.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import bad_input


@dataclass(frozen=True)
class RunOptions:
    reject_if_busy: bool = False

    @classmethod
    def from_body(cls, body: Mapping[str, Any], top_level: bool = False) -> RunOptions:
        """The options of a body that carries them in `options` (and, with `top_level`, as its own fields too)."""
        options = body.get("options")
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise bad_input("Error: '/options' must be an object")
        reject = options.get("rejectIfBusy")
        where = "/options/rejectIfBusy"
        if reject is None and top_level:
            reject, where = body.get("rejectIfBusy"), "/rejectIfBusy"
        if reject is not None and not isinstance(reject, bool):
            raise bad_input(f"Error: '{where}' must be a boolean")
        return cls(reject_if_busy=bool(reject))


DEFAULT_OPTIONS = RunOptions()
