"""Self-distillation: make block diffusion and self-speculation of a trained model faster.

    python -m training.distill --model server/default_model --data RUN/data.npz --out DIR \
        [--rows 2000] [--minutes 50] [--threads 1] [--device cuda] [--keep-best]

Why it works: the model's own greedy AR continuation is a deterministic function of the
context, so a block of it can be predicted in parallel once the model has learnt to; real
text cannot (many continuations are plausible, hence the low denoising confidence). Stages:

1. **Trajectories** (``DIR/trajectories.npz``): the engine itself decodes, batched, greedy
   continuations of training-set windows, of windows continued first by a few sampled tokens
   (temperature 0.8, for contexts off the greedy path) and of chat openings (a chat sample up
   to ``<|assistant|>``). Each row is ``seq_len`` tokens; ``target_start`` is the first
   position whose token is the teacher's greedy choice. A held-out set is decoded the same
   way from the held-out stream (for evaluation only).
2. **Training**, continuing from the model's weights, one step = two forwards, one backward:
   * trajectory rows in the ``[x_t | x_0]`` layout of ``training.objective`` (block size drawn
     from ``--block-sizes``), noised like inference: in every block that starts at or after
     ``target_start - 1`` the first token stays clean (the diffusion seed / self-spec last
     token) and either all the others are masked (the ``[seed, MASK x (B-1)]`` layout of a
     draft pass and of the first denoise pass) or a random share of them (later denoise
     passes); loss = mean cross-entropy at the masked positions against the greedy tokens;
   * real-text rows (the training token stream, chat rows included) in a plain causal
     forward with the next-token loss, so that AR quality does not drift.
3. **Export** (``DIR/final/``): bf16 weights with the source model's config and tokenizer
   files, copied unchanged.

Training steps run on ``--device`` (a GPU makes a round minutes instead of an hour); trajectory
generation and the engine evaluations always run on the CPU engine. ``--keep-best`` also exports
the evaluated weights with the longest held-out draft acceptance whose AR perplexity stays within
``--best-ar-tolerance`` of the start's (``DIR/best``, ``DIR/best.json``), a guard for unattended runs.
The run checkpoints to ``DIR/ckpt/last.pt`` every ``--ckpt-minutes`` and resumes from it
automatically; ``DIR/log.jsonl`` holds the train/eval rows, ``DIR/curves.png`` the loss and
TPF curves, ``DIR/summary.json`` the final numbers. Evaluations report held-out AR
perplexity, the distillation loss and draft acceptance on held-out trajectories, and the
engine's own TPF (diffusion) and acceptance length (self_spec) on held-out prompts.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from server.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.params import DecodeParams, RequestParams, SamplingParams
from server.model.loader import load_model, save_checkpoint
from server.model.model import DecoderModel, DenseAttention
from training.data import BatchSampler, TokenData, eval_windows
from training.objective import NoisedBatch, causal_mask, sbd_block_diff_mask
from training.tokenizer import ASSISTANT_ID
from training.train import atomic_save

KIND_GREEDY, KIND_SAMPLED, KIND_CHAT = 0, 1, 2
EXPORT_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


# ----------------------------------------------------------------------------- trajectories


@dataclass
class Trajectories:
    """Rows of ``seq_len`` tokens: a prompt, then the teacher's greedy continuation from
    ``target_start`` on (every token at or after it is the argmax given all tokens before)."""

    tokens: np.ndarray  # [N, seq_len] int64
    target_start: np.ndarray  # [N] int64
    kind: np.ndarray  # [N] KIND_*

    def save(self, path: Path) -> None:
        np.savez(path, tokens=self.tokens, target_start=self.target_start, kind=self.kind)

    @classmethod
    def load(cls, path: Path) -> "Trajectories":
        z = np.load(path)
        return cls(z["tokens"].astype(np.int64), z["target_start"].astype(np.int64), z["kind"].astype(np.int64))

    def __len__(self) -> int:
        return len(self.tokens)


def teacher_engine(model: DecoderModel, model_dir: str, seq_len: int, max_num_seqs: int = 64,
                   cpu_threads: int | None = None) -> LLMEngine:
    """An engine on the CPU around a private copy of ``model`` (the engine may fuse weights in
    place; a model trained on a GPU is evaluated by the CPU engine, the tested reference path)."""
    teacher = copy.deepcopy(model).to("cpu").eval()
    cfg = EngineConfig(model=model_dir, device="cpu", max_model_len=max(2 * seq_len, 256), max_num_seqs=max_num_seqs,
                       kv_cache_tokens=max_num_seqs * (seq_len + 64), enable_prefix_caching=False,
                       cpu_threads=cpu_threads)
    return LLMEngine(teacher, cfg)


def _chat_prompt(chat: np.ndarray, start: int, max_len: int) -> list[int] | None:
    """A chat sample from ``start`` up to and including its first ``<|assistant|>``."""
    window = chat[start : start + max_len]
    hits = np.flatnonzero(window == ASSISTANT_ID)
    return [int(t) for t in window[: hits[0] + 1]] if len(hits) else None


def make_prompts(data: TokenData, count: int, seq_len: int, seed: int, sampled_frac: float, chat_frac: float,
                 heldout: bool = False) -> list[tuple[list[int], int, int]]:
    """``count`` (prompt, kind, sampled tokens) triples. Prompts are windows of the training
    stream (or of the held-out stream with ``heldout``) of 8 .. seq_len/2 tokens, or chat
    openings of the chat stream (never with ``heldout``: the chat stream is training text)."""
    rng = random.Random(seed)
    stream = data.heldout if heldout else data.train
    out = []
    while len(out) < count:
        r = rng.random()
        if not heldout and r < chat_frac and len(data.chat_starts):
            prompt = _chat_prompt(data.chat, int(data.chat_starts[rng.randrange(len(data.chat_starts))]), seq_len // 2)
            if prompt is not None and len(prompt) >= 4:
                out.append((prompt, KIND_CHAT, 0))
            continue
        plen = rng.randint(8, seq_len // 2)
        start = rng.randrange(len(stream) - plen)
        prompt = [int(t) for t in stream[start : start + plen]]
        if not heldout and r < chat_frac + sampled_frac:
            out.append((prompt, KIND_SAMPLED, rng.randint(4, max(4, min(24, seq_len // 4)))))
        else:
            out.append((prompt, KIND_GREEDY, 0))
    return out


def generate_trajectories(engine: LLMEngine, prompts: list[tuple[list[int], int, int]], seq_len: int,
                          seed: int, temperature: float = 0.8) -> Trajectories:
    """Decode every prompt to ``seq_len`` tokens with the engine (batched): sampled tokens
    first where asked, then greedy to the end (``ignore_eos``, like the benchmarks)."""
    ctx = [list(p) for p, _, _ in prompts]
    sampled_idx = [i for i, (_, _, n) in enumerate(prompts) if n > 0]
    if sampled_idx:
        params = [RequestParams(SamplingParams(max_tokens=prompts[i][2], temperature=temperature, seed=seed * 100003 + i,
                                               ignore_eos=True)) for i in sampled_idx]
        outs = engine.generate([ctx[i] for i in sampled_idx], params)
        for i, o in zip(sampled_idx, outs):
            ctx[i] = ctx[i] + o["token_ids"]
    starts = [len(c) for c in ctx]
    greedy = [RequestParams(SamplingParams(max_tokens=seq_len - len(c), temperature=0.0, ignore_eos=True)) for c in ctx]
    outs = engine.generate(ctx, greedy)
    tokens = np.stack([np.asarray((c + o["token_ids"])[:seq_len], dtype=np.int64) for c, o in zip(ctx, outs)])
    assert tokens.shape == (len(prompts), seq_len)
    return Trajectories(tokens, np.asarray(starts, dtype=np.int64), np.asarray([k for _, k, _ in prompts], dtype=np.int64))


# ----------------------------------------------------------------------------- noise and loss


def distill_noise(x0: torch.Tensor, target_start: torch.Tensor, block_size: int, mask_token_id: int,
                  draft_prob: float, generator: torch.Generator, lookahead_prob: float = 0.0) -> NoisedBatch:
    """Inference-like noise on trajectory rows. Only blocks starting at or after
    ``target_start - 1`` are noised (their masked tokens are all greedy tokens); each keeps
    its first token (the seed) and masks either all the others (prob ``draft_prob``) or each
    with a ratio t ~ U(0, 1), at least one. With ``lookahead_prob`` > 0, that share of the
    blocks starting at or after ``target_start`` is masked whole, seed included: the canvas a
    diffusion commit pass proposes with ``lookahead``. ``p_mask`` holds the ratio used (1 for
    drafts and whole blocks)."""
    rows, seq_len = x0.shape
    nb = seq_len // block_size
    assert nb * block_size == seq_len, "block size must divide the row length"
    block_start = torch.arange(nb) * block_size
    eligible = block_start[None, :] >= (target_start[:, None] - 1)  # [rows, nb]
    full = torch.rand(rows, nb, generator=generator) < draft_prob
    ratio = torch.where(full, torch.ones(rows, nb), torch.rand(rows, nb, generator=generator))
    offset = torch.arange(seq_len) % block_size
    masked = torch.rand(rows, seq_len, generator=generator) < ratio.repeat_interleave(block_size, dim=1)
    masked &= (offset != 0)[None, :] & eligible.repeat_interleave(block_size, dim=1)
    # every eligible block masks at least one token
    empty = eligible & ~masked.view(rows, nb, block_size).any(-1)
    pick = torch.randint(1, block_size, (rows, nb), generator=generator)
    r_idx, b_idx = empty.nonzero(as_tuple=True)
    masked[r_idx, b_idx * block_size + pick[r_idx, b_idx]] = True
    if lookahead_prob > 0:  # drawn last, so runs without it keep their noise
        whole = torch.rand(rows, nb, generator=generator) < lookahead_prob
        whole &= block_start[None, :] >= target_start[:, None]
        masked |= whole.repeat_interleave(block_size, dim=1)
        ratio = torch.where(whole, torch.ones(rows, nb), ratio)
    noisy = torch.where(masked, torch.full_like(x0, mask_token_id), x0)
    return NoisedBatch(noisy, masked, ratio.repeat_interleave(block_size, dim=1))


def masked_token_loss(logits: torch.Tensor, target: torch.Tensor, certainty_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean cross-entropy of ``logits`` [N, V] against ``target`` [N], plus ``certainty_weight``
    x the entropy of the rows whose argmax already is the target, summed and divided by N.

    The entropy term (certainty forcing, as in dParallel) sharpens only correct proposals, so
    that more of them reach the unmasking threshold in one pass; the gradient of a wrong row
    is the cross-entropy's alone."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    ce = F.nll_loss(log_probs, target)
    correct = log_probs.argmax(-1) == target
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    certainty = (entropy * correct).sum() / max(1, target.numel())
    loss = ce + certainty_weight * certainty if certainty_weight else ce
    return loss, {"distill_ce": float(ce.detach()), "distill_acc": float(correct.float().mean()),
                  "certainty": float(certainty.detach()), "num_masked": int(target.numel())}


def distill_loss(model: DecoderModel, x0: torch.Tensor, noised: NoisedBatch, mask: torch.Tensor,
                 certainty_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """``masked_token_loss`` of the noisy stream at masked positions against the trajectory
    (one forward over ``[x_t | x_0]`` with the sbd_block_diff ``mask``)."""
    rows, seq_len = x0.shape
    pos = torch.arange(seq_len, device=x0.device)
    hidden = model(torch.cat([noised.noisy, x0], dim=1), torch.cat([pos, pos]).expand(rows, 2 * seq_len), DenseAttention(mask))
    # the mask id stays in the softmax: the engine's confidence (what the unmasking threshold
    # compares) is measured the same way, so its logit must be pushed down too
    logits = model.compute_logits(hidden[:, :seq_len][noised.masked])
    return masked_token_loss(logits, x0[noised.masked], certainty_weight)


def ar_logits(model: DecoderModel, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token logits of a plain causal forward, ``[rows, L - 1, V]``."""
    pos = torch.arange(x.shape[1], device=x.device)
    return model.compute_logits(model(x, pos.expand_as(x), DenseAttention(mask))[:, :-1])


