"""Decoding under a grammar: as fast as free text, and always complete.

Fast: the sampler draws as it would without a grammar and asks llguidance about that one token (microseconds);
only a rejected draw pays for the full vocabulary mask, and where the grammar allows exactly one continuation
(keys, separators, a tool's name) the forced tokens are fed without sampling at all.

Complete: while a JSON document is open, the shortest valid ending from the current state is known (completion.py)
whenever the budget comes near. A sampled token is kept only if the ending after it still fits in the tokens left;
otherwise the ending kept from before it is forced, so the document closes, valid, with the budget. Before
generation, a budget that cannot hold the shortest valid answer is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import llguidance as llg
import numpy as np

from .completion import Completer, Schemas, SchemaTooCostly, SearchBudget
from .grammar import CALL_SEPARATOR, LAYOUT, Grammar, GrammarError
from .llama_model import LlamaModel

# While a document is open, its shortest ending is re-measured this often, and checked at every token once the
# tokens left come within this margin of it.
ENDING_REFRESH_TOKENS = 16
ENDING_MARGIN_TOKENS = 48
# Tokenized endings kept per model.
TOKENIZED_KEPT = 4096


class _TokenTable:
    """The model's vocabulary in the shape llguidance's TokenizerWrapper reads."""

    def __init__(self, model: LlamaModel) -> None:
        self.model = model
        self.tokens = [model.token_bytes(t) for t in range(model.n_vocab)]
        self.special_token_ids = [t for t in range(model.n_vocab) if model.is_control(t)]
        for t in self.special_token_ids:
            self.tokens[t] = b"\xff" + self.tokens[t]  # llguidance's mark: never matched as text
        self.eos_token_id = model.eos
        self.bos_token_id = model.bos

    def __call__(self, text: str | bytes) -> list[int]:
        return self.model.tokenize_text(text.encode() if isinstance(text, str) else text)


class Vocabulary:
    """llguidance's view of the model's tokens, built once per model (about a second for 128K tokens)."""

    def __init__(self, model: LlamaModel) -> None:
        self.size = model.n_vocab
        eog = [t for t in range(model.n_vocab) if model.is_end_of_generation(t)]
        self.tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(_TokenTable(model)), eos_token=eog)
        # Endings repeat (the same closing brackets and missing keys, step after step near the budget), and
        # tokenizing one goes through llama.cpp's tokenizer.
        self._tokens: dict[bytes, tuple[int, ...]] = {}

    def compile(self, grammar: Grammar) -> str:
        """llguidance's form of the grammar; GrammarError names what cannot be enforced (e.g. an unsupported
        JSON Schema keyword)."""
        try:
            compiled = llg.grammar_from("lark", grammar.lark)
        except ValueError as exc:
            raise GrammarError(str(exc)) from exc
        matcher = llg.LLMatcher(self.tokenizer, compiled, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return compiled

    def tokens(self, data: bytes) -> list[int]:
        known = self._tokens.get(data)
        if known is None:
            if len(self._tokens) >= TOKENIZED_KEPT:
                self._tokens.clear()
            known = self._tokens[data] = tuple(self.tokenizer.tokenize_bytes(data) if data else ())
        return list(known)

    def shortest_answer(self, grammar: Grammar, gone: Callable[[], bool] = lambda: False) -> int:
        """Tokens of the shortest answer the grammar allows that closes every JSON document it opens. Raises
        GrammarError where finding it costs too much, Withdrawn once `gone()` (checked as it goes)."""
        try:
            ending = _Documents(grammar, SearchBudget(gone=gone)).ending()
        except SchemaTooCostly as exc:
            raise GrammarError(str(exc)) from exc
        if ending is None:
            raise GrammarError("no JSON document satisfies this schema")
        return len(self.tokens(ending))


class _Documents:
    """Where the answer's JSON documents start and end: JSON mode's is the whole answer; a tool answer is text, or
    calls separated by '; ' (each a document); a special token such as <|python_tag|> has no bytes here."""

    def __init__(self, grammar: Grammar, budget: SearchBudget | None = None) -> None:
        self.grammar = grammar
        assert grammar.document is not None or not grammar.whole_answer
        self.schemas = Schemas(grammar.document, LAYOUT, budget) if grammar.document is not None else None
        self.completer = self._completer() if grammar.whole_answer else None
        self.state = "document" if grammar.whole_answer else "start"  # start, text, document, between
        self.separator = b""  # how much of the separator between calls has been written

    def _completer(self) -> Completer:
        assert self.grammar.document is not None
        return Completer(self.grammar.document, LAYOUT, self.schemas)

    def copy(self) -> _Documents:
        twin = _Documents.__new__(_Documents)
        twin.grammar, twin.schemas, twin.state, twin.separator = self.grammar, self.schemas, self.state, self.separator
        twin.completer = self.completer.copy() if self.completer is not None else None
        return twin

    @property
    def open(self) -> bool:
        """A document is under way, or owed (after a separator, or when only calls are allowed)."""
        if self.grammar.document is None:
            return False
        owed_first = self.state == "start" and not self.grammar.text_allowed
        return self.state == "document" or bool(self.separator) or owed_first

    def feed(self, data: bytes) -> None:
        if self.grammar.document is None or self.state == "text":
            return
        if self.grammar.whole_answer:  # one document from the first byte to the last: no state to follow
            assert self.completer is not None
            self.completer.feed(data)
            return
        for b in data:
            self._byte(b)

    def _byte(self, b: int) -> None:
        if self.state == "document":
            assert self.completer is not None
            self.completer.feed(bytes([b]))
            if self.completer.complete and not self.grammar.whole_answer:
                self.state, self.completer = "between", None
        elif self.state == "start" and chr(b).isspace():
            pass  # whitespace before a call, or text that is only whitespace so far
        elif b == ord("{") and (self.state == "start" or self.separator == CALL_SEPARATOR.encode()):
            self.state, self.separator = "document", b""
            self.completer = self._completer()
            self.completer.feed(bytes([b]))
        elif self.state == "between":
            self.separator += bytes([b])
        else:
            self.state = "text"

    def ending(self) -> bytes | None:
        """The fewest bytes that close every document the answer has opened or owes (b"" when none is open)."""
        if not self.open:
            return b""
        if self.state == "document":
            assert self.completer is not None
            return self.completer.ending()
        owed = CALL_SEPARATOR.encode()[len(self.separator) :] if self.separator else b""
        shortest = self._completer().ending()
        return None if shortest is None else owed + shortest


# Listing the allowed tokens beats masking the whole vocabulary while at most this share of its 32-token words
# allows any: in a number, a key or between values, a few hundred of a 128K vocabulary's 4,008 words do.
SPARSE_SHARE = 0.25


class TokenMask:
    """llguidance's bitmask of the tokens allowed next: token t is bit t % 32 of word t // 32."""

    def __init__(self, bitmask: np.ndarray, size: int) -> None:
        self.bitmask = bitmask
        self.size = size

    def ids(self) -> np.ndarray | None:
        """The allowed tokens in increasing order, or None when they are too many to list cheaply."""
        if np.count_nonzero(self.bitmask) > SPARSE_SHARE * len(self.bitmask):
            return None
        return np.flatnonzero(np.unpackbits(self.bitmask.view(np.uint8), count=self.size, bitorder="little").view(bool))

    def refused(self) -> np.ndarray:
        """True for each token of the vocabulary that is not allowed."""
        return np.unpackbits(~self.bitmask.view(np.uint8), count=self.size, bitorder="little").view(bool)


