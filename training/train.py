"""Train a tri-mode Nemotron-Labs Diffusion model of the server's schema from scratch.

    python -m training.train --out DIR [--device cuda] [--minutes N] [--resume]

Pipeline: corpus (``training.corpus``) -> byte-level BPE (``training.tokenizer``) -> token
streams with synthetic chat samples (``training.data``) -> joint AR + block-diffusion
objective (``training.objective``) on the server's own ``DecoderModel`` -> a checkpoint the
server loads unchanged.

Output folder::

    DIR/tokenizer/        HF tokenizer files
    DIR/data.npz          token streams (train, chat, chat sample starts, held-out)
    DIR/ckpt/last.pt      resumable state (model, optimizer, step, RNG states, time used)
    DIR/log.jsonl         one JSON row per log interval ("train") and per evaluation ("eval")
    DIR/loss.png          loss curves
    DIR/summary.json      final metrics
    DIR/final/            config.json, model.safetensors (bf16), tokenizer files,
                          generation_config.json: the servable checkpoint

The schedule is cosine with linear warmup over the run's budget: ``--max-steps`` if given,
else ``--minutes`` of training wall time (counted across resumes), so the learning rate
anneals on time even when the (shared) CPU speed varies.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from server.model.config import ModelConfig
from server.model.loader import save_checkpoint
from server.model.model import DecoderModel, DenseAttention
from server.model.tiny import tiny_nld_config
from training.corpus import build_corpus, read_jsonl
from training.data import BatchSampler, TokenData, build_token_data, eval_windows
from training.objective import BLOCK_SIZES, DIFFUSION_WEIGHT, causal_mask, joint_loss, sbd_block_diff_mask
from training.tokenizer import (BOS_ID, DEFAULT_VOCAB_SIZE, EOS_ID, MASK_ID, PAD_ID, TOKENIZER_FILES,
                                save_hf_tokenizer, train_bpe)

# name -> (hidden, layers, heads, kv_heads, head_dim, intermediate)
PRESETS: dict[str, tuple[int, int, int, int, int, int]] = {
    "tiny": (64, 2, 4, 2, 16, 128),  # tests
    "small": (256, 4, 4, 2, 64, 768),  # 5.2M params, 10.5 MB bf16: an hour on one CPU thread
    "base": (384, 5, 6, 2, 64, 1152),  # 11.8M params, 23.5 MB bf16: minutes on a GPU
}


def model_config(preset: str, vocab_size: int, block_size: int = 32) -> dict[str, Any]:
    """A config.json of the NLD schema (architectures, YaRN rope_parameters, mask/bos/eos ids)."""
    hidden, layers, heads, kv, head_dim, inter = PRESETS[preset]
    cfg = tiny_nld_config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        intermediate_size=inter,
        mask_token_id=MASK_ID,
        block_size=block_size,
        eos_token_id=EOS_ID,
    )
    cfg.update(
        bos_token_id=BOS_ID,
        pad_token_id=PAD_ID,
        torch_dtype="bfloat16",
        dlm_paradigm="bidirectional",
        ar_loss_weight=1.0,
        dlm_loss_weight=DIFFUSION_WEIGHT,
        training_block_sizes=list(BLOCK_SIZES),
    )
    return cfg


def init_weights(model: DecoderModel, seed: int) -> None:
    """N(0, 0.02) for matrices; residual output projections scaled by 1/sqrt(2 * layers)."""
    gen = torch.Generator().manual_seed(seed)
    n_layers = model.config.num_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
                continue
            std = 0.02
            if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                std /= math.sqrt(2 * n_layers)
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def param_groups(model: DecoderModel, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim == 2 and "embed_tokens" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, progress: float, args: argparse.Namespace) -> float:
    warm = min(1.0, (step + 1) / max(1, args.warmup_steps))
    progress = min(max(progress, 0.0), 1.0)
    cosine = args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return args.lr * warm * cosine


def autocast_ctx(device: torch.device):  # type: ignore[no-untyped-def]
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# ----------------------------------------------------------------------------- data prep


def prepare(args: argparse.Namespace, out: Path) -> tuple[TokenData, int]:
    """Corpus -> tokenizer -> token streams (each step reused from ``out`` when present)."""
    tok_dir = out / "tokenizer"
    data_path = out / "data.npz"
    if (tok_dir / "tokenizer.json").is_file() and data_path.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
        return TokenData.load(data_path), tok.get_vocab_size()
    corpus = Path(args.corpus) if args.corpus else build_corpus()
    train_docs = read_jsonl(corpus / "train.jsonl")
    heldout_docs = read_jsonl(corpus / "heldout.jsonl")
    if (tok_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    else:
        tok = train_bpe((d.text for d in train_docs), args.vocab_size)
        save_hf_tokenizer(tok, tok_dir)
    data = build_token_data(tok, train_docs, heldout_docs, chat_fraction=args.chat_fraction, seed=args.seed)
    data.save(data_path)
    if (corpus / "manifest.json").is_file():
        shutil.copy(corpus / "manifest.json", out / "corpus_manifest.json")
    return data, tok.get_vocab_size()


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: DecoderModel, windows: torch.Tensor, device: torch.device, batch_size: int,
             block_size: int = 32, seed: int = 1234, with_ar: bool = True) -> dict[str, float]:
    """Held-out AR cross-entropy / perplexity (plain causal forward) and the masked-token
    loss of the diffusion stream (fixed noise seed, block ``block_size``)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    seq_len = windows.shape[1]
    causal = causal_mask(seq_len, device)
    sbd = sbd_block_diff_mask(seq_len, block_size, device)
    pos = torch.arange(seq_len, device=device)
    ar_sum, ar_n, m_sum, m_n, d_sum, d_rows = 0.0, 0, 0.0, 0, 0.0, 0
    for i in range(0, len(windows), batch_size):
        x = windows[i : i + batch_size].to(device)
        with autocast_ctx(device):
            if with_ar:
                h = model(x, pos.expand_as(x), DenseAttention(causal))
                logits = model.compute_logits(h[:, :-1])
                ar_sum += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
                ar_n += x[:, 1:].numel()
            out = joint_loss(model, x, block_size, MASK_ID, generator=gen, mask=sbd)
        m_sum += float(out.masked_ce) * out.num_masked
        m_n += out.num_masked
        d_sum += float(out.diffusion_loss) * x.shape[0]
        d_rows += x.shape[0]
    model.train()
    ar_ce = ar_sum / ar_n if ar_n else float("nan")
    return {
        "ar_ce": ar_ce,
        "ar_ppl": math.exp(ar_ce) if ar_n else float("nan"),
        "masked_ce": m_sum / max(1, m_n),
        "diffusion_loss": d_sum / max(1, d_rows),
        "eval_tokens": ar_n,
    }