def ar_loss(model: DecoderModel, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a plain causal forward."""
    logits = ar_logits(model, x, mask)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def ar_anchor_loss(model: DecoderModel, teacher: DecoderModel | None, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The AR-stream loss on real text: KL(teacher || student) of the next-token distributions
    when a frozen ``teacher`` is given (AR behaviour anchored to the teacher's, without
    fitting the training text any further), else cross-entropy against the text. Also
    returns the student's plain cross-entropy against the text (for the log)."""
    logits = ar_logits(model, x, mask)
    flat = logits.reshape(-1, logits.shape[-1])
    ce = F.cross_entropy(flat, x[:, 1:].reshape(-1))
    if teacher is None:
        return ce, float(ce.detach())
    with torch.no_grad():
        target = F.log_softmax(ar_logits(teacher, x, mask).reshape(-1, logits.shape[-1]), dim=-1)
    kl = F.kl_div(F.log_softmax(flat, dim=-1), target, log_target=True, reduction="batchmean")
    return kl, float(ce.detach())


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def draft_eval(model: DecoderModel, traj: Trajectories, block_size: int, mask_token_id: int, batch_size: int = 16) -> dict[str, float]:
    """On (held-out) trajectories, every eligible block in the draft layout ``[seed, MASK...]``:
    masked-token CE, token accuracy, and the self_spec acceptance length a draft of
    ``block_size - 1`` would get (1 + leading correct drafts), exactly as the verifier counts."""
    model.eval()
    device = next(model.parameters()).device
    seq_len = traj.tokens.shape[1]
    mask = sbd_block_diff_mask(seq_len, block_size, device)
    gen = torch.Generator().manual_seed(0)
    ce_sum, n, correct, acc_lens = 0.0, 0, 0, []
    for i in range(0, len(traj), batch_size):
        x0 = torch.from_numpy(traj.tokens[i : i + batch_size])
        ts = torch.from_numpy(traj.target_start[i : i + batch_size])
        noised = distill_noise(x0, ts, block_size, mask_token_id, 1.0, gen).to(device)
        x0 = x0.to(device)
        rows = x0.shape[0]
        pos = torch.arange(seq_len, device=device)
        hidden = model(torch.cat([noised.noisy, x0], 1), torch.cat([pos, pos]).expand(rows, 2 * seq_len), DenseAttention(mask))
        logits = model.compute_logits(hidden[:, :seq_len])
        ce = F.cross_entropy(logits.transpose(1, 2), x0, reduction="none")
        logits[..., mask_token_id] = float("-inf")  # the engine never picks the mask id
        hit = (logits.argmax(-1) == x0) & noised.masked
        ce_sum += float(ce[noised.masked].sum())
        n += int(noised.masked.sum())
        correct += int(hit.sum())
        nb = seq_len // block_size
        blocks_masked = noised.masked.view(rows, nb, block_size)[..., 1:]
        blocks_hit = hit.view(rows, nb, block_size)[..., 1:]
        lead = torch.cumprod(blocks_hit.int(), dim=-1).sum(-1)  # leading correct drafts
        acc_lens += (lead[blocks_masked.any(-1)] + 1).tolist()
    model.train()
    return {"draft_ce": ce_sum / max(n, 1), "draft_acc": correct / max(n, 1),
            "draft_accept_len": float(np.mean(acc_lens)) if acc_lens else float("nan")}


@torch.no_grad()
def heldout_ar(model: DecoderModel, windows: torch.Tensor, batch_size: int = 16) -> dict[str, float]:
    """Held-out AR cross-entropy and perplexity (plain causal forward)."""
    model.eval()
    device = next(model.parameters()).device
    mask = causal_mask(windows.shape[1], device)
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        x = windows[i : i + batch_size].to(device)
        total += float(ar_loss(model, x, mask)) * x[:, 1:].numel()
        count += x[:, 1:].numel()
    model.train()
    return {"ar_ce": total / count, "ar_ppl": math.exp(total / count)}


def mode_stats(engine: LLMEngine, prompts: list[list[int]], max_tokens: int, **decode: Any) -> dict[str, Any]:
    """Outputs, TPF (emitted tokens / forward passes the requests took part in) and the mean
    self_spec acceptance length of greedy decoding in one mode (the prompts batched)."""
    params = RequestParams(SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), DecodeParams(**decode))
    outs = engine.generate(prompts, params)
    tokens = sum(o["stats"].completion_tokens for o in outs)
    passes = sum(o["stats"].total_forward_passes for o in outs)
    acc = [a for o in outs for a in o["stats"].acceptance_lengths]
    return {"outputs": [o["token_ids"] for o in outs], "tpf": tokens / max(passes, 1),
            "accept_len": float(np.mean(acc)) if acc else None}


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of positions where two sets of outputs hold the same token."""
    same = sum(x == y for u, v in zip(a, b) for x, y in zip(u, v))
    return same / max(1, sum(min(len(u), len(v)) for u, v in zip(a, b)))


def engine_eval(model: DecoderModel, model_dir: str, prompts: list[list[int]], max_tokens: int,
                block: int, threshold: float, lookahead: bool = False) -> dict[str, float]:
    """The engine's own figures for the current weights: diffusion TPF, agreement with AR
    greedy and its output's AR perplexity over AR output's at (block, threshold, lookahead),
    self_spec acceptance and TPF with draft block-1."""
    engine = teacher_engine(model, model_dir, 256, max_num_seqs=len(prompts), cpu_threads=torch.get_num_threads())
    ar = mode_stats(engine, prompts, max_tokens, mode="ar")
    diff = mode_stats(engine, prompts, max_tokens, mode="diffusion", block_length=block, threshold=threshold,
                      lookahead=lookahead)
    spec = mode_stats(engine, prompts, max_tokens, mode="self_spec", draft_length=block - 1)
    from benchmarks.modes_cpu import ar_perplexity

    ppl_ratio = ar_perplexity(engine, prompts, diff["outputs"]) / ar_perplexity(engine, prompts, ar["outputs"])
    return {"diffusion_tpf": diff["tpf"], "diffusion_agreement": agreement(diff["outputs"], ar["outputs"]),
            "diffusion_ppl_ratio": ppl_ratio,
            "self_spec_tpf": spec["tpf"], "self_spec_accept_len": spec["accept_len"],
            "self_spec_equals_ar": spec["outputs"] == ar["outputs"]}


# ----------------------------------------------------------------------------- plots


def plot_curves(log_path: Path, png_path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    if not train or not evals:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = lambda rs: [r["step"] for r in rs]  # noqa: E731
    ax = axes[0]
    ax.plot(steps(train), [r["distill_ce"] for r in train], alpha=0.6, label="train distillation CE (masked, trajectories)")
    ax.plot(steps(evals), [r["draft_ce"] for r in evals], "o-", label="held-out draft-layout CE (block 8)")
    ax.set_title("diffusion stream on greedy trajectories")
    ax.set_ylabel("nats / masked token")
    ax = axes[1]
    ax.plot(steps(train), [r["ar_ce"] for r in train], alpha=0.6, label="train AR CE (real training text)")
    ax.plot(steps(evals), [r["ar_ce"] for r in evals], "o-", label="held-out AR CE (real text)")
    ax.set_title("AR stream")
    ax.set_ylabel("nats / token")
    ax = axes[2]
    ax.plot(steps(evals), [r["diffusion_tpf"] for r in evals], "o-", label="diffusion TPF (engine)")
    ax.plot(steps(evals), [r["self_spec_accept_len"] for r in evals], "s-", label="self_spec acceptance length (engine)")
    ax.plot(steps(evals), [r["self_spec_tpf"] for r in evals], "^-", label="self_spec TPF (engine)")
    ax.plot(steps(evals), [r["diffusion_agreement"] for r in evals], "x--", label="diffusion agreement with AR")
    ax.set_title("held-out prompts, greedy")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------- main loop


def export(model: DecoderModel, model_dir: Path, out: Path, name: str = "final") -> Path:
    """bf16 weights with the source model's config.json and tokenizer/generation files."""
    final = out / name
    cfg = json.loads((model_dir / "config.json").read_text())
    save_checkpoint(model, final, cfg, dtype=torch.bfloat16)
    for file in EXPORT_FILES:
        if (model_dir / file).is_file():
            shutil.copy(model_dir / file, final / file)
    return final


