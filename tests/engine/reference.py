"""A naive reference decoder for the three modes, written independently of ``server.engine``.

Dense, unpaged, unbatched: every pass recomputes attention over the whole token list with an
explicit boolean mask (``DenseAttention``). Greedy (temperature 0) only.

Masks:
- causal over the committed tokens (prefill, decode, commit, verify);
- denoise / draft: the committed tokens causal among themselves, plus a block that attends to
  every committed token and bidirectionally to the whole block.

Semantics (the engine's documented contract, docs/nemotron-labs-diffusion.md §2 and the
``server/engine/modes`` docstrings):
- argmax never picks the mask id; the confidence of a proposal is softmax(raw logits)[token]
  with the mask id INCLUDED in the denominator;
- a stop token ends the request and is not emitted; output stops at ``max_tokens`` and at the
  context limit (``max_model_len`` total tokens);
- diffusion: a revealed stop token freezes the positions after it, and the length budget
  freezes the positions at or past the number of tokens the request may still emit: frozen
  positions stay masks, are never candidates and never emitted. A block is only shortened by
  the context limit.

Every decision records its margin (gap to the nearest different outcome), so a test can tell a
real mismatch from a floating-point near-tie between the dense and the paged computation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from server.model.model import DecoderModel, DenseAttention


# --------------------------------------------------------------------------- passes
def causal_mask(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril()


def block_mask(n_ctx: int, n_block: int) -> torch.Tensor:
    """Committed tokens causal; the block's rows see every committed token and the whole block."""
    m = causal_mask(n_ctx + n_block)
    m[n_ctx:, :] = True
    return m


@torch.inference_mode()
def forward_logits(
    model: DecoderModel,
    tokens: list[int],
    allowed: torch.Tensor,
    lora_rows: list[bool] | None = None,
    positions: list[int] | None = None,
) -> torch.Tensor:
    """fp32 logits [T, V] of every row of ``tokens`` (at ``positions``, default 0..T-1)."""
    ids = torch.tensor(tokens, dtype=torch.int64)
    pos = torch.arange(len(tokens), dtype=torch.int64) if positions is None else torch.tensor(positions)
    lr = torch.tensor(lora_rows, dtype=torch.bool) if lora_rows is not None and any(lora_rows) else None
    hidden = model(ids, pos, DenseAttention(allowed), lr)
    return model.compute_logits(hidden).float()


def causal_logits(model: DecoderModel, tokens: list[int]) -> torch.Tensor:
    return forward_logits(model, tokens, causal_mask(len(tokens)))


def block_logits(model: DecoderModel, committed: list[int], block: list[int], lora: bool = False) -> torch.Tensor:
    """Logits of the block's rows under the denoise/draft mask."""
    n = len(committed)
    rows = [False] * n + [lora] * len(block)
    return forward_logits(model, committed + block, block_mask(n, len(block)), rows)[n:]


# ------------------------------------------------------------------------- decisions
@dataclass
class Trace:
    """Smallest margin of any decision taken (inf if none was close)."""

    min_margin: float = math.inf

    def note(self, margin: float) -> None:
        self.min_margin = min(self.min_margin, margin)


def pick(logits: torch.Tensor, mask_id: int | None, trace: Trace | None, measure: str = "probability") -> tuple[int, float, float]:
    """Greedy token (mask id excluded), its confidence (softmax over ALL ids, mask included, at
    fp32: the precision of the engine's logits; with ``measure="margin"`` minus the probability
    of the best other non-mask id) and the argmax margin (top-1 minus top-2 logit). The argmax
    margin is noted on ``trace`` when one is given."""
    allowed = logits.clone()
    if mask_id is not None:
        allowed[mask_id] = float("-inf")
    top = torch.topk(allowed, 2)
    margin = float(top.values[0] - top.values[1])
    if trace is not None:
        trace.note(margin)
    tok = int(top.indices[0])
    probs = torch.log_softmax(logits.float(), dim=-1).exp()
    conf = float(probs[tok])
    if measure == "margin":
        runner_up = int(top.indices[1])  # the best non-mask id after tok
        conf -= float(probs[runner_up])
    return tok, conf, margin