# ----------------------------------------------------------------------------- logging / plots


def plot_curves(log_path: Path, png_path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval" and not r.get("final")]
    finals = [r for r in rows if r.get("kind") == "eval" and r.get("final")]
    final_x = [r.get("exported_tokens", r["tokens"]) / 1e6 for r in finals]
    if not train:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    mtok = lambda rs: [r["tokens"] / 1e6 for r in rs]  # noqa: E731
    panels = (
        ("ar_loss", "ar_ce", "train AR CE", "held-out AR CE", "nats / token", "autoregressive (next-token) loss"),
        ("masked_ce", "masked_ce", "train masked-token CE", "held-out masked-token CE (block 32)", "nats / masked token",
         "diffusion (masked-token) loss, t ~ U(eps, 1)"),
    )
    for ax, (train_key, eval_key, train_label, eval_label, ylabel, panel_title) in zip(axes, panels):
        ax.plot(mtok(train), [r[train_key] for r in train], label=train_label, alpha=0.6)
        if evals:
            ax.plot(mtok(evals), [r[eval_key] for r in evals], "o-", label=eval_label)
        if finals:
            ax.plot(final_x, [r[eval_key] for r in finals], "*", ms=14, color="C3", label="exported weights, all held-out")
        ax.set_xlabel("training tokens (M, clean stream)")
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title)
        ax.legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def export_final(model: DecoderModel, cfg: dict[str, Any], out: Path, args: argparse.Namespace) -> Path:
    final = out / "final"
    save_checkpoint(model, final, cfg, dtype=torch.bfloat16)
    for name in TOKENIZER_FILES:
        shutil.copy(out / "tokenizer" / name, final / name)
    gen_cfg = {
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "max_new_tokens": args.max_new_tokens,
    }
    (final / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    return final


# ----------------------------------------------------------------------------- main loop


def train(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    data, vocab_size = prepare(args, out)
    if args.prepare_only:
        print(json.dumps({"train_tokens": len(data.train), "chat_tokens": len(data.chat), "heldout_tokens": len(data.heldout),
                          "vocab_size": vocab_size}), flush=True)
        return {"prepared": True}
    ckpt_path = out / "ckpt" / "last.pt"
    state = None
    if args.resume:
        if not ckpt_path.is_file():
            raise SystemExit(f"--resume: no checkpoint at {ckpt_path}")
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        cfg = state["config"]
    else:
        cfg = model_config(args.preset, vocab_size, args.block_size)
    model = DecoderModel(ModelConfig.from_dict(cfg))
    init_weights(model, args.seed)
    model.to(device).train()
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                            fused=device.type == "cuda")
    sampler = BatchSampler(data, args.seq_len, chat_prob=args.chat_prob, seed=args.seed)
    noise_gen = torch.Generator().manual_seed(args.seed + 1)
    block_rng = random.Random(args.seed + 2)
    step, tokens, train_seconds = 0, 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, tokens, train_seconds = state["step"], state["tokens"], state["train_seconds"]
        sampler.set_state(state["sampler"])
        noise_gen.set_state(state["noise_gen"])
        block_rng.setstate(state["block_rng"])
    (out / "run.json").write_text(json.dumps({"args": vars(args), "config": cfg}, indent=2) + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M params; train stream {len(data.train)} tokens, chat {len(data.chat)}, "
          f"held-out {len(data.heldout)}; device {device}; start step {step}", flush=True)

    eval_x = eval_windows(data.heldout, args.seq_len, args.eval_windows)
    masks = {b: sbd_block_diff_mask(args.seq_len, b, device) for b in args.block_sizes}
    budget = args.minutes * 60.0

    def progress() -> float:
        if args.max_steps:
            return step / args.max_steps
        return max(train_seconds / budget, tokens / args.max_tokens if args.max_tokens else 0.0)

    def done() -> bool:
        if args.max_steps:
            return step >= args.max_steps
        return train_seconds >= budget or bool(args.max_tokens and tokens >= args.max_tokens)

    def save_state() -> None:
        atomic_save({
            "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "tokens": tokens,
            "train_seconds": train_seconds, "config": cfg, "args": vars(args), "sampler": sampler.state(),
            "noise_gen": noise_gen.get_state(), "block_rng": block_rng.getstate(),
        }, ckpt_path)

    log_f = open(out / "log.jsonl", "a")

    def log(row: dict[str, Any]) -> None:
        log_f.write(json.dumps(row) + "\n")
        log_f.flush()

    best: dict[str, Any] = {"ar_ce": float("inf"), "state": None, "step": None, "tokens": None}
    acc: dict[str, float] = {"loss": 0.0, "ar_loss": 0.0, "diffusion_loss": 0.0, "masked_ce": 0.0, "n": 0, "tok": 0, "sec": 0.0}
    last_ckpt = last_eval = train_seconds
    first_losses: list[float] = []
    while not done():
        t0 = time.perf_counter()
        lr = lr_at(step, progress(), args)
        for g in opt.param_groups:
            g["lr"] = lr
        x = sampler.sample(args.batch_size).to(device, non_blocking=True)
        block = block_rng.choice(args.block_sizes)
        with autocast_ctx(device):
            res = joint_loss(model, x, block, MASK_ID, args.diffusion_weight, args.eps, noise_gen, masks[block])
        opt.zero_grad(set_to_none=True)
        res.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        tokens += x.numel()
        loss_v = float(res.loss.detach())
        if not math.isfinite(loss_v):
            raise RuntimeError(f"non-finite loss at step {step}")
        if len(first_losses) < 5:
            first_losses.append(loss_v)
        dt = time.perf_counter() - t0
        train_seconds += dt
        for k in ("loss", "ar_loss", "diffusion_loss", "masked_ce"):
            acc[k] += float(getattr(res, k).detach())
        acc["n"] += 1
        acc["tok"] += x.numel()
        acc["sec"] += dt
        if step % args.log_every == 0 or done():
            n = acc["n"]
            row = {"kind": "train", "step": step, "tokens": tokens, "train_seconds": round(train_seconds, 2),
                   "lr": lr, "grad_norm": float(grad_norm), "block_size": block,
                   "tok_per_s": acc["tok"] / max(acc["sec"], 1e-9)}
            row.update({k: acc[k] / n for k in ("loss", "ar_loss", "diffusion_loss", "masked_ce")})
            log(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
            acc = {k: 0 if k in ("n", "tok") else 0.0 for k in acc}
        eval_due = (args.eval_every and step % args.eval_every == 0) or (
            not args.eval_every and train_seconds - last_eval >= args.eval_minutes * 60)
        if eval_due and not done():
            t1 = time.perf_counter()
            metrics = evaluate(model, eval_x, device, args.eval_batch_size, args.block_size)
            train_seconds += time.perf_counter() - t1
            last_eval = train_seconds
            if args.keep_best and metrics["ar_ce"] < best["ar_ce"]:
                best.update(ar_ce=metrics["ar_ce"], step=step, tokens=tokens,
                            state={k: v.detach().clone() for k, v in model.state_dict().items()})
            log({"kind": "eval", "step": step, "tokens": tokens, "train_seconds": round(train_seconds, 2), **metrics})
            print(json.dumps({"eval": metrics, "step": step}), flush=True)
            plot_curves(out / "log.jsonl", out / "loss.png")
        if train_seconds - last_ckpt >= args.ckpt_minutes * 60 and not done():
            t1 = time.perf_counter()
            save_state()
            train_seconds += time.perf_counter() - t1
            last_ckpt = train_seconds

        if args.stop_at_step and step >= args.stop_at_step:
            break

    save_state()
    if args.keep_best and best["state"] is not None and not (args.stop_at_step and step >= args.stop_at_step):
        last_ce = evaluate(model, eval_x, device, args.eval_batch_size, args.block_size)["ar_ce"]
        if best["ar_ce"] < last_ce:
            print(f"exporting the best evaluated weights (step {best['step']}: held-out AR CE {best['ar_ce']:.4f} "
                  f"< {last_ce:.4f} at the end)", flush=True)
            model.load_state_dict(best["state"])
        else:
            best.update(step=step, tokens=tokens)
    if args.stop_at_step and step >= args.stop_at_step and not done():
        log_f.close()
        print(f"stopped at step {step} (--stop-at-step); continue with --resume", flush=True)
        return {"steps": step, "tokens": tokens, "train_seconds": train_seconds, "stopped": True}
    all_heldout = eval_windows(data.heldout, args.seq_len, 10**9)
    metrics = evaluate(model, all_heldout if args.full_final_eval else eval_x, device, args.eval_batch_size, args.block_size)
    exported_step = best["step"] if args.keep_best and best["step"] is not None else step
    exported_tokens = best["tokens"] if args.keep_best and best["tokens"] is not None else tokens
    log({"kind": "eval", "step": step, "tokens": tokens, "train_seconds": round(train_seconds, 2), "final": True,
         "exported_step": exported_step, "exported_tokens": exported_tokens, **metrics})
    log_f.close()
    plot_curves(out / "log.jsonl", out / "loss.png",
                title=f"NLD default model: {n_params / 1e6:.1f}M params, {tokens / 1e6:.1f}M tokens")
    final = export_final(model, cfg, out, args)
    # the shipped weights are bf16: measure held-out perplexity of exactly those weights
    from server.model.loader import load_model

    shipped = load_model(final, device=device, dtype=torch.float32, progress=False)
    shipped_metrics = evaluate(shipped, all_heldout if args.full_final_eval else eval_x, device,
                               args.eval_batch_size, args.block_size)
    summary = {
        "params": n_params,
        "steps": step,
        "tokens": tokens,
        "train_seconds": train_seconds,
        "tokens_per_second": tokens / max(train_seconds, 1e-9),
        "first_losses": first_losses,
        "exported_step": exported_step,
        "final_eval": metrics,
        "final_eval_bf16_weights": shipped_metrics,
        "checkpoint_bytes": (final / "model.safetensors").stat().st_size,
        "device": str(device),
        "threads": args.threads,
        "config": cfg,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}), flush=True)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Train the default tri-mode NLD model (AR + block diffusion).")
    ap.add_argument("--out", required=True, help="run folder (checkpoints, logs, final model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--minutes", type=float, default=60.0, help="training wall-time budget (ignored with --max-steps)")
    ap.add_argument("--max-steps", type=int, default=0, help="step budget (overrides --minutes/--max-tokens)")
    ap.add_argument("--max-tokens", type=float, default=0, help="also stop (and anneal) at this many clean tokens")
    ap.add_argument("--prepare-only", action="store_true", help="build tokenizer and token data in DIR, then exit")
    ap.add_argument("--keep-best", action=argparse.BooleanOptionalAction, default=True,
                    help="export the evaluated weights with the lowest held-out AR loss")
    ap.add_argument("--resume", action="store_true", help="continue from DIR/ckpt/last.pt")
    ap.add_argument("--stop-at-step", type=int, default=0, help="save a checkpoint and exit at this step (as if interrupted)")
    ap.add_argument("--corpus", default=None, help="corpus folder with train.jsonl/heldout.jsonl (default: build it)")
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    ap.add_argument("--block-size", type=int, default=32, help="config block_size (inference default)")
    ap.add_argument("--block-sizes", type=int, nargs="+", default=list(BLOCK_SIZES), help="training block sizes")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--diffusion-weight", type=float, default=DIFFUSION_WEIGHT)
    ap.add_argument("--eps", type=float, default=0.05, help="minimum masking ratio")
    ap.add_argument("--chat-fraction", type=float, default=0.2, help="share of chat tokens in the prepared data")
    ap.add_argument("--chat-prob", type=float, default=0.2, help="share of batch rows drawn from the chat stream")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: every --eval-minutes)")
    ap.add_argument("--eval-minutes", type=float, default=5.0)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--eval-batch-size", type=int, default=16)
    ap.add_argument("--full-final-eval", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--ckpt-minutes", type=float, default=5.0)
    ap.add_argument("--max-new-tokens", type=int, default=256, help="generation_config.json default")
    args = ap.parse_args(argv)
    for b in args.block_sizes:
        if b <= 0 or args.seq_len % b:
            ap.error(f"block size {b} must divide --seq-len {args.seq_len}")
    return args


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
