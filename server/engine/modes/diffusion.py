"""Block diffusion: causal prefill, then per block a canvas of mask tokens denoised with
bidirectional attention (full view of the cached prefix), then a causal commit pass.

Per block of ``B`` positions starting at ``L = num_computed``:
- canvas = [seed, MASK x (B-1)] when ``seed_first_position`` (seed = the causal prediction
  from the previous pass's last logits), else [MASK x B]; B shrinks only at the context limit;
- each denoise pass (at most ``refine_steps``) reveals masked positions by the policy;
  revealed tokens stay revealed; on the last allowed pass every remaining mask is revealed;
- a stop token revealed at i freezes the positions after it (they never need revealing), and
  so does the length budget: positions at or past the number of tokens the request may still
  emit (max_tokens, context) are never revealed, they stay masks;
- the finished block is emitted (cut at the first stop token and at max_tokens); if the
  request goes on, a causal commit pass writes the block's K/V, and its last logits give
  the next seed. Denoise passes never write the cache.

``lookahead``: the commit pass, and the prefill pass that ends the prompt, also carry the
next block as a canvas of masks after the committed rows (attention "causal_then_block": the
committed rows causal, the canvas bidirectional over itself, the prefix and the committed
rows, as in a denoise pass). The next block then starts with the seed in place and every
other position whose proposal from that canvas reaches ``threshold`` (whatever the policy)
already revealed; the rest is denoised as usual (the commit pass is not counted in
``refine_steps``). The proposals are made without the seed (an all-mask canvas), so the
threshold is what keeps them safe. The fused pass is atomic (it waits for a step with room;
a prompt chunked under the step budget leaves its last token to it), so ``largest_pass``
doubles. Requests with a grammar or logit controls (their rows need the committed text
before every position), and image prompts' prefill, commit plainly.

``guess_seed`` (with ``lookahead`` and a seeded canvas): every pass over an open block carries
one more masked row after it (when another block follows), whose proposal guesses the next
block's seed; the commit pass's canvas is then ``[guess, MASK x (B-1)]`` (plus that row), and
the prompt's last pass carries no canvas (there is no guess yet). If the guess is the seed the
commit pass computes, its canvas is the next block's first denoise pass (same tokens, same
rows), applied as one (it counts in ``refine_steps``; any policy); if not, its proposals are
dropped and the block is denoised as usual. So the text is lookahead-off decoding's (with the
extra row) whatever the guesses, and a right guess saves a pass.

``confidence``: what ``threshold`` (and the low_confidence ranking) compares: a proposal's
probability (``"probability"``, the softmax over all ids, mask included, as HF does), or its
margin over the runner-up (``"margin"``: that probability minus the next most likely non-mask
id's), which holds back tokens the model hesitates over between two candidates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from server.engine.grammar import GrammarMatcher
from server.engine.modes.base import DecodeMode, check_fits, mode_state, prefill_work, sample_spec
from server.engine.params import ModeParams, ResolveContext, UnmaskPolicy
from server.engine.request import ModeState, Request
from server.engine.sampler import SALT_DENOISE, SALT_LOOKAHEAD, RowResult, RowSpec
from server.engine.work import PREFILL, Work, WorkKind

DENOISE = WorkKind("denoise", writes_kv=False, attention="bidirectional")
COMMIT = WorkKind("commit", writes_kv=True, attention="causal")  # a prefill of the emitted block
# a commit / the prompt's last prefill chunk whose pass also proposes the next block
# (``lookahead``); only the committed rows write
COMMIT_LOOKAHEAD = WorkKind("commit_lookahead", writes_kv=True, attention="causal_then_block")
PREFILL_LOOKAHEAD = WorkKind("prefill_lookahead", writes_kv=True, attention="causal_then_block")
LOOKAHEAD_KINDS = (PREFILL_LOOKAHEAD, COMMIT_LOOKAHEAD)

BUILTIN_DEFAULTS: dict[str, Any] = {
    "threshold": 0.9, "policy": "threshold", "seed_first_position": True, "lookahead": False, "confidence": "probability",
    "guess_seed": False,
}


@dataclass(frozen=True)
class DiffusionParams(ModeParams):
    mask_token_id: int
    block_length: int
    refine_steps: int  # denoise passes allowed per block
    threshold: float
    policy: UnmaskPolicy
    seed_first_position: bool
    lookahead: bool
    confidence: str  # "probability" (HF) or "margin": what threshold and the policies rank by
    guess_seed: bool  # with lookahead: the commit pass's canvas starts with the previous pass's guess


GRAMMAR_OPEN = 2**31


@dataclass
class DiffusionState(ModeState):
    seed: int | None = None  # causal prediction for the next block's first position
    canvas: list[int] | None = None
    revealed: list[bool] = field(default_factory=list)
    steps: int = 0  # denoise passes spent on the current block
    has_blocks: bool = False  # a block was emitted since the last (re)prefill
    grammar_end: int = GRAMMAR_OPEN  # constrained: the canvas length after which the grammar is complete
    guess: int | None = None  # guess_seed: the latest proposal for the position after the open block


def select_reveals(
    candidates: list[int], confidences: dict[int, float], policy: str, threshold: float, steps_left: int
) -> list[int]:
    """Which candidate positions to reveal this pass. Always at least one; all on the last pass.

    threshold: the most confident candidate plus every candidate with confidence >= threshold;
    low_confidence: the k most confident, k = ceil(candidates / passes left);
    leftmost: the k leftmost, same k."""
    if not candidates:
        return []
    if steps_left <= 1:
        return list(candidates)
    if policy == "threshold":
        best = max(candidates, key=lambda i: (confidences[i], -i))
        return sorted({best} | {i for i in candidates if confidences[i] >= threshold})
    k = math.ceil(len(candidates) / steps_left)
    if policy == "low_confidence":
        ranked = sorted(candidates, key=lambda i: (-confidences[i], i))
        return sorted(ranked[:k])
    assert policy == "leftmost", policy  # validated by KNOB_RULES
    return sorted(candidates)[:k]


def grammar_reveals(
    grammar: GrammarMatcher,
    st: DiffusionState,
    candidates: list[int],
    proposals: dict[int, RowResult],
    confidences: dict[int, float],
    dp: "DiffusionParams",
    steps_left: int,
) -> list[int]:
    """The reveal rule of a constrained request: a run of positions, left to right from the
    first masked one, that the grammar accepts after the revealed prefix.

    The revealed positions of a constrained canvas are always a prefix of it, so the
    candidates are contiguous. The first one was sampled from the grammar-masked row and is
    always revealed; the run goes on while the grammar accepts the next proposal and the
    policy wants it (threshold: confidence >= threshold; low_confidence / leftmost: up to
    k = ceil(candidates / passes left), all on the last pass). ``refine_steps`` is thus a
    target: a pass reveals at least one token, so a block takes at most its length in passes.
    If the run completes the grammar, the canvas ends there (``st.grammar_end``)."""
    assert st.canvas is not None and candidates
    first = candidates[0]
    assert candidates == list(range(first, first + len(candidates))), "constrained reveals stay a prefix"
    run = [proposals[i].token for i in candidates]
    valid = grammar.count_valid(st.canvas[:first] + run) - first
    if dp.policy == "threshold" and steps_left > 1:
        wanted = 1
        while wanted < len(candidates) and confidences[candidates[wanted]] >= dp.threshold:
            wanted += 1
    else:
        wanted = len(candidates) if steps_left <= 1 else math.ceil(len(candidates) / steps_left)
    count = max(1, min(valid, wanted))
    ends = grammar.stop_index(st.canvas[:first] + run[:count])
    if ends is not None:
        count = min(count, ends - first)
        st.grammar_end = ends
    return candidates[:count]


class BlockDiffusionMode(DecodeMode):
    """Block diffusion (see the module docstring). Invariant: between passes either no block
    is open (``canvas`` None; the next pass is a prefill/commit or starts a block) or the
    open block has at least one position left to reveal; denoise passes write no K/V."""

    name = "diffusion"
    knobs = ("block_length", "refine_steps", "threshold", "policy", "seed_first_position", "lookahead", "confidence",
             "guess_seed")
    needs_mask_token = True
    work_kinds = (PREFILL, DENOISE, COMMIT) + LOOKAHEAD_KINDS
    metric_histograms = ("diffusion_denoising_steps_per_block",)

    def default(self, knob: str, values: dict[str, Any], ctx: ResolveContext) -> Any:
        if knob == "refine_steps":
            return values["block_length"]  # one pass per position at worst
        return BUILTIN_DEFAULTS[knob] if knob in BUILTIN_DEFAULTS else super().default(knob, values, ctx)

    def make_params(self, values: dict[str, Any], ctx: ResolveContext) -> DiffusionParams:
        check_fits("block_length", values["block_length"], values["block_length"], ctx)
        assert ctx.mask_token_id is not None
        return DiffusionParams(mode=self.name, mask_token_id=ctx.mask_token_id, **values)

    def largest_pass(self, params: ModeParams) -> tuple[int, str | None]:
        dp = _params(params)
        # with lookahead a commit (at most a block) carries the next block's canvas, and with
        # guess_seed a pass carries the guess row after its canvas
        return dp.block_length * (2 if dp.lookahead else 1) + int(_guessing(dp)), "block_length"

    @staticmethod
    def _state(req: Request) -> DiffusionState:
        return mode_state(req, DiffusionState)

    # ------------------------------------------------------------- helpers
    def _seeding(self, req: Request) -> bool:
        return _params(req.params.decode).seed_first_position

    def _stop_index(self, req: Request, st: DiffusionState) -> int | None:
        """First revealed position holding a stop token."""
        assert st.canvas is not None
        for i, tok in enumerate(st.canvas):
            if st.revealed[i] and tok in req.stop_ids:
                return i
        return None

    def _candidates(self, req: Request, st: DiffusionState) -> list[int]:
        """Masked positions that still need revealing: none past a revealed stop token, none
        past the tokens the request may still emit."""
        stop = self._stop_index(req, st)
        end = min(len(st.canvas), req.remaining_tokens, st.grammar_end)  # type: ignore[arg-type]
        if stop is not None:
            end = min(end, stop)
        return [i for i in range(end) if not st.revealed[i]]

    def _block_length(self, req: Request, start: int) -> int:
        """Positions of a block starting at ``start`` (shorter only at the context limit)."""
        return min(_params(req.params.decode).block_length, req.max_model_len - start)

    def _start_block(self, req: Request, st: DiffusionState) -> None:
        dp = _params(req.params.decode)
        length = self._block_length(req, req.num_computed)
        assert length >= 1, "a block is started only when the context has room"
        st.canvas = [dp.mask_token_id] * length
        st.revealed = [False] * length
        st.steps = 0
        if self._seeding(req):
            assert st.seed is not None
            st.canvas[0], st.revealed[0] = st.seed, True
            st.seed = None
            if req.grammar is not None and req.grammar.stop_index(st.canvas[:1]) == 1:
                st.grammar_end = 1  # the seed completes the grammar
        self._finish_block_if_done(req, st)

    def _finish_block_if_done(self, req: Request, st: DiffusionState) -> None:
        if self._candidates(req, st):
            return
        stop = self._stop_index(req, st)
        end = min(len(st.canvas), req.remaining_tokens, st.grammar_end)  # type: ignore[arg-type]
        block = st.canvas[: (stop + 1 if stop is not None and stop < end else end)]  # type: ignore[index]
        req.stats.denoise_steps_per_block.append(st.steps)
        st.canvas, st.revealed, st.steps, st.has_blocks = None, [], 0, True
        st.grammar_end = GRAMMAR_OPEN
        req.emit(block)

    # ------------------------------------------------------------ protocol
    def next_work(self, req: Request, budget: int) -> Work | None:
        st = self._state(req)
        if req.num_computed < len(req.token_ids):
            ahead = self._lookahead_length(req, st)
            if ahead:
                rest = len(req.token_ids) - req.num_computed
                if rest + ahead <= budget:
                    return self._lookahead_work(req, st, ahead)
                if st.has_blocks or rest == 1:
                    return None  # the fused pass is atomic: it waits for a step with room
                # a chunk of the prompt that leaves its last token to the fused pass
                return prefill_work(req, budget, len(req.token_ids) - 1, want_logits=False, kind=PREFILL)
            kind = COMMIT if st.has_blocks else PREFILL
            return prefill_work(req, budget, len(req.token_ids), want_logits=self._seeding(req), kind=kind)
        if st.canvas is None:
            self._start_block(req, st)
            if req.is_finished or st.canvas is None:
                return None if req.is_finished else self.next_work(req, budget)
        assert st.canvas is not None
        guess_row = self._guess_row(req, req.num_computed, len(st.canvas))
        if len(st.canvas) + guess_row > budget:
            return None
        rows = [i for i in range(len(st.canvas)) if not st.revealed[i]] + [len(st.canvas)] * guess_row
        return Work(kind=DENOISE, token_ids=list(st.canvas) + [_params(req.params.decode).mask_token_id] * guess_row,
                    logit_rows=rows)

    def _guess_row(self, req: Request, start: int, length: int) -> int:
        """1 if a pass over the block of ``length`` at ``start`` carries the guess row (guess_seed,
        lookahead applies, and another block follows it), else 0."""
        dp = _params(req.params.decode)
        follows = length < req.remaining_tokens and start + length < req.max_model_len
        return int(_guessing(dp) and not _controlled(req) and follows)

    def _lookahead_length(self, req: Request, st: DiffusionState) -> int:
        """The canvas length of the next block if the pending commit (or the prompt's last
        prefill pass) proposes it, else 0: ``lookahead`` off, a grammar, logit controls, an
        image prompt, or nothing more to emit (see the module docstring)."""
        dp = _params(req.params.decode)
        if not dp.lookahead or _controlled(req) or req.remaining_tokens <= 0 or (req.images and not st.has_blocks):
            return 0
        if _guessing(dp) and st.guess is None:
            return 0  # nothing to start the canvas with (the prompt's end)
        return self._block_length(req, len(req.token_ids))

    def _lookahead_work(self, req: Request, st: DiffusionState, length: int) -> Work:
        """The rest of the commit (or prompt) with the next block's canvas of ``length`` masks.
        Logit rows: the seed's (the last committed row, when seeding), then the canvas rows
        that may be revealed (none at or past what the request may still emit)."""
        dp = _params(req.params.decode)
        committed = req.token_ids[req.num_computed :]
        first = 1 if dp.seed_first_position else 0
        rows = [len(committed) - 1] if dp.seed_first_position else []
        rows += [len(committed) + i for i in range(first, min(length, req.remaining_tokens))]
        canvas = [dp.mask_token_id] * length
        if _guessing(dp):
            assert st.guess is not None
            canvas[0] = st.guess
            guess_row = self._guess_row(req, len(req.token_ids), length)
            canvas += [dp.mask_token_id] * guess_row
            rows += [len(committed) + length] * guess_row
        return Work(kind=COMMIT_LOOKAHEAD if st.has_blocks else PREFILL_LOOKAHEAD,
                    token_ids=committed + canvas, logit_rows=rows,
                    kv_rows=list(range(len(committed))), block_start=len(committed))

    def _apply_lookahead(self, req: Request, st: DiffusionState, work: Work, results: list[RowResult]) -> None:
        """Commit, start the next block and reveal its confident proposals."""
        req.num_computed += work.block_start
        seeded = int(self._seeding(req))
        if seeded:
            st.seed = results[0].token
        proposals = {row - work.block_start: r for row, r in zip(work.logit_rows[seeded:], results[seeded:])}
        dp = _params(req.params.decode)
        if _guessing(dp):
            length = self._block_length(req, req.num_computed)
            guess = proposals.pop(length, None)
            st.guess = guess.token if guess is not None else None
            right = work.token_ids[work.block_start] == st.seed  # the canvas started with the guess
            self._start_block(req, st)
            if right and st.canvas is not None:  # the canvas was this block's first denoise pass
                self._denoised(req, st, proposals)
            return
        self._start_block(req, st)
        if st.canvas is None:  # the seed alone finished the block
            return
        for i in self._candidates(req, st):  # every candidate was proposed (same block, same budget)
            if confidence(proposals[i], dp) >= dp.threshold:
                st.canvas[i], st.revealed[i] = proposals[i].token, True
        self._finish_block_if_done(req, st)

    def row_specs(self, req: Request, work: Work) -> list[RowSpec]:
        margin = _params(req.params.decode).confidence == "margin"
        if work.kind in LOOKAHEAD_KINDS:
            base = req.num_computed
            seed = [sample_spec(req, base + work.block_start)] if self._seeding(req) else []
            canvas_rows = work.logit_rows[len(seed) :]
            # a guessed canvas may stand for the block's first denoise pass: sample it as one
            salt = SALT_DENOISE if _guessing(_params(req.params.decode)) else SALT_LOOKAHEAD
            return seed + [sample_spec(req, base + r, salt, margin) for r in canvas_rows]
        if work.kind is not DENOISE:
            return [sample_spec(req, req.num_computed + len(work))] if work.logit_rows else []
        st = self._state(req)
        salt = SALT_DENOISE + 16 * st.steps
        return [sample_spec(req, req.num_computed + i, salt, margin) for i in work.logit_rows]

    def apply(self, req: Request, work: Work, results: list[RowResult], logits: torch.Tensor) -> None:
        st = self._state(req)
        if work.kind in LOOKAHEAD_KINDS:
            self._apply_lookahead(req, st, work, results)
            return
        if work.kind is not DENOISE:
            req.num_computed += len(work)
            if results:
                st.seed = results[0].token
            return
        assert st.canvas is not None
        proposals = {row: r for row, r in zip(work.logit_rows, results)}
        if len(st.canvas) in proposals:
            st.guess = proposals.pop(len(st.canvas)).token
        self._denoised(req, st, proposals)

    def _denoised(self, req: Request, st: DiffusionState, proposals: dict[int, RowResult]) -> None:
        """Apply one denoise pass's proposals (canvas position -> result) to the open block."""
        assert st.canvas is not None
        st.steps += 1
        candidates = self._candidates(req, st)
        dp = _params(req.params.decode)
        steps_left = dp.refine_steps - st.steps + 1
        confidences = {i: confidence(proposals[i], dp) for i in candidates}
        if req.grammar is not None:
            chosen = grammar_reveals(req.grammar, st, candidates, proposals, confidences, dp, steps_left)
        else:
            chosen = select_reveals(candidates, confidences, dp.policy, dp.threshold, steps_left)
        for i in chosen:
            st.canvas[i], st.revealed[i] = proposals[i].token, True
        self._finish_block_if_done(req, st)


def confidence(result: RowResult, dp: DiffusionParams) -> float:
    """The number ``threshold`` and the policies compare: the proposal's probability, or with
    ``confidence="margin"`` its lead over the runner-up (a token the model hesitates over
    against one alternative is not revealed however large its own share)."""
    if dp.confidence == "margin":
        assert result.margin is not None, "margin rows ask the sampler for it"
        return result.margin
    return result.confidence


def _guessing(dp: DiffusionParams) -> bool:
    """guess_seed applies: it needs lookahead and a seeded canvas."""
    return dp.guess_seed and dp.lookahead and dp.seed_first_position


def _controlled(req: Request) -> bool:
    """A grammar or logit controls: rows need the committed text before every position."""
    return req.grammar is not None or req.params.sampling.controls.active


def _params(params: ModeParams) -> DiffusionParams:
    own = params.of(BlockDiffusionMode.name)
    assert isinstance(own, DiffusionParams)
    return own
