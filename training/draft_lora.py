"""Train a draft-only LoRA (``linear_spec_lora/``) that raises self-speculation acceptance.

    python -m training.draft_lora --model server/default_model --data runs/gpu/data.npz \
        [--minutes 15] [--rank 16] [--out server/default_model/linear_spec_lora]

Self-speculation accepts a drafted token only when it equals what the verifier (the base
model, causal) would pick, so the drafter should predict the base model's own greedy
continuation, not the corpus. This program distils exactly that:

1. prompts are windows of the training token stream; the engine decodes each greedily (AR);
2. each training example cuts a decoded sequence at a random point c: the clean prefix
   ``seq[:c]`` (causal), then the draft block ``[seq[c], MASK x (B-1)]`` attending to the
   prefix and bidirectionally to itself, exactly as a draft pass sees it;
3. the loss is cross-entropy of the block rows against ``seq[c+1 : c+B]``, weighted towards the
   first positions (a draft is accepted left to right, so early positions matter most);
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

import numpy as np
import torch
from safetensors.torch import save_file

from server.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.params import DecodeParams, RequestParams, SamplingParams
from server.model.loader import load_model
from server.model.model import DecoderModel, DenseAttention, LoraDelta


def distillation_sequences(model_dir: str, stream: np.ndarray, count: int, prompt_len: int, new_tokens: int, seed: int) -> list[list[int]]:
    """``count`` sequences: a window of ``stream`` followed by the base model's greedy continuation."""
    rng = random.Random(seed)
    engine = LLMEngine(load_model(model_dir, progress=False), EngineConfig(model=model_dir, max_model_len=1024, kv_cache_tokens=65536))
    prompts = []
    for _ in range(count):
        start = rng.randrange(0, len(stream) - prompt_len)
        prompts.append([int(t) for t in stream[start : start + prompt_len]])
    params = RequestParams(SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True), DecodeParams(mode="ar"))
    outs = engine.generate(prompts, params)
    return [p + o["token_ids"] for p, o in zip(prompts, outs)]


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


def draft_batch(seqs: list[list[int]], batch: int, prefix_len: int, block: int, mask_id: int, rng: random.Random):  # type: ignore[no-untyped-def]
    """Inputs [batch, prefix_len + block], targets [batch, block - 1] (the drafted positions)."""
    inputs, targets = [], []
    for _ in range(batch):
        seq = rng.choice(seqs)
        c = rng.randrange(prefix_len, len(seq) - block + 1)
        inputs.append(seq[c - prefix_len : c] + [seq[c]] + [mask_id] * (block - 1))
        targets.append(seq[c + 1 : c + block])
    return torch.tensor(inputs), torch.tensor(targets)


def draft_mask(prefix_len: int, block: int) -> torch.Tensor:
    """Causal over the prefix; the block sees the whole prefix and all of itself."""
    total = prefix_len + block
    allowed = torch.ones(total, total, dtype=torch.bool).tril()
    allowed[prefix_len:, prefix_len:] = True
    return allowed


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
    ap.add_argument("--data", required=True, help="data.npz of training.train (its 'train' token stream)")
    ap.add_argument("--out", default=None, help="adapter folder (default: MODEL/linear_spec_lora)")
    ap.add_argument("--sequences", type=int, default=1500)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=80)
    ap.add_argument("--prefix-len", type=int, default=40)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--max-steps", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    stream = np.load(args.data)["train"]
    t0 = time.time()
    seqs = distillation_sequences(args.model, stream, args.sequences, args.prompt_len, args.new_tokens, args.seed)
    print(f"{len(seqs)} distillation sequences in {time.time() - t0:.0f} s", flush=True)
    model = load_model(args.model, progress=False).float()
    for p in model.parameters():
        p.requires_grad_(False)
    lora = attach_lora(model, args.rank, args.alpha)
    opt = torch.optim.AdamW(lora, lr=args.lr, weight_decay=0.0)
    mask_id = model.config.mask_token_id
    total = args.prefix_len + args.block
    allowed = draft_mask(args.prefix_len, args.block)
    positions = torch.arange(total)
    lora_rows = torch.zeros(total, dtype=torch.bool)
    lora_rows[args.prefix_len :] = True
    weights = 1.0 / torch.arange(1, args.block, dtype=torch.float32)  # early draft positions matter most
    weights = weights / weights.sum()
    deadline = time.time() + args.minutes * 60
    step = 0
    model.train()
    while time.time() < deadline and (not args.max_steps or step < args.max_steps):
        x, y = draft_batch(seqs, args.batch_size, args.prefix_len, args.block, mask_id, rng)
        hidden = model(x, positions.expand_as(x), DenseAttention(allowed), lora_rows.expand_as(x))
        logits = model.compute_logits(hidden[:, args.prefix_len + 1 :])  # rows predicting draft tokens
        logits[..., mask_id] = float("-inf")
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
        loss = (ce.view(y.shape) * weights).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 20 == 0:
            print(json.dumps({"step": step, "loss": round(loss.item(), 4), "elapsed_s": round(time.time() - t0)}), flush=True)
    out = Path(args.out) if args.out else Path(args.model) / "linear_spec_lora"
    save_adapter(model, out, args.rank, args.alpha)
    print(f"adapter written to {out} after {step} steps", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
