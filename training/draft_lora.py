"""Train a draft-only LoRA (``linear_spec_lora/``) that raises self-speculation acceptance.

    python -m training.draft_lora --model server/default_model --data runs/gpu/data.npz \
        [--trajectories RUN] [--minutes 15] [--rank 16] [--out server/default_model/linear_spec_lora]

Self-speculation accepts a drafted token only when it equals what the verifier (the base
model, causal) would pick, so the drafter should predict the base model's own greedy
continuation, not the corpus. This program distils exactly that:

1. trajectories are the base model's greedy continuations of training-set windows, of windows
   continued first by a few sampled tokens, and of chat openings (``training.distill``'s
   generator, batched in the engine; ``--trajectories RUN`` reuses the files of a distillation
   run whose teacher was this same model); held-out trajectories continue windows of the
   held-out stream and only measure;
2. each training example cuts a trajectory at a seed position c at or after its prompt's
   last token: the clean prefix ``tokens[:c]`` (causal), then the draft block
   ``[tokens[c], MASK x (B-1)]`` attending to the prefix and bidirectionally to itself, exactly
   as a draft pass sees it; the targets ``tokens[c+1 : c+B]`` are all greedy continuation;
3. the loss is cross-entropy of the block rows against the targets, weighted towards the
   first positions (a draft is accepted left to right, so early positions matter most); the
   log reports it and the acceptance length it implies on the held-out trajectories;
4. only LoRA matrices on ``o_proj`` train, applied on the block rows only, like at inference.

The adapter is written in PEFT's layout (``adapter_config.json``, ``adapter_model.safetensors``
with ``base_model.model.encoder.layers.N.self_attn.o_proj.lora_{A,B}.weight``), which
``server.model.loader`` loads as the draft-only adapter. The verifier stays the base model,
so greedy output is unchanged; only the acceptance length moves.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from server.model.loader import load_model
from server.model.model import DecoderModel, DenseAttention, LoraDelta
from training.data import TokenData
from training.distill import Trajectories, generate_trajectories, make_prompts, teacher_engine


def base_trajectories(model: DecoderModel, model_dir: str, data: TokenData, rows: int, heldout_rows: int, seq_len: int,
                      seed: int) -> tuple[Trajectories, Trajectories]:
    """Training and held-out trajectories of the base model (greedy after each prompt)."""
    engine = teacher_engine(model, model_dir, seq_len)
    train = generate_trajectories(engine, make_prompts(data, rows, seq_len, seed, 0.2, 0.2), seq_len, seed)
    held = generate_trajectories(engine, make_prompts(data, heldout_rows, seq_len, seed + 7, 0.0, 0.0, heldout=True),
                                 seq_len, seed + 7)
    return train, held


def attach_lora(model: DecoderModel, rank: int, alpha: float) -> list[torch.nn.Parameter]:
    """Fresh LoRA deltas on every layer's o_proj (B = 0, so training starts from the base model)."""
    params = []
    for layer in model.layers:
        attn = layer.self_attn
        delta = LoraDelta(attn.o_proj.in_features, attn.o_proj.out_features, rank, alpha / rank)
        torch.nn.init.normal_(delta.lora_A.weight, std=1.0 / attn.o_proj.in_features**0.5)
        torch.nn.init.zeros_(delta.lora_B.weight)
        attn.draft_lora = delta
        params += list(delta.parameters())
    return params


def draft_batch(traj: Trajectories, batch: int, block: int, mask_id: int, rng: random.Random):  # type: ignore[no-untyped-def]
    """Inputs [batch, c + block], targets [batch, block - 1] (the drafted positions), for one
    seed position c drawn per batch: the prefix is each trajectory from its start, as the
    verifier's cache holds it (a window cut mid-text would not look like a real context). The
    seed is at or after the prompt's last token (``target_start - 1``), so every target is the
    base model's greedy continuation, which is what the verifier accepts."""
    seq_len = traj.tokens.shape[1]
    first = max(1, int(traj.target_start.min()) - 1)
    if first > seq_len - block:
        raise ValueError(f"no trajectory has room for a {block}-token draft block after its prompt")
    c = rng.randrange(first, seq_len - block + 1)
    rows = [i for i in range(len(traj)) if int(traj.target_start[i]) - 1 <= c]
    inputs, targets = [], []
    for _ in range(batch):
        seq = traj.tokens[rng.choice(rows)].tolist()
        inputs.append(seq[:c] + [seq[c]] + [mask_id] * (block - 1))
        targets.append(seq[c + 1 : c + block])
    return torch.tensor(inputs), torch.tensor(targets)


def draft_mask(prefix_len: int, block: int) -> torch.Tensor:
    """Causal over the prefix; the block sees the whole prefix and all of itself."""
    total = prefix_len + block
    allowed = torch.ones(total, total, dtype=torch.bool).tril()
    allowed[prefix_len:, prefix_len:] = True
    return allowed


