"""Server-Sent Events framing as Workers AI writes it: `data: {json}` per event, `data: [DONE]` at the end."""

from __future__ import annotations

import json
import random
import secrets
import string

# Workers AI pads each event with a random-length `p` field so that event sizes do not reveal token lengths.
_PAD_ALPHABET = string.ascii_letters + string.digits
_MAX_PAD = 24
# Seeded from the OS once; SystemRandom would make a system call per padding character, on every token.
_pad_rng = random.Random(secrets.randbits(64))

DONE = b"data: [DONE]\n\n"
MEDIA_TYPE = "text/event-stream"
HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def _padding() -> str:
    return "".join(_pad_rng.choices(_PAD_ALPHABET, k=_pad_rng.randint(1, _MAX_PAD)))


def event(payload: dict[str, object], padded: bool = True) -> bytes:
    body = {**payload, "p": _padding()} if padded else payload
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
