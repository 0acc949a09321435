"""Logit controls applied before a token is chosen: repetition / presence / frequency
penalties, ``logit_bias`` and ``min_tokens``.

Semantics (vLLM's, which follow OpenAI and Hugging Face):
- ``repetition_penalty`` r (HF): every token seen in the prompt or the output so far has its
  logit divided by r when positive, multiplied by r when negative;
- ``frequency_penalty`` f and ``presence_penalty`` p (OpenAI): over the output tokens so far,
  ``logit -= f * count + p * (count > 0)``;
- ``logit_bias``: added to the listed tokens' logits;
- ``min_tokens`` m: while fewer than m tokens have been emitted, the stop tokens (EOS unless
  ``ignore_eos``, and ``stop_token_ids``) get ``-inf``.

"So far" is per row: a row choosing the token at absolute position ``p`` sees the request's
sequence up to ``p`` (for a verify pass that includes the drafts before it, so that
self_spec at temperature 0 still equals AR). Mask tokens (draft and denoise canvases) are not
counted. The penalties need the text before a position, which a diffusion canvas does not
have yet, so the diffusion mode does not declare them (``DecodeMode.honours_penalties``); bias and min_tokens apply there.
"""

from __future__ import annotations

import torch

from server.engine.params import PENALTY_FIELDS, LogitControls

__all__ = ["LogitControls", "PENALTY_FIELDS", "apply_logit_controls"]


def apply_logit_controls(
    logits: torch.Tensor,
    controls: LogitControls,
    sequence: list[int],
    num_prompt: int,
    positions: list[int],
    stop_ids: frozenset[int],
    mask_token_id: int | None,
) -> torch.Tensor:
    """Rows of ``logits`` [R, V] with the controls applied (a new fp32 tensor).

    Row i chooses the token at absolute position ``positions[i]`` and sees ``sequence[:positions[i]]``
    (prompt = its first ``num_prompt`` tokens)."""
    out = logits.float().clone()
    vocab = out.shape[-1]
    device = out.device
    if controls.logit_bias:
        ids = torch.tensor([t for t, _ in controls.logit_bias if t < vocab], dtype=torch.long, device=device)
        bias = torch.tensor([b for t, b in controls.logit_bias if t < vocab], dtype=torch.float32, device=device)
        out[:, ids] += bias
    if controls.min_tokens > 0 and stop_ids:
        stops = torch.tensor(sorted(t for t in stop_ids if t < vocab), dtype=torch.long, device=device)
        early = torch.tensor([p - num_prompt < controls.min_tokens for p in positions], device=device)
        out[early[:, None] & torch.zeros(vocab, dtype=torch.bool, device=device).index_fill(0, stops, True)] = float("-inf")
    if controls.penalizes and positions:
        seen, counts = _history_counts(sequence, num_prompt, positions, vocab, mask_token_id, device)
        r = controls.repetition_penalty
        if r != 1.0:
            penalized = torch.where(out > 0, out / r, out * r)
            out = torch.where(seen, penalized, out)
        out -= controls.frequency_penalty * counts + controls.presence_penalty * (counts > 0).float()
    return out


def _history_counts(
    sequence: list[int], num_prompt: int, positions: list[int], vocab: int, mask_token_id: int | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: which tokens occur in ``sequence[:p]`` (bool [R, V]) and how often each occurs
    in its output part ``sequence[num_prompt:p]`` (float [R, V]). Positions ascend in a row set,
    so each row extends the previous one by a few tokens."""
    def valid(tokens: list[int]) -> torch.Tensor:
        kept = [t for t in tokens if t != mask_token_id and 0 <= t < vocab]
        return torch.tensor(kept, dtype=torch.long, device=device)

    rows_seen, rows_counts = [], []
    first = min(positions)
    base_seen = torch.zeros(vocab, dtype=torch.bool, device=device)
    base_seen[valid(sequence[:first])] = True
    base_counts = torch.bincount(valid(sequence[num_prompt:first]), minlength=vocab).float()
    for p in positions:
        seen, counts = base_seen.clone(), base_counts.clone()
        extra = valid(sequence[first:p])
        seen[extra] = True
        out_extra = valid(sequence[max(first, num_prompt):p])
        counts += torch.bincount(out_extra, minlength=vocab).float()
        rows_seen.append(seen)
        rows_counts.append(counts)
    return torch.stack(rows_seen), torch.stack(rows_counts)
