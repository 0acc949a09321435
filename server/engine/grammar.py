"""Grammar-constrained decoding on llguidance: compile once, match per request.

``GrammarSpec`` is what a request asks for (a JSON schema, any JSON object, a regex or a
Lark grammar). ``GrammarCompiler`` turns a spec into a ``CompiledGrammar`` once and caches
it (LRU, keyed by the spec); each request gets its own ``GrammarMatcher``, a copy of the
compiled grammar's start state.

The matcher's state always follows the request's emitted tokens (``Request.emit`` feeds
it). ``mask_rows`` gives the token mask of every logits row whose position it can reach:
it consumes the tokens between the emitted text and that row's position (the drafts of a
verify pass, the revealed prefix of a diffusion canvas), stops at a mask token or a token
the grammar refuses (rows past that point keep their logits: no valid text reaches them),
and rolls everything back. ``count_valid`` says how long a run of tokens the grammar
accepts from the current state, without moving it.

llguidance is imported lazily: a server whose requests ask for no grammar never loads it.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import torch

from server.engine.params import ParamError

GrammarKind = Literal["json_schema", "json_object", "regex", "lark"]
CACHE_SIZE = 256
# Compact JSON (", " and ": " separators, no free whitespace): a model that likes newlines
# cannot fill the budget with them. A schema's own "x-guidance" options override this.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}


@dataclass(frozen=True)
class GrammarSpec:
    """A grammar request: ``source`` is canonical JSON text (schemas) or the regex/Lark text."""

    kind: GrammarKind
    source: str = ""

    @classmethod
    def json_schema(cls, schema: dict[str, Any]) -> "GrammarSpec":
        # key order is kept: llguidance emits an object's properties in the schema's order
        return cls("json_schema", json.dumps(schema, separators=(",", ":")))

    def grammar_text(self) -> str:
        """The llguidance grammar for this spec."""
        from llguidance import LLMatcher

        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(self.source, defaults=JSON_OPTIONS)
        if self.kind == "json_object":
            return LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_OPTIONS)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.source)
        return LLMatcher.grammar_from_lark(self.source)


class GrammarMatcher:
    """One request's position in its grammar (wraps an ``llguidance.LLMatcher``)."""

    def __init__(self, matcher: Any, vocab_size: int, eos_ids: frozenset[int]) -> None:
        self._m = matcher
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids  # the tokens the grammar lets end the text when it is complete

    @property
    def is_stopped(self) -> bool:
        """The grammar is complete and admits no further token (other than EOS)."""
        return self._m.is_stopped()

    def accept(self, token: int) -> bool:
        """Advance by ``token`` if the grammar allows it; False (state unchanged) otherwise."""
        if self._m.validate_tokens([token]) != 1:
            return False
        return bool(self._m.consume_token(token))

    def count_valid(self, tokens: list[int]) -> int:
        """How many leading ``tokens`` the grammar accepts from here (state unchanged)."""
        return int(self._m.validate_tokens(tokens)) if tokens else 0

    def stop_index(self, tokens: list[int]) -> int | None:
        """The number of leading ``tokens`` (all valid) after which the grammar is complete and
        stopped, or None; state unchanged."""
        consumed, found = 0, None
        for tok in tokens:
            if not self.accept(tok):
                break
            consumed += 1
            if self._m.is_stopped():
                found = consumed
                break
        self._m.rollback(consumed)
        return found

    def mask_rows(self, logits: torch.Tensor, sequence: list[int], start: int, positions: list[int],
                  mask_token_id: int | None) -> torch.Tensor:
        """``logits`` [R, V] with every reachable row masked to the grammar (a new tensor).

        Row i chooses the token at absolute position ``positions[i]`` (ascending); the matcher
        stands at position ``start`` (``sequence[:start]`` emitted)."""
        from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

        bitmask = allocate_token_bitmask(len(positions), self.vocab_size)
        reached = []
        consumed, pos = 0, start
        for row, target in enumerate(positions):
            while pos < target:
                tok = sequence[pos]
                if tok == mask_token_id or not self.accept(tok):
                    break
                consumed += 1
                pos += 1
            if pos != target:
                break
            fill_next_token_bitmask(self._m, bitmask, row)
            reached.append(row)
        self._m.rollback(consumed)
        if not reached:
            return logits
        allowed = unpack_bitmask(bitmask[reached], logits.shape[-1]).to(logits.device)
        out = logits.clone()
        rows = torch.tensor(reached, device=logits.device)
        out[rows] = out[rows].masked_fill(~allowed, float("-inf"))
        return out