def _gap(a: float, b: float) -> float:
    """Margin of an ordering decision between two confidences. Exactly equal values (both
    saturated at 1.0 in fp32) are a deterministic tie broken by position, not a near-tie."""
    return math.inf if a == b else abs(a - b)


def choose_reveals(
    candidates: list[int], conf: dict[int, float], policy: str, threshold: float, passes_left: int, trace: Trace
) -> set[int]:
    """threshold: the most confident candidate plus all with confidence >= threshold;
    low_confidence: the k most confident; leftmost: the k leftmost; k = ceil(n / passes left);
    every candidate on the last allowed pass. Equal confidences rank left to right."""
    if passes_left <= 1:
        return set(candidates)
    ranked = sorted(candidates, key=lambda i: (-conf[i], i))
    if policy == "threshold":
        above = {i for i in candidates if conf[i] >= threshold}
        for i in candidates:
            trace.note(abs(conf[i] - threshold))
        if not above and len(ranked) > 1:
            trace.note(_gap(conf[ranked[0]], conf[ranked[1]]))
        return above | {ranked[0]}
    k = -(-len(candidates) // passes_left)
    if policy == "low_confidence":
        if k < len(ranked):
            trace.note(_gap(conf[ranked[k - 1]], conf[ranked[k]]))
        return set(ranked[:k])
    if policy == "leftmost":
        return set(sorted(candidates)[:k])
    raise ValueError(policy)


# ----------------------------------------------------------------------------- output
@dataclass
class Output:
    prompt_len: int
    max_tokens: int
    max_model_len: int
    stop_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def remaining(self) -> int:
        return max(0, min(self.max_tokens - len(self.tokens), self.max_model_len - self.prompt_len - len(self.tokens)))

    def emit(self, toks: list[int]) -> None:
        for t in toks:
            if self.remaining <= 0:
                self.finish_reason = "length"
                return
            if t in self.stop_ids:
                self.finish_reason = "stop"
                return
            self.tokens.append(t)
        if self.remaining <= 0:
            self.finish_reason = "length"


@dataclass
class Result:
    tokens: list[int]
    finish_reason: str
    min_margin: float
    draft_margin: float = math.inf  # self_spec: smallest draft margin (acceptance lengths only)
    denoise_steps_per_block: list[int] = field(default_factory=list)
    acceptance_lengths: list[int] = field(default_factory=list)
    drafts: list[list[int]] = field(default_factory=list)
    fused_passes: int = 0  # diffusion guess_seed: commit passes that carried a guessed canvas
    right_guesses: int = 0  # ... whose guess was the seed (each stood for a denoise pass)


# ------------------------------------------------------------------------------ modes
def ar_greedy(
    model: DecoderModel, prompt: list[int], *, max_tokens: int, max_model_len: int, stop_ids=(), mask_id: int | None = None
) -> Result:
    out = Output(len(prompt), max_tokens, max_model_len, frozenset(stop_ids))
    trace = Trace()
    while out.finish_reason is None:
        logits = causal_logits(model, list(prompt) + out.tokens)[-1]
        out.emit([pick(logits, mask_id, trace)[0]])
    return Result(out.tokens, out.finish_reason, trace.min_margin)


def diffusion_greedy(
    model: DecoderModel,
    prompt: list[int],
    *,
    block_length: int,
    refine_steps: int,
    policy: str,
    threshold: float = 0.9,
    seed_first_position: bool = True,
    lookahead: bool = False,
    confidence: str = "probability",
    guess_seed: bool = False,
    max_tokens: int,
    max_model_len: int,
    stop_ids=(),
    mask_id: int,
) -> Result:
    """Block diffusion. ``lookahead``: the pass that commits the previous block (or ends the
    prompt) also runs the next block as an all-mask canvas under the denoise mask; the block
    then starts with the seed from that pass's last committed row and with every candidate
    whose proposal there has confidence >= threshold revealed (any policy); that pass is not
    a denoise step. ``confidence``: "probability" or "margin" (see ``pick``).

    ``guess_seed`` (with lookahead, seeded): decoding as without lookahead, except that every
    denoise canvas carries one more mask after the block when another block follows; that row's
    greedy token is the guess. A block after a guess starts with a commit pass whose canvas is
    ``[guess, MASK...]`` (plus the row): if the guess is the seed, that pass is the block's first
    denoise pass; either way its extra row gives the next guess."""
    stops = frozenset(stop_ids)
    out = Output(len(prompt), max_tokens, max_model_len, stops)
    trace = Trace()
    steps_per_block: list[int] = []
    guessing = lookahead and guess_seed and seed_first_position
    guess: int | None = None
    fused = right_guesses = 0
    while out.finish_reason is None:
        seq = list(prompt) + out.tokens
        n = min(block_length, max_model_len - len(seq))
        canvas = [mask_id] * n
        revealed = [False] * n
        if guessing:
            passes, next_guess = _guessed_block(model, seq, canvas, revealed, guess, out, trace, policy, threshold,
                                                refine_steps, confidence, max_model_len, mask_id)
            steps_per_block.append(passes)
            fused += guess is not None
            right_guesses += guess is not None and canvas[0] == guess
            guess = next_guess
            s = next((i for i in range(n) if revealed[i] and canvas[i] in stops), None)
            budget = min(n, out.remaining)
            out.emit(canvas[:budget] if s is None else canvas[: s + 1])
            continue
        ahead = block_logits(model, seq, canvas) if lookahead else None
        if seed_first_position:
            canvas[0] = pick(causal_logits(model, seq)[-1], mask_id, trace)[0]
            revealed[0] = True

        def first_stop() -> int | None:
            return next((i for i in range(n) if revealed[i] and canvas[i] in stops), None)

        budget = min(n, out.remaining)  # positions the request may still emit

        def candidates() -> list[int]:
            """Masks to reveal: none past a revealed stop token, none past the length budget."""
            s = first_stop()
            end = budget if s is None else min(budget, s)
            return [i for i in range(end) if not revealed[i]]

        if ahead is not None:
            for i in candidates():
                tok, conf, margin = pick(ahead[i], mask_id, None, confidence)
                trace.note(abs(conf - threshold))
                if conf >= threshold:
                    trace.note(margin)
                    canvas[i], revealed[i] = tok, True
        passes = 0
        while candidates():
            passes += 1
            logits = block_logits(model, seq, canvas)
            cand = candidates()
            proposals = {i: pick(logits[i], mask_id, None, confidence) for i in cand}
            chosen = choose_reveals(
                cand, {i: p[1] for i, p in proposals.items()}, policy, threshold, refine_steps - passes + 1, trace
            )
            for i in chosen:  # only a revealed token's identity matters
                trace.note(proposals[i][2])
                canvas[i], revealed[i] = proposals[i][0], True
        steps_per_block.append(passes)
        s = first_stop()
        out.emit(canvas[:budget] if s is None else canvas[: s + 1])
    return Result(out.tokens, out.finish_reason, trace.min_margin, denoise_steps_per_block=steps_per_block,
                  fused_passes=fused, right_guesses=right_guesses)


def _guessed_block(model, seq, canvas, revealed, guess, out, trace, policy, threshold, refine_steps, confidence,
                   max_model_len, mask_id) -> tuple[int, int | None]:  # type: ignore[no-untyped-def]
    """One block of ``diffusion_greedy`` with guess_seed: fills ``canvas``/``revealed`` in place;
    returns its denoise passes and the next guess (the latest guess row's token, or None)."""
    n = len(canvas)
    stops = out.stop_ids
    budget = min(n, out.remaining)
    extra = [mask_id] if n < out.remaining and len(seq) + n < max_model_len else []
    canvas[0], revealed[0] = pick(causal_logits(model, seq)[-1], mask_id, trace)[0], True

    def candidates() -> list[int]:
        s = next((i for i in range(n) if revealed[i] and canvas[i] in stops), None)
        return [i for i in range(budget if s is None else min(budget, s)) if not revealed[i]]

    def denoise(logits: torch.Tensor, passes: int) -> None:
        cand = candidates()
        proposals = {i: pick(logits[i], mask_id, None, confidence) for i in cand}
        for i in choose_reveals(cand, {i: p[1] for i, p in proposals.items()}, policy, threshold,
                                refine_steps - passes + 1, trace):
            trace.note(proposals[i][2])
            canvas[i], revealed[i] = proposals[i][0], True

    passes, next_guess = 0, None
    if guess is not None:  # the commit pass with the guessed canvas
        logits = block_logits(model, seq, [guess] + [mask_id] * (n - 1) + extra)
        next_guess = pick(logits[n], mask_id, trace)[0] if extra else None
        if guess == canvas[0] and candidates():
            passes += 1
            denoise(logits, passes)
    while candidates():
        passes += 1
        logits = block_logits(model, seq, canvas + extra)
        if extra:
            next_guess = pick(logits[n], mask_id, trace)[0]
        denoise(logits, passes)
    return passes, next_guess


def self_spec_greedy(
    model: DecoderModel,
    prompt: list[int],
    *,
    draft_length: int,
    max_tokens: int,
    max_model_len: int,
    stop_ids=(),
    mask_id: int,
) -> Result:
    """Draft over [seed, MASK x D] (bidirectional, draft LoRA on its rows), verify over
    [seed, d1..dD] (causal), accept the agreeing prefix plus the verifier's bonus token."""
    out = Output(len(prompt), max_tokens, max_model_len, frozenset(stop_ids))
    trace = Trace()
    out.emit([pick(causal_logits(model, list(prompt))[-1], mask_id, trace)[0]])
    acc_lengths: list[int] = []
    all_drafts: list[list[int]] = []
    draft_trace = Trace()
    while out.finish_reason is None:
        committed = list(prompt) + out.tokens[:-1]
        seed = out.tokens[-1]
        d = max(1, min(draft_length, out.remaining, max_model_len - len(committed) - 1))
        dl = block_logits(model, committed, [seed] + [mask_id] * d, lora=True)[1:]
        drafts = [pick(row, mask_id, draft_trace)[0] for row in dl]  # a near-tie here moves only acceptance
        vl = causal_logits(model, committed + [seed] + drafts)[len(committed) :]
        picks = [pick(row, mask_id, None) for row in vl]
        verifier = [p[0] for p in picks]
        acc = 0
        while acc < d and verifier[acc] == drafts[acc]:
            acc += 1
        for p in picks[: acc + 1]:  # rows past the first disagreement decide nothing
            trace.note(p[2])
        acc_lengths.append(acc + 1)
        all_drafts.append(drafts)
        out.emit(drafts[:acc] + [verifier[acc]])
    return Result(
        out.tokens,
        out.finish_reason,
        trace.min_margin,
        draft_margin=draft_trace.min_margin,
        acceptance_lengths=acc_lengths,
        drafts=all_drafts,
    )


def quadratic_cycle_mask(n_ctx: int, heads: int, masks: int) -> torch.Tensor:
    """Committed tokens causal; then ``heads`` sub-blocks [head, MASK x masks]. Every cycle row
    sees every committed token; head j sees heads 0..j; a mask of sub-block j sees heads
    0..j and its whole sub-block."""
    width = masks + 1
    n = n_ctx + heads * width
    m = torch.zeros(n, n, dtype=torch.bool)
    m[:n_ctx, :n_ctx] = causal_mask(n_ctx)
    m[n_ctx:, :n_ctx] = True
    head_rows = [n_ctx + j * width for j in range(heads)]
    for j in range(heads):
        sub = range(head_rows[j], head_rows[j] + width)
        for r in sub:
            for h in head_rows[: j + 1]:
                m[r, h] = True
            if r != head_rows[j]:
                for c in sub:
                    m[r, c] = True
    return m


def self_spec_quadratic_greedy(
    model: DecoderModel,
    prompt: list[int],
    *,
    draft_length: int,
    max_tokens: int,
    max_model_len: int,
    stop_ids=(),
    mask_id: int,
) -> Result:
    """One dense pass per cycle over [committed | sub-block j = (h_j, MASK x K) for each head
    h_0 = seed, h_j = d_j] with sub-block j at positions L+j .. L+j+K; accept the agreeing
    prefix of the heads' argmaxes plus the bonus; the next drafts are sub-block a's masks
    2..K. K = draft_length + 1, cut by the length budget and the context."""
    out = Output(len(prompt), max_tokens, max_model_len, frozenset(stop_ids))
    trace, draft_trace = Trace(), Trace()
    out.emit([pick(causal_logits(model, list(prompt))[-1], mask_id, trace)[0]])
    acc_lengths: list[int] = []
    all_drafts: list[list[int]] = []
    drafts: list[int] = []
    while out.finish_reason is None:
        committed = list(prompt) + out.tokens[:-1]
        n = len(committed)
        drafts = drafts[: max(0, max_model_len - 1 - n)]
        k = max(0, min(draft_length + 1, out.remaining, max_model_len - 1 - n - len(drafts)))
        heads = [out.tokens[-1]] + drafts
        tokens, positions, lora = list(committed), list(range(n)), [False] * n
        for j, h in enumerate(heads):
            tokens += [h] + [mask_id] * k
            positions += list(range(n + j, n + j + k + 1))
            lora += [False] + [True] * k
        logits = forward_logits(model, tokens, quadratic_cycle_mask(n, len(heads), k), lora, positions)[n:]
        picks = [pick(logits[j * (k + 1)], mask_id, None) for j in range(len(heads))]
        verifier = [p[0] for p in picks]
        acc = 0
        while acc < len(drafts) and verifier[acc] == drafts[acc]:
            acc += 1
        for p in picks[: acc + 1]:
            trace.note(p[2])
        acc_lengths.append(acc + 1)
        all_drafts.append(drafts)
        out.emit(drafts[:acc] + [verifier[acc]])
        first = acc * (k + 1)
        drafts = [pick(logits[r], mask_id, draft_trace)[0] for r in range(first + 2, first + k + 1)][: out.remaining]
    return Result(
        out.tokens,
        out.finish_reason,
        trace.min_margin,
        draft_margin=draft_trace.min_margin,
        acceptance_lengths=acc_lengths,
        drafts=all_drafts,
    )


def run_reference(model: DecoderModel, prompt: list[int], spec: dict, *, max_model_len: int, mask_id: int) -> Result:
    """Dispatch on ``spec['mode']``; ``spec`` holds the keyword arguments of the mode function
    plus ``mode``, ``max_tokens`` and ``stop_ids``."""
    kw = dict(spec)
    mode = kw.pop("mode")
    if mode == "ar":
        return ar_greedy(model, prompt, max_model_len=max_model_len, mask_id=mask_id, **kw)
    if mode == "diffusion":
        return diffusion_greedy(model, prompt, max_model_len=max_model_len, mask_id=mask_id, **kw)
    if mode == "self_spec" and kw.pop("variant", "linear") == "quadratic":
        return self_spec_quadratic_greedy(model, prompt, max_model_len=max_model_len, mask_id=mask_id, **kw)
    if mode == "self_spec":
        return self_spec_greedy(model, prompt, max_model_len=max_model_len, mask_id=mask_id, **kw)
    raise ValueError(mode)
