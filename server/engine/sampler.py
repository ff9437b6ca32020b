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

from .grammar import Grammar, GrammarError
from .llama_model import LlamaModel

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


class Sampler:
    """One request's sampler chain; it remembers the tokens it picked, which the penalties need."""

    def __init__(self, model: LlamaModel, params: SamplingParams, grammar: Grammar | None = None) -> None:
        self.params = params
        chain_params = llama.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self.chain = llama.llama_sampler_chain_init(chain_params)
        add = self._add

        if grammar is not None:
            # First in the chain: tokens the grammar forbids never reach the penalties or the dice.
            add(grammar_sampler(model, grammar))

        repeat = params.repetition_penalty
        freq = params.frequency_penalty or 0.0
        present = params.presence_penalty or 0.0
        if (repeat is not None and repeat != 1.0) or freq or present:
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

    def sample(self, model: LlamaModel, output_index: int) -> int:
        """Pick the next token from the logits at `output_index` of the last decode, and remember it."""
        return llama.llama_sampler_sample(self.chain, model.ctx, output_index)

    def close(self) -> None:
        if self.chain:
            llama.llama_sampler_free(self.chain)
            self.chain = None


def grammar_sampler(model: LlamaModel, grammar: Grammar) -> llama.llama_sampler_p:
    """llama.cpp's grammar sampler; raises GrammarError when llama.cpp cannot parse the grammar."""
    gbnf = grammar.gbnf.encode()
    if grammar.lazy_pattern is None:
        sampler = llama.llama_sampler_init_grammar(model.vocab, gbnf, b"root")
    else:
        patterns = (ctypes.c_char_p * 1)(grammar.lazy_pattern.encode())
        sampler = llama.llama_sampler_init_grammar_lazy_patterns(model.vocab, gbnf, b"root", patterns, 1, None, 0)
    if not sampler:
        raise GrammarError("llama.cpp could not parse the grammar built for this request")
    return sampler


def check_grammar(model: LlamaModel, grammar: Grammar) -> None:
    llama.llama_sampler_free(grammar_sampler(model, grammar))