def draft_metrics(model: DecoderModel, x: torch.Tensor, y: torch.Tensor, mask_id: int,
                  weights: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Position-weighted draft loss of a ``draft_batch``, and its mean acceptance length: 1 +
    the number of leading drafts equal to their targets (what a verify pass would accept)."""
    total = x.shape[1]
    prefix_len = total - y.shape[1] - 1
    rows = torch.zeros(total, dtype=torch.bool)
    rows[prefix_len:] = True
    hidden = model(x, torch.arange(total).expand_as(x), DenseAttention(draft_mask(prefix_len, total - prefix_len)),
                   rows.expand_as(x))
    logits = model.compute_logits(hidden[:, prefix_len + 1 :])  # rows predicting draft tokens
    logits[..., mask_id] = float("-inf")
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
    loss = (ce.view(y.shape) * weights).sum(-1).mean()
    matches = (logits.argmax(-1) == y).int()
    accepted = matches.cumprod(-1).sum(-1).float().mean().item() + 1.0
    return loss, accepted


def save_adapter(model: DecoderModel, out: Path, rank: int, alpha: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, layer in enumerate(model.layers):
        delta = layer.self_attn.draft_lora
        assert delta is not None
        prefix = f"base_model.model.encoder.layers.{i}.self_attn.o_proj"
        tensors[f"{prefix}.lora_A.weight"] = delta.lora_A.weight.detach().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = delta.lora_B.weight.detach().contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": ["o_proj"], "lora_dropout": 0.0,
              "bias": "none", "inference_mode": True, "task_type": None}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default=None, help="data.npz of training.train (train, chat and held-out streams)")
    ap.add_argument("--out", default=None, help="adapter folder (default: MODEL/linear_spec_lora)")
    ap.add_argument("--trajectories", default=None,
                    help="a training.distill run folder whose (heldout_)trajectories.npz this model generated")
    ap.add_argument("--rows", type=int, default=1500, help="training trajectories to generate")
    ap.add_argument("--heldout-rows", type=int, default=64, help="held-out trajectories to generate (evaluation only)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--max-steps", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=100, help="steps between held-out evaluations (0: start and end only)")
    ap.add_argument("--save-minutes", type=float, default=5.0, help="write the adapter this often (a run can be stopped)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not (args.data or args.trajectories):
        ap.error("give --data (to generate trajectories) or --trajectories")
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    t0 = time.time()
    model = load_model(args.model, progress=False).float()
    if args.trajectories:
        run = Path(args.trajectories)
        train, held = Trajectories.load(run / "trajectories.npz"), Trajectories.load(run / "heldout_trajectories.npz")
    else:
        train, held = base_trajectories(model, args.model, TokenData.load(args.data), args.rows, args.heldout_rows,
                                        args.seq_len, args.seed)
    print(json.dumps({"trajectories": len(train), "heldout": len(held), "seconds": round(time.time() - t0)}), flush=True)
    for p in model.parameters():
        p.requires_grad_(False)
    lora = attach_lora(model, args.rank, args.alpha)
    opt = torch.optim.AdamW(lora, lr=args.lr, weight_decay=0.0)
    mask_id = model.config.mask_token_id
    held_rng = random.Random(args.seed + 1)
    held_batches = [draft_batch(held, 32, args.block, mask_id, held_rng) for _ in range(8)]
    weights = 1.0 / torch.arange(1, args.block, dtype=torch.float32)  # early draft positions matter most
    weights = weights / weights.sum()
    deadline = time.time() + args.minutes * 60
    out = Path(args.out) if args.out else Path(args.model) / "linear_spec_lora"
    next_save = time.time() + args.save_minutes * 60
    step = 0

    def evaluate() -> None:
        with torch.no_grad():
            metrics = [draft_metrics(model, x, y, mask_id, weights) for x, y in held_batches]
        loss, accepted = (sum(float(m[i]) for m in metrics) / len(metrics) for i in (0, 1))
        print(json.dumps({"step": step, "heldout_loss": round(loss, 4), "heldout_acceptance": round(accepted, 3),
                          "elapsed_s": round(time.time() - t0)}), flush=True)

    evaluate()  # B = 0: the base model's own drafts
    while time.time() < deadline and (not args.max_steps or step < args.max_steps):
        x, y = draft_batch(train, args.batch_size, args.block, mask_id, rng)
        loss, _ = draft_metrics(model, x, y, mask_id, weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 20 == 0:
            print(json.dumps({"step": step, "loss": round(loss.item(), 4), "elapsed_s": round(time.time() - t0)}), flush=True)
        if args.eval_every and step % args.eval_every == 0:
            evaluate()
        if time.time() >= next_save:
            save_adapter(model, out, args.rank, args.alpha)
            next_save = time.time() + args.save_minutes * 60
    evaluate()
    save_adapter(model, out, args.rank, args.alpha)
    print(f"adapter written to {out} after {step} steps", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
