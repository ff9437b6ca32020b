"""The model's own chat template (the Jinja text in its GGUF metadata), rendered as Hugging Face renders it.

Rendering the template itself, rather than llama.cpp's built-in approximations, keeps every turn byte-exact
for whatever GGUF the user brings, Llama 3.1's tool and `ipython` turns included.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from jinja2 import TemplateError, meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

# llama.cpp's fallback for a GGUF without a template.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ChatTemplateError(Exception):
    """The template refused these messages (many raise on a role order they do not support)."""


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    # Hugging Face's tojson keeps non-ASCII as is; Jinja's escapes it into \\uXXXX, which changes the tokens.
    return json.dumps(value, ensure_ascii=False, indent=indent)


TODAY = "today"


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str, eos_token: str, date: str = "") -> None:
        """`date`: what the template's `date_string` says. Empty: the template's own default (Llama 3.1's is
        "26 Jul 2024"), so the same request gives the same prompt, cache and answer on any day; "today": the
        date of each request, as Hugging Face renders it; anything else: that text."""
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        if date == TODAY:
            # Templates that read the clock themselves (Llama 3.2's calls strftime_now) do so only when asked.
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.source = source or CHATML
        self._template = env.from_string(self.source)
        # Templates that render tool definitions themselves (Llama 3.1's) read a `tools` variable.
        self.knows_tools = "tools" in meta.find_undeclared_variables(env.parse(self.source))
        self._bos_token = bos_token
        self._eos_token = eos_token
        self._date = date

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        variables: dict[str, Any] = {}
        if self._date:
            variables["date_string"] = datetime.now().strftime("%d %b %Y") if self._date == TODAY else self._date
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                tools=list(tools) if tools else None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos_token,
                eos_token=self._eos_token,
                **variables,
            )
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, KeyError, ValueError) as exc:
            raise ChatTemplateError(f"the model's chat template failed on these messages: {exc}") from exc