def lr_at(step: int, progress: float, args: argparse.Namespace) -> float:
    warm = min(1.0, (step + 1) / max(1, args.warmup_steps))
    cosine = args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return args.lr * warm * cosine


def load_or_make_trajectories(args: argparse.Namespace, out: Path, model: DecoderModel, data: TokenData) -> tuple[Trajectories, Trajectories]:
    train_path, held_path = out / "trajectories.npz", out / "heldout_trajectories.npz"
    if train_path.is_file() and held_path.is_file():
        return Trajectories.load(train_path), Trajectories.load(held_path)
    t0 = time.perf_counter()
    engine = teacher_engine(model, args.model, args.seq_len, args.gen_batch, cpu_threads=args.threads)
    held = generate_trajectories(engine, make_prompts(data, args.heldout_rows, args.seq_len, args.seed + 7, 0.0, 0.0, heldout=True),
                                 args.seq_len, args.seed + 7)
    held.save(held_path)
    train = generate_trajectories(engine, make_prompts(data, args.rows, args.seq_len, args.seed, args.sampled_frac, args.chat_frac),
                                  args.seq_len, args.seed)
    train.save(train_path)
    seconds = time.perf_counter() - t0
    generated = int((args.seq_len - train.target_start).sum() + (args.seq_len - held.target_start).sum())
    info = {"rows": len(train), "heldout_rows": len(held), "seq_len": args.seq_len, "seconds": round(seconds, 1),
            "generated_tokens": generated, "greedy_target_tokens": int((args.seq_len - train.target_start).sum()),
            "kinds": {k: int((train.kind == v).sum()) for k, v in (("greedy", KIND_GREEDY), ("sampled_then_greedy", KIND_SAMPLED),
                                                                   ("chat", KIND_CHAT))}}
    (out / "trajectories.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({"trajectories": info}), flush=True)
    return train, held


def distill(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model_dir = Path(args.model)
    data = TokenData.load(args.data)
    model = load_model(model_dir, dtype=torch.float32, progress=False)
    mask_id = model.config.mask_token_id
    traj, held = load_or_make_trajectories(args, out, model, data)
    if args.generate_only:
        return {"generated": len(traj)}

    model.to(device)
    teacher = None
    if args.ar_target == "teacher":
        teacher = load_model(model_dir, device=device, dtype=torch.float32, progress=False).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "embed_tokens" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    sampler = BatchSampler(data, args.seq_len, chat_prob=args.chat_prob, seed=args.seed)
    rng = np.random.default_rng(args.seed + 1)
    noise_gen = torch.Generator().manual_seed(args.seed + 2)
    block_rng = random.Random(args.seed + 3)
    step, train_seconds = 0, 0.0
    ckpt_path = out / "ckpt" / "last.pt"
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, train_seconds = state["step"], state["train_seconds"]
        sampler.set_state(state["sampler"])
        rng.bit_generator.state = state["rng"]
        noise_gen.set_state(state["noise_gen"])
        block_rng.setstate(state["block_rng"])
        print(f"resumed at step {step} ({train_seconds:.0f} s of training done)", flush=True)
        if (out / "log.jsonl").is_file():  # rows logged after the checkpoint describe lost work
            kept = [line for line in (out / "log.jsonl").read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
            (out / "log.jsonl").write_text("".join(line + "\n" for line in kept))
    (out / "run.json").write_text(json.dumps({"args": vars(args)}, indent=2) + "\n")

    heldout_x = eval_windows(data.heldout, args.seq_len, args.eval_windows)
    eval_prompts = [p for p, _, _ in make_prompts(data, args.eval_prompts, 2 * args.eval_prompt_len + 2, args.seed + 11,
                                                  0.0, 0.0, heldout=True)]
    eval_prompts = [p[: args.eval_prompt_len] for p in eval_prompts]
    masks = {b: sbd_block_diff_mask(args.seq_len, b, device) for b in set(args.block_sizes)}
    causal = causal_mask(args.seq_len, device)
    log_f = open(out / "log.jsonl", "a")
    budget = args.minutes * 60.0

    def done() -> bool:
        return step >= args.max_steps if args.max_steps else train_seconds >= budget

    def progress() -> float:
        return step / args.max_steps if args.max_steps else train_seconds / budget

    def log(row: dict[str, Any]) -> None:
        log_f.write(json.dumps(row) + "\n")
        log_f.flush()
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    def evaluate_now() -> dict[str, Any]:
        t1 = time.perf_counter()
        row = {"kind": "eval", "step": step, "train_seconds": round(train_seconds, 1)}
        row.update(heldout_ar(model, heldout_x))
        row.update(draft_eval(model, held, args.eval_block, mask_id))
        row.update(engine_eval(model, args.model, eval_prompts, args.eval_new_tokens, args.eval_block, args.eval_threshold,
                                 args.eval_lookahead))
        row["eval_seconds"] = round(time.perf_counter() - t1, 1)
        log(row)
        return row

    def keep_if_best(row: dict[str, Any]) -> None:
        """``--keep-best``: export to ``DIR/best`` the evaluated weights with the longest draft
        acceptance among those whose held-out AR perplexity is within ``--best-ar-tolerance``
        of the step-0 evaluation's (``DIR/best.json`` says which step)."""
        if not args.keep_best:
            return
        evals = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"eval"' in line]
        base = next(r["ar_ppl"] for r in evals if r["step"] == 0)
        info_path = out / "best.json"
        best = json.loads(info_path.read_text()) if info_path.is_file() else None
        if row["ar_ppl"] <= base * (1 + args.best_ar_tolerance) and (best is None or row["draft_accept_len"] > best["draft_accept_len"]):
            export(model, model_dir, out, "best")
            info_path.write_text(json.dumps({k: row[k] for k in ("step", "ar_ppl", "draft_accept_len", "diffusion_tpf",
                                                                 "self_spec_accept_len")} | {"step0_ar_ppl": base}, indent=2) + "\n")

    def save_state() -> None:
        atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "train_seconds": train_seconds,
                      "sampler": sampler.state(), "rng": rng.bit_generator.state, "noise_gen": noise_gen.get_state(),
                      "block_rng": block_rng.getstate(), "args": vars(args)}, ckpt_path)

    if step == 0:
        first = evaluate_now()
        keep_if_best(first)
        train_seconds += first["eval_seconds"]
    first_losses: list[float] = []
    acc: dict[str, float] = {}
    last_eval = last_ckpt = train_seconds
    while not done():
        t0 = time.perf_counter()
        lr = lr_at(step, progress(), args)
        for g in opt.param_groups:
            g["lr"] = lr
        block = block_rng.choice(args.block_sizes)
        idx = rng.integers(len(traj), size=args.traj_rows)
        x0 = torch.from_numpy(traj.tokens[idx])
        noised = distill_noise(x0, torch.from_numpy(traj.target_start[idx]), block, mask_id, args.draft_prob, noise_gen,
                                args.lookahead_prob)
        d_loss, d_stats = distill_loss(model, x0.to(device), noised.to(device), masks[block], args.certainty_weight)
        if args.real_rows:
            a_loss, ar_ce = ar_anchor_loss(model, teacher, sampler.sample(args.real_rows).to(device), causal)
        else:
            a_loss, ar_ce = d_loss * 0.0, float("nan")
        loss = args.distill_weight * d_loss + args.ar_weight * a_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip))
        opt.step()
        step += 1
        loss_v = float(loss.detach())
        if not math.isfinite(loss_v):
            raise RuntimeError(f"non-finite loss at step {step}")
        if len(first_losses) < 5:
            first_losses.append(loss_v)
        train_seconds += time.perf_counter() - t0
        for k, v in {"loss": loss_v, "ar_loss": float(a_loss.detach()), "ar_ce": ar_ce, "distill_ce": d_stats["distill_ce"],
                     "distill_acc": d_stats["distill_acc"], "certainty": d_stats["certainty"], "grad_norm": grad_norm}.items():
            acc[k] = acc.get(k, 0.0) + v
        acc["n"] = acc.get("n", 0) + 1
        if step % args.log_every == 0 or done():
            n = acc.pop("n")
            log({"kind": "train", "step": step, "train_seconds": round(train_seconds, 1), "lr": lr, "block_size": block,
                 **{k: v / n for k, v in acc.items()}})
            acc = {}
        if train_seconds - last_eval >= args.eval_minutes * 60 and not done():
            row = evaluate_now()
            keep_if_best(row)
            train_seconds += row["eval_seconds"]
            last_eval = train_seconds
            plot_curves(out / "log.jsonl", out / "curves.png")
        if train_seconds - last_ckpt >= args.ckpt_minutes * 60 and not done():
            t1 = time.perf_counter()
            save_state()
            train_seconds += time.perf_counter() - t1
            last_ckpt = train_seconds
        if args.stop_at_step and step >= args.stop_at_step and not done():
            save_state()
            log_f.close()
            print(f"stopped at step {step} (--stop-at-step); run again to resume", flush=True)
            return {"steps": step, "stopped": True}
    save_state()
    final_eval = evaluate_now()
    keep_if_best(final_eval)
    log_f.close()
    plot_curves(out / "log.jsonl", out / "curves.png", title=f"self-distillation: {step} steps, {train_seconds / 60:.0f} min on {device.type}")
    final = export(model, model_dir, out)
    shipped = load_model(final, dtype=torch.float32, progress=False)
    summary = {"steps": step, "train_seconds": train_seconds, "first_losses": first_losses, "final_eval": final_eval,
               "heldout_ar_bf16_weights": heldout_ar(shipped, heldout_x), "threads": args.threads,
               "checkpoint_bytes": (final / "model.safetensors").stat().st_size}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Self-distillation of the diffusion stream on the model's own AR trajectories.")
    ap.add_argument("--model", required=True, help="model folder to start from (the teacher)")
    ap.add_argument("--data", required=True, help="data.npz of training.train (train, chat and held-out streams)")
    ap.add_argument("--out", required=True, help="run folder (trajectories, checkpoint, logs, final model)")
    ap.add_argument("--rows", type=int, default=2000, help="training trajectories to generate")
    ap.add_argument("--heldout-rows", type=int, default=64, help="held-out trajectories (evaluation only)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--sampled-frac", type=float, default=0.2, help="share of rows whose context ends with sampled tokens")
    ap.add_argument("--chat-frac", type=float, default=0.2, help="share of rows that continue a chat opening")
    ap.add_argument("--gen-batch", type=int, default=64, help="requests decoded at once while generating")
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--minutes", type=float, default=50.0, help="training time budget (counted across resumes)")
    ap.add_argument("--max-steps", type=int, default=0, help="step budget (overrides --minutes)")
    ap.add_argument("--stop-at-step", type=int, default=0, help="checkpoint and exit at this step (as if interrupted)")
    ap.add_argument("--traj-rows", type=int, default=12)
    ap.add_argument("--real-rows", type=int, default=8)
    ap.add_argument("--chat-prob", type=float, default=0.2, help="share of real rows drawn from the chat stream")
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[4, 8, 8, 16, 16, 32],
                    help="training block sizes, drawn uniformly per step (repeat one to weight it)")
    ap.add_argument("--draft-prob", type=float, default=0.5, help="share of blocks in the [seed, MASK...] layout")
    ap.add_argument("--lookahead-prob", type=float, default=0.0,
                    help="share of blocks masked whole (the canvas a diffusion commit pass proposes with lookahead)")
    ap.add_argument("--distill-weight", type=float, default=1.0)
    ap.add_argument("--certainty-weight", type=float, default=0.0,
                    help="weight of the entropy of correct proposals (certainty forcing; 0: plain cross-entropy)")
    ap.add_argument("--ar-weight", type=float, default=1.0)
    ap.add_argument("--ar-target", choices=("teacher", "data"), default="teacher",
                    help="AR loss on real text: KL to the frozen teacher's next-token distribution, or CE on the text")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup-steps", type=int, default=30)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (training on the CPU, generation, engine evals)")
    ap.add_argument("--device", default="cpu", help="where training steps run (cpu, cuda); the engine always runs on the CPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--eval-minutes", type=float, default=6.0)
    ap.add_argument("--eval-windows", type=int, default=48, help="held-out real-text windows for AR perplexity")
    ap.add_argument("--eval-prompts", type=int, default=8, help="held-out prompts for the engine's TPF")
    ap.add_argument("--eval-prompt-len", type=int, default=24)
    ap.add_argument("--eval-new-tokens", type=int, default=48)
    ap.add_argument("--eval-block", type=int, default=8)
    ap.add_argument("--eval-threshold", type=float, default=0.9)
    ap.add_argument("--eval-lookahead", action="store_true", help="evaluate diffusion with lookahead")
    ap.add_argument("--ckpt-minutes", type=float, default=4.0)
    ap.add_argument("--keep-best", action="store_true", help="also export the best evaluated weights to DIR/best")
    ap.add_argument("--best-ar-tolerance", type=float, default=0.02,
                    help="--keep-best considers weights whose held-out AR perplexity is within this share of step 0's")
    args = ap.parse_args(argv)
    for b in args.block_sizes:
        if b < 2 or args.seq_len % b:
            ap.error(f"block size {b} must be >= 2 and divide --seq-len {args.seq_len}")
    return args


def main(argv: list[str] | None = None) -> None:
    distill(parse_args(argv))


if __name__ == "__main__":
    main()
