"""How the GPU presets' KV pool and batch sizes were computed (run it to print the table).

Memory of one replica on one GPU, bf16 weights and KV cache:

    weights   = 2 B x params, params = 2 x vocab x hidden            (embeddings + untied head)
                + layers x (2 x hidden x heads x head_dim            (q, o)
                            + 2 x hidden x kv_heads x head_dim        (k, v)
                            + 3 x hidden x intermediate)              (gate, up, down)
    KV/token  = 2 (K and V) x layers x kv_heads x head_dim x 2 B
    workspace = max_num_batched_tokens x vocab x 4 B x 2              (fp32 logits + probabilities)
                + FIXED_OVERHEAD                                      (CUDA context, graphs, allocator slack,
                                                                       the self_spec draft LoRA copy)
    KV pool   = GPU memory x utilization - weights - workspace, in tokens, rounded down to POOL_ROUND

Shapes are those of docs (/work/shared/docs/nemotron-labs-diffusion.md, section 1.1): 3B and
8B read from their config.json; 14B assumed equal to Ministral-3-14B's (hidden 5120, 40 layers,
32/8 heads, head_dim 128, intermediate 16384): check the checkpoint's config.json.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1 << 30
FIXED_OVERHEAD = 3 * GIB
UTILIZATION = 0.90
POOL_ROUND = 16384  # tokens; a multiple of every page size we use
# the largest max_num_batched_tokens of any overlay (throughput.yaml): the pool is sized so
# that every model preset still fits when combined with any overlay
WORKSPACE_BATCHED_TOKENS = 4096
GPUS = {"H100 80GB": 80 * GIB, "H200 141GB": 141 * GIB}


@dataclass(frozen=True)
class Shapes:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int = 131072

    @property
    def params(self) -> int:
        per_layer = (2 * self.hidden * self.heads * self.head_dim + 2 * self.hidden * self.kv_heads * self.head_dim
                     + 3 * self.hidden * self.intermediate)
        return 2 * self.vocab * self.hidden + self.layers * per_layer

    @property
    def weight_bytes(self) -> int:
        return 2 * self.params

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2

    def workspace_bytes(self, max_num_batched_tokens: int) -> int:
        return max_num_batched_tokens * self.vocab * 4 * 2 + FIXED_OVERHEAD

    def total_bytes(self, kv_cache_tokens: int, max_num_batched_tokens: int) -> int:
        return self.weight_bytes + self.workspace_bytes(max_num_batched_tokens) + kv_cache_tokens * self.kv_bytes_per_token

    def kv_pool_tokens(self, gpu_bytes: int, max_num_batched_tokens: int = WORKSPACE_BATCHED_TOKENS) -> int:
        free = gpu_bytes * UTILIZATION - self.weight_bytes - self.workspace_bytes(max_num_batched_tokens)
        return int(free // self.kv_bytes_per_token) // POOL_ROUND * POOL_ROUND


MODELS = {
    "3b": Shapes(hidden=3072, layers=26, heads=32, kv_heads=8, head_dim=128, intermediate=9216),
    "8b": Shapes(hidden=4096, layers=34, heads=32, kv_heads=8, head_dim=128, intermediate=14336),
    "14b": Shapes(hidden=5120, layers=40, heads=32, kv_heads=8, head_dim=128, intermediate=16384),
}


def main() -> None:
    print(f"utilization {UTILIZATION}, workspace for {WORKSPACE_BATCHED_TOKENS} batched tokens")
    print(f"{'model':>5} {'params':>8} {'weights':>9} {'KV/token':>9} " + " ".join(f"{g:>16}" for g in GPUS))
    for name, s in MODELS.items():
        pools = " ".join(f"{s.kv_pool_tokens(b):>9} tokens" for b in GPUS.values())
        print(f"{name:>5} {s.params / 1e9:7.2f}B {s.weight_bytes / GIB:7.2f}GiB {s.kv_bytes_per_token // 1024:6d}KiB {pools}")


if __name__ == "__main__":
    main()