@dataclass
class Step:
    tokens: list[int]  # to emit, in order
    ended: bool = False  # the budget closed the answer: emit these and stop


class Constraint:
    """One answer's grammar as it is decoded: which tokens it allows, what it forces, and how it must end."""

    def __init__(self, vocabulary: Vocabulary, compiled: str, grammar: Grammar, model: LlamaModel) -> None:
        self.vocabulary = vocabulary
        self.model = model
        self.matcher = llg.LLMatcher(vocabulary.tokenizer, compiled, log_level=0)
        self.documents = _Documents(grammar)
        self._bitmask = np.zeros((vocabulary.size + 31) // 32, dtype=np.int32)
        self._ending: list[int] | None = None  # the tokens that close what is open, measured at this state
        self._ending_age = 0  # tokens accepted since it was measured

    @property
    def finished(self) -> bool:
        """Nothing more may follow but the end of generation."""
        return self.matcher.is_stopped()

    def allows(self, token: int) -> bool:
        return self.matcher.validate_tokens([token]) == 1

    def allowed(self) -> TokenMask:
        """The tokens the grammar allows next (read it before the next call: it shares one buffer)."""
        self.matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
        if not self._bitmask.any():
            raise GrammarError(f"the grammar allows no token: {self.matcher.get_error()}")
        return TokenMask(self._bitmask, self.vocabulary.size)

    def take(self, token: int, tokens_left: int) -> Step:
        """Accept a sampled token the grammar allows, and the tokens it then forces, unless that would leave too
        few tokens to close the open document: then the document's ending is taken instead."""
        if self.documents.open and (self._ending is None or self._ending_age >= ENDING_REFRESH_TOKENS):
            self._measure()
        near = self.documents.open and tokens_left <= len(self._ending or ()) + ENDING_MARGIN_TOKENS
        if not near:
            tokens = self._accept_with_forced(token, tokens_left)
            self._ending_age += len(tokens)
            if not self.documents.open:
                self._ending = None
            return Step(tokens, ended=False)
        trial = self._copy()
        tokens = trial._accept_with_forced(token, tokens_left)
        trial._measure()
        if trial._ending is not None and len(tokens) + len(trial._ending) <= tokens_left:
            self._adopt(trial)
            return Step(tokens, ended=False)
        ending = (self._ending or [])[:tokens_left]  # fits by the last step's check (truncated only if never measured)
        for t in ending:
            self._accept(t)
        return Step(ending, ended=True)

    # -- internals -------------------------------------------------------------------------------------------

    def _accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GrammarError(f"the grammar refused token {token}: {self.matcher.get_error()}")
        self.documents.feed(self.model.piece(token))

    def _accept_with_forced(self, token: int, tokens_left: int) -> list[int]:
        self._accept(token)
        forced = self.matcher.compute_ff_tokens()[: max(0, tokens_left - 1)] if not self.finished else []
        for t in forced:
            self._accept(t)
        return [token, *forced]

    def _measure(self) -> None:
        ending = self.documents.ending()
        self._ending = None if ending is None else self.vocabulary.tokens(ending)
        self._ending_age = 0

    def _copy(self) -> Constraint:
        twin = Constraint.__new__(Constraint)
        twin.vocabulary, twin.model, twin._bitmask = self.vocabulary, self.model, self._bitmask
        twin.matcher, twin.documents = self.matcher.deep_copy(), self.documents.copy()
        twin._ending, twin._ending_age = self._ending, self._ending_age
        return twin

    def _adopt(self, trial: Constraint) -> None:
        self.matcher, self.documents = trial.matcher, trial.documents
        self._ending, self._ending_age = trial._ending, trial._ending_age
