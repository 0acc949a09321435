"""The joint tri-mode objective: L = L_AR + alpha * L_diffusion over a doubled sequence.

One forward over ``[x_t | x_0]`` (noisy copy, then clean copy; both copies use positions
0..L-1) with the ``sbd_block_diff`` attention mask:

* clean token i sees clean tokens j <= i (causal);
* noisy token i in block b sees the noisy tokens of block b (bidirectional) and the clean
  tokens of blocks < b;
* clean tokens never see noisy tokens.

Losses: next-token cross-entropy on the clean stream (logits at i predict token i+1), and
masked-token cross-entropy on the noisy stream at masked positions (logits at i predict
token i), each weighted 1/p_mask and normalised by the number of noisy tokens. The masking
ratio t ~ U(eps, 1) is drawn per block (stratified over the batch's blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from server.model.model import DecoderModel, DenseAttention

BLOCK_SIZES = (4, 8, 16, 32)
DIFFUSION_WEIGHT = 0.3


def sbd_block_diff_mask(seq_len: int, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean ``[2L, 2L]`` mask (True = may attend) for the layout ``[x_t | x_0]``.
    Rows/columns 0..L-1 are the noisy copy, L..2L-1 the clean copy."""
    idx = torch.arange(seq_len, device=device)
    blk = idx // block_size
    noisy_noisy = blk[:, None] == blk[None, :]
    noisy_clean = blk[None, :] < blk[:, None]
    clean_clean = idx[None, :] <= idx[:, None]
    clean_noisy = torch.zeros(seq_len, seq_len, dtype=torch.bool, device=device)
    top = torch.cat([noisy_noisy, noisy_clean], dim=1)
    bottom = torch.cat([clean_noisy, clean_clean], dim=1)
    return torch.cat([top, bottom], dim=0)


def causal_mask(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    idx = torch.arange(seq_len, device=device)
    return idx[None, :] <= idx[:, None]


def sample_block_mask_ratios(num_rows: int, num_blocks: int, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Masking ratios t ~ U(eps, 1), one per block, stratified over all blocks of the batch
    (lower-variance than independent draws, same marginal distribution). ``[rows, blocks]``."""
    n = num_rows * num_blocks
    u = (torch.rand((), generator=generator) + torch.arange(n) / n) % 1.0
    u = u[torch.randperm(n, generator=generator)]
    return (eps + (1 - eps) * u).view(num_rows, num_blocks)


@dataclass
class NoisedBatch:
    noisy: torch.Tensor  # [B, L] x_t
    masked: torch.Tensor  # [B, L] bool
    p_mask: torch.Tensor  # [B, L] masking probability of each token's block

    def to(self, device: torch.device | str) -> "NoisedBatch":
        return NoisedBatch(self.noisy.to(device), self.masked.to(device), self.p_mask.to(device))


def add_noise(x0: torch.Tensor, block_size: int, mask_token_id: int, eps: float = 0.05,
              generator: torch.Generator | None = None) -> NoisedBatch:
    """Absorbing-state noise: each token of block k becomes ``mask_token_id`` with prob t_k."""
    rows, seq_len = x0.shape
    num_blocks = -(-seq_len // block_size)
    t = sample_block_mask_ratios(rows, num_blocks, eps, generator)
    p = t.repeat_interleave(block_size, dim=1)[:, :seq_len]
    masked = torch.rand(rows, seq_len, generator=generator) < p
    p, masked = p.to(x0.device), masked.to(x0.device)
    noisy = torch.where(masked, torch.full_like(x0, mask_token_id), x0)
    return NoisedBatch(noisy, masked, p)


@dataclass
class LossOutput:
    loss: torch.Tensor
    ar_loss: torch.Tensor  # mean next-token CE on the clean stream
    diffusion_loss: torch.Tensor  # sum(CE / p_mask) over masked tokens / noisy tokens
    masked_ce: torch.Tensor  # plain mean CE over masked tokens (for logging)
    num_masked: int


def joint_loss(model: DecoderModel, x0: torch.Tensor, block_size: int, mask_token_id: int,
               diffusion_weight: float = DIFFUSION_WEIGHT, eps: float = 0.05,
               generator: torch.Generator | None = None, mask: torch.Tensor | None = None,
               noised: NoisedBatch | None = None) -> LossOutput:
    """One forward over ``[x_t | x_0]`` and the joint loss. ``x0``: ``[B, L]`` token ids."""
    rows, seq_len = x0.shape
    device = x0.device
    if noised is None:
        noised = add_noise(x0, block_size, mask_token_id, eps, generator)
    if mask is None:
        mask = sbd_block_diff_mask(seq_len, block_size, device)
    pos = torch.arange(seq_len, device=device)
    input_ids = torch.cat([noised.noisy, x0], dim=1)
    positions = torch.cat([pos, pos]).expand(rows, 2 * seq_len)
    hidden = model(input_ids, positions, DenseAttention(mask))
    clean_h = hidden[:, seq_len:-1]
    ar_logits = model.compute_logits(clean_h)
    ar_loss = F.cross_entropy(ar_logits.reshape(-1, ar_logits.shape[-1]), x0[:, 1:].reshape(-1))
    noisy_h = hidden[:, :seq_len][noised.masked]
    num_masked = int(noisy_h.shape[0])
    if num_masked:
        diff_logits = model.compute_logits(noisy_h)
        ce = F.cross_entropy(diff_logits, x0[noised.masked], reduction="none")
        diffusion_loss = (ce / noised.p_mask[noised.masked]).sum() / (rows * seq_len)
        masked_ce = ce.mean()
    else:
        diffusion_loss = hidden.sum() * 0.0
        masked_ce = diffusion_loss.detach()
    loss = ar_loss + diffusion_weight * diffusion_loss
    return LossOutput(loss, ar_loss, diffusion_loss, masked_ce.detach(), num_masked)