def unpack_bitmask(bitmask: torch.Tensor, width: int) -> torch.Tensor:
    """int32 [R, W] bit words (bit j of word w = token 32w + j) -> bool [R, width]."""
    shifts = torch.arange(32, dtype=torch.int32)
    bits = (bitmask[:, :, None] >> shifts) & 1
    flat = bits.reshape(bitmask.shape[0], -1).bool()
    if flat.shape[1] < width:
        flat = torch.cat([flat, flat.new_zeros(flat.shape[0], width - flat.shape[1])], dim=1)
    return flat[:, :width]


MAX_REPETITION = 10_000
# regex {n} / {n,m}, and Lark's ~n / ~n..m
_REPETITION = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}|~\s*(\d+)(?:\s*\.\.\s*(\d+))?")


def _patterns(node: Any) -> list[str]:
    """The regexes of a JSON schema (``pattern`` values and ``patternProperties`` keys)."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "pattern" and isinstance(value, str):
                found.append(value)
            elif key == "patternProperties" and isinstance(value, dict):
                found.extend(k for k in value if isinstance(k, str))
            found.extend(_patterns(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_patterns(value))
    return found


def check_repetitions(spec: GrammarSpec) -> None:
    """Refuse a regex repetition count above ``MAX_REPETITION`` (``a{99999999}``): llguidance
    would spend many seconds building its lexer on the engine thread."""
    if spec.kind in ("regex", "lark"):
        texts = [spec.source]
    elif spec.kind == "json_schema":
        try:
            texts = _patterns(json.loads(spec.source))
        except ValueError:
            texts = []
    else:
        texts = []
    for text in texts:
        for match in _REPETITION.finditer(text):
            if any(g and int(g) > MAX_REPETITION for g in match.groups()):
                raise ParamError("response_format", f"response_format: a repetition count above {MAX_REPETITION} ({match.group(0)}) is not supported")


def _limits() -> Any:
    """Resource limits of a grammar: lower than llguidance's defaults on size, since a grammar
    is compiled and first matched on the engine thread (a huge repetition count in a regex
    would otherwise stall every request for many seconds); terse errors (they reach the user)."""
    from llguidance import LLParserLimits

    return LLParserLimits(max_grammar_size=50_000, max_lexer_states=50_000, verbose_errors=False)


@dataclass
class CompiledGrammar:
    """A grammar compiled against the tokenizer; ``matcher()`` gives a fresh per-request state."""

    template: Any  # llguidance.LLMatcher at the start state, never advanced
    vocab_size: int
    eos_ids: frozenset[int]
    compile_seconds: float

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self.template.deep_copy(), self.vocab_size, self.eos_ids)


class GrammarCompiler:
    """Compiles ``GrammarSpec``s for one tokenizer, with an LRU cache of compiled grammars."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: frozenset[int], cache_size: int = CACHE_SIZE) -> None:
        if tokenizer is None:
            raise ParamError("response_format", "response_format needs the model's tokenizer, and this checkpoint has none")
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = frozenset(eos_ids)
        self.cache_size = cache_size
        self._ll_tokenizer: Any = None
        self._cache: OrderedDict[GrammarSpec, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.compilations = 0  # cache misses (tests and benchmarks read it)

    def _tokenizer(self) -> Any:
        if self._ll_tokenizer is None:
            import llguidance.hf

            eos = sorted(self.eos_ids) or None
            self._ll_tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=eos)
        return self._ll_tokenizer

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """The compiled grammar of ``spec`` (cached); ParamError naming response_format if invalid."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        from llguidance import LLMatcher

        t0 = time.perf_counter()
        check_repetitions(spec)
        try:
            text = spec.grammar_text()
        except (ValueError, TypeError) as exc:
            raise ParamError("response_format", f"response_format: invalid {spec.kind}: {exc}") from None
        try:
            template = LLMatcher(self._tokenizer(), text, log_level=0, limits=_limits())
        except Exception as exc:  # llguidance raises on some grammar errors instead of flagging them
            raise ParamError("response_format", f"response_format: invalid {spec.kind}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
        if template.is_error():
            raise ParamError("response_format", f"response_format: invalid {spec.kind}: {template.get_error().splitlines()[0]}")
        compiled = CompiledGrammar(template, self.vocab_size, self.eos_ids, time.perf_counter() - t0)
        with self._lock:
            self.compilations += 1
            self._cache[spec] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled
