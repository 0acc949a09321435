"""Vision encoding time per image size, and the prefix-cache hit of a repeated image.

    python benchmarks/vision_cpu.py [--sizes 224,448,896] [--threads 2] [--repeat 2] [--layers 24]

Part 1: the released vision tower's shapes (Pixtral: 24 layers, hidden 1024, 16 heads,
MLP 4096, 14 px patches, merge 2, projector to 4096) with random fp32 weights: our
``VisionEncoder`` against transformers' ``PixtralVisionModel`` + ``Mistral3MultiModalProjector``
on the same weights and pixels, per square image size (the baseline ratio is measured in the
same run). Part 2: the engine with that tower and a tiny decoder; the same image is sent
twice (one request after the other): prompt tokens served from the prefix cache, images
encoded and the time to the first token of each. Prints a markdown report. ``--layers``
runs fewer tower layers (the time is linear in it) where 24 would take too long.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

VISION = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "head_dim": 64, "patch_size": 14, "image_size": 1540, "hidden_act": "silu", "num_channels": 3,
    "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0},
}


def vlm_config(text_hidden: int, layers: int = 24) -> dict:
    from server.model.tiny import tiny_nld_config

    text = tiny_nld_config(hidden_size=text_hidden, head_dim=text_hidden // 4, vocab_size=320)
    return {
        "architectures": ["NemotronLabsDiffusionVLMModel"], "model_type": "nemotron_labs_diffusion_vlm",
        "text_config": text, "vision_config": {**VISION, "num_hidden_layers": layers}, "image_token_index": 10, "image_break_token_id": 12,
        "image_end_token_id": 13, "spatial_merge_size": 2, "projector_hidden_act": "gelu",
        "mask_token_id": 300, "block_size": 8, "eos_token_id": 2,
    }


def _time(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@torch.inference_mode()
def encode_times(sizes: list[int], repeat: int, layers: int) -> list[str]:
    from transformers import Mistral3Config, PixtralVisionConfig, PixtralVisionModel
    from transformers.models.mistral3.modeling_mistral3 import Mistral3MultiModalProjector

    from server.model.config import ModelConfig
    from server.model.vision import VisionEncoder

    cfg = vlm_config(4096, layers)
    ours = VisionEncoder(ModelConfig.from_dict(cfg).vision).eval()
    hf_cfg = Mistral3Config(vision_config=PixtralVisionConfig(**{**VISION, "num_hidden_layers": layers}),
                            text_config={"model_type": "ministral3", "hidden_size": 4096, "rms_norm_eps": 1e-5})
    hf_cfg.vision_config._attn_implementation = "sdpa"
    tower, projector = PixtralVisionModel(hf_cfg.vision_config).eval(), Mistral3MultiModalProjector(hf_cfg).eval()
    tower.load_state_dict({k[len("tower."):]: v for k, v in ours.state_dict().items() if k.startswith("tower.")})
    projector.load_state_dict({k[len("projector."):]: v for k, v in ours.state_dict().items() if k.startswith("projector.")})
    rows = ["| image (px) | tokens | ours (s) | transformers (s) | ratio | max abs diff |", "|---|---|---|---|---|---|"]
    for size in sizes:
        pixels = torch.randn(3, size, size)
        sizes_t = torch.tensor([[size, size]])
        got = ours([pixels])[0]
        want = projector(tower(pixels[None], image_sizes=sizes_t).last_hidden_state[0], sizes_t)
        t_ours = _time(lambda: ours([pixels]), repeat)
        t_hf = _time(lambda: projector(tower(pixels[None], image_sizes=sizes_t).last_hidden_state[0], sizes_t), repeat)
        rows.append(f"| {size}x{size} | {got.shape[0]} | {t_ours:.3f} | {t_hf:.3f} | {t_hf / t_ours:.2f} | "
                    f"{(got - want).abs().max().item():.1e} |")
        print(rows[-1], flush=True)
    return rows


def prefix_cache_hit(size: int, layers: int) -> list[str]:
    from server.config import EngineConfig
    from server.engine.engine import LLMEngine
    from server.engine.params import DecodeParams, RequestParams, SamplingParams
    from server.model.config import ModelConfig
    from server.model.image_processing import ImageProcessorConfig, ImageTokens, preprocess
    from server.model.model import DecoderModel
    from PIL import Image

    torch.manual_seed(0)
    model = DecoderModel(ModelConfig.from_dict(vlm_config(64, layers))).eval()
    engine = LLMEngine(model, EngineConfig(model="bench", device="cpu", page_size=16, kv_cache_tokens=16384,
                                           max_model_len=4096, max_num_batched_tokens=4096))
    image = Image.frombytes("RGB", (size, size), torch.randint(0, 256, (size * size * 3,), dtype=torch.uint8).numpy().tobytes())
    prepared = preprocess(image, ImageProcessorConfig(longest_edge=1540, token_pixels=28))
    prompt = [1] + list(range(40, 60)) + ImageTokens(10, 12, 13).placeholder_ids(prepared.grid) + list(range(60, 70))
    params = RequestParams(SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), DecodeParams(mode="ar"))
    rows = ["| request | prompt tokens | from prefix cache | images encoded | time to first token (s) |", "|---|---|---|---|---|"]
    for i in range(2):
        before = engine.runner.vision.images_encoded
        req = engine.add_request(f"r{i}", prompt, params, [prepared])
        t0 = time.perf_counter()
        first = None
        while engine.has_work:
            for out in engine.step():
                if out.new_token_ids and first is None:
                    first = time.perf_counter() - t0
        rows.append(f"| {i + 1} | {len(prompt)} | {req.stats.cached_prompt_tokens} | "
                    f"{engine.runner.vision.images_encoded - before} | {first:.3f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="224,448,896")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--cache-image-size", type=int, default=448)
    p.add_argument("--layers", type=int, default=24, help="vision tower layers (released: 24)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    report = [f"## Vision encoder, fp32, {args.threads} threads, {args.layers} of 24 layers (released shapes, random weights)", ""]
    report += encode_times([int(s) for s in args.sizes.split(",")], args.repeat, args.layers)
    report += ["", f"## Same {args.cache_image_size}px image sent twice (tiny decoder, page size 16)", ""]
    report += prefix_cache_hit(args.cache_image_size, args.layers)
    print("\n".join(report))


if __name__ == "__main__":
    main()
