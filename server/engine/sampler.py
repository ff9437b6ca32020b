"""A request's sampling parameters as a llama.cpp native sampler chain.

Only what the request asks for goes into the chain: llama.cpp's own defaults (top_k 40, top_p 0.95,
min_p 0.05, a repeat penalty window) would otherwise quietly narrow every distribution, and Workers AI applies
none of them.
"""

from __future__ import annotations

import ctypes
import secrets
from dataclasses import dataclass

import llama_cpp as llama
import numpy as np

from .llama_model import LlamaModel
from .structured import Constraint, Step, TokenMask

# llama.cpp treats this seed value as "pick one at random".
_RANDOM_SEED = 0xFFFFFFFF
# How many recent tokens the repetition, frequency and presence penalties look at (llama.cpp's default).
PENALTY_WINDOW = 64
# llama.cpp divides by the repetition penalty; the schema's lower bound of 0 is clamped to this.
MIN_REPETITION_PENALTY = 0.01


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.6
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def native_seed(seed: int | None) -> int:
    """A 32-bit llama.cpp seed: the request's (folded, since the schema allows 10 digits) or a fresh one."""
    if seed is None:
        value = secrets.randbits(32)
    else:
        value = (seed ^ (seed >> 32)) & 0xFFFFFFFF
    return value if value != _RANDOM_SEED else 0


# Drawing first and checking the one token pays while the grammar mostly agrees with the model. After this many
# rejections in a row it mostly does not (a model that was never shown the format, random stand-in weights), and
# the mask goes first for a while, saving the wasted draw over the whole vocabulary.
REJECTIONS_BEFORE_MASKING = 3
MASKED_STEPS = 16
# A llama_token_data_array's element, for drawing from a chain without accepting the token drawn.
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class Sampler:
    """One request's sampler chain, and its grammar when it has one; remembers the tokens it picked (penalties)."""

    def __init__(self, model: LlamaModel, params: SamplingParams, constraint: Constraint | None = None) -> None:
        self.params = params
        self.constraint = constraint
        chain_params = llama.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self.chain = llama.llama_sampler_chain_init(chain_params)
        add = self._add

        repeat = params.repetition_penalty
        freq = params.frequency_penalty or 0.0
        present = params.presence_penalty or 0.0
        # Penalties remember the tokens accepted: under a grammar, a draw the grammar rejects must not count.
        self.remembers = (repeat is not None and repeat != 1.0) or bool(freq) or bool(present)
        self._candidates: np.ndarray | None = None
        # Under a grammar, drawing from the allowed tokens alone picks what drawing from the masked vocabulary
        # would (refused tokens weigh nothing and do not move the maximum), unless a sampler sorts: top-k and
        # top-p could order equal logits differently.
        sorts = params.top_k is not None or (params.top_p is not None and params.top_p < 1.0)
        self._draws_from_allowed = params.greedy or not sorts
        self._rejections = 0  # in a row
        self._masked_steps = 0  # steps left with the mask first
        if self.remembers:
            repeat = 1.0 if repeat is None else max(repeat, MIN_REPETITION_PENALTY)
            add(llama.llama_sampler_init_penalties(model.n_vocab, PENALTY_WINDOW, repeat, freq, present))
        if params.greedy:
            add(llama.llama_sampler_init_greedy())
            return
        if params.top_k is not None:
            add(llama.llama_sampler_init_top_k(params.top_k))
        if params.top_p is not None and params.top_p < 1.0:
            # min_keep 1: top_p 0 means "only the most likely token", not an empty candidate list.
            add(llama.llama_sampler_init_top_p(params.top_p, 1))
        add(llama.llama_sampler_init_temp(params.temperature))
        add(llama.llama_sampler_init_dist(native_seed(params.seed)))

    def _add(self, sampler: llama.llama_sampler_p) -> None:
        # The chain owns what is added and frees it with itself.
        llama.llama_sampler_chain_add(self.chain, sampler)

    @property
    def finished(self) -> bool:
        """The grammar allows nothing more: the answer is complete."""
        return self.constraint is not None and self.constraint.finished

    def next(self, model: LlamaModel, logits: int | np.ndarray, tokens_left: int) -> Step:
        """The tokens that follow `logits` (an output index of the last decode, or logits kept with the cache,
        which this may write over): the one sampled, then, under a grammar, the ones it forces (or the ending
        the budget calls for)."""
        step = self._constrained(model, logits, tokens_left) if self.constraint else Step([self._draw(model, logits)])
        if self.remembers:
            for token in step.tokens:
                llama.llama_sampler_accept(self.chain, token)
        return step

    def _constrained(self, model: LlamaModel, logits: int | np.ndarray, tokens_left: int) -> Step:
        assert self.constraint is not None
        # Sample as if free, and ask the grammar about that one token; only a rejected draw pays for the mask.
        # Masking after the draw gives the masked distribution: temperature and penalties act on each token
        # alone, so a valid draw is as likely as it would be with the mask applied first.
        if self._masked_steps:
            self._masked_steps -= 1
            token = self._draw(model, logits, self.constraint.allowed())
        else:
            token = self._draw(model, logits)
            if self.constraint.allows(token):
                self._rejections = 0
            else:
                self._rejections += 1
                if self._rejections >= REJECTIONS_BEFORE_MASKING:
                    self._rejections, self._masked_steps = 0, MASKED_STEPS
                token = self._draw(model, logits, self.constraint.allowed())
        if model.is_end_of_generation(token):
            return Step([token])
        return self.constraint.take(token, tokens_left)

    def _draw(self, model: LlamaModel, logits: int | np.ndarray, allowed: TokenMask | None = None) -> int:
        row = model.logits(logits) if isinstance(logits, int) else logits
        ids = allowed.ids() if allowed is not None and self._draws_from_allowed else None  # None: all tokens
        if allowed is not None and ids is None:
            np.copyto(row, np.float32(-np.inf), where=allowed.refused())
        if self.params.greedy and not self.remembers:
            # The most likely (allowed) token, found in place: llama.cpp's greedy sampler would first copy the
            # whole row into a candidate array for the same answer (the first of equal maxima).
            return int(np.argmax(row)) if ids is None else int(ids[np.argmax(row[ids])])
        if ids is None and isinstance(logits, int) and not self.remembers:
            # Stateless samplers accept nothing, so the chain may draw straight from the context's logits.
            return llama.llama_sampler_sample(self.chain, model.ctx, logits)
        # Otherwise the chain draws from a candidate array of our own; next() has it accept the tokens kept.
        if self._candidates is None:
            self._candidates = np.zeros(model.n_vocab, dtype=_TOKEN_DATA)
        size = model.n_vocab if ids is None else len(ids)
        candidates = self._candidates[:size]
        # The ids are written every time: the chain may have sorted them.
        candidates["id"] = np.arange(size, dtype=np.int32) if ids is None else ids
        candidates["logit"] = row if ids is None else row[ids]
        array = llama.llama_token_data_array(
            data=candidates.ctypes.data_as(llama.llama_token_data_p), size=size, selected=-1, sorted=False
        )
        llama.llama_sampler_apply(self.chain, ctypes.byref(array))
        return int(candidates["id"][array.selected])

    def close(self) -> None:
        if self.chain:
            llama.llama_sampler_free(self.chain)
            self.chain = None
