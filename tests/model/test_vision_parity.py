"""The vision-language model against transformers (fp32, CPU).

* Preprocessing equals transformers' Pixtral image processor (PIL backend): pixel values,
  resized sizes, and the placeholder count ``(W' + 1) * H'`` of ``PixtralProcessor``.
* A random tiny ``Mistral3ForConditionalGeneration`` saved by ``save_pretrained`` and the same
  weights in the NLD VLM layout load into our ``DecoderModel`` (+ ``VisionEncoder``) and give
  transformers' logits within 1e-4 for prompts with 0, 1 and 2 images of different sizes.
* Greedy decoding with our model equals transformers' ``generate``.
"""

from __future__ import annotations

import json

import pytest
import torch

from server.model.image_processing import ImageProcessorConfig, ImageTokens, PreparedImage, preprocess, resized_size
from server.model.loader import load_model
from server.model.model import DecoderModel, DenseAttention, ImageFeatures
from tests.fixtures.hf_reference import block_diagonal, causal_mask
from tests.fixtures.vlm import (
    IMAGE_BREAK_ID,
    IMAGE_END_ID,
    IMAGE_TOKEN_ID,
    sample_images,
    vlm_models,
)

ATOL = 1e-4
LONGEST = 112
TOKENS = ImageTokens(IMAGE_TOKEN_ID, IMAGE_BREAK_ID, IMAGE_END_ID)


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """(transformers model, ours from the Mistral-3 layout, ours from the NLD VLM layout)."""
    return vlm_models(tmp_path_factory.mktemp("vlm"), seed=3, longest_edge=LONGEST)


@pytest.fixture(scope="module")
def hf_processor():
    from transformers import PixtralImageProcessorPil

    return PixtralImageProcessorPil(patch_size={"height": 28, "width": 28}, size={"longest_edge": LONGEST})


def _prepare(model: DecoderModel, names: list[str]) -> list[PreparedImage]:
    cfg = ImageProcessorConfig.for_model(model.config.vision)
    images = sample_images()
    return [preprocess(images[n], cfg) for n in names]


def _prompt(prepared: list[PreparedImage]) -> torch.Tensor:
    ids = [1, 5, 6]
    for i, p in enumerate(prepared):
        ids += TOKENS.placeholder_ids(p.grid) + [20 + i, 21 + i]
    return torch.tensor(ids + [30, 31, 32])


def _features(model: DecoderModel, ids: torch.Tensor, prepared: list[PreparedImage]) -> ImageFeatures | None:
    if not prepared:
        return None
    feats = model.vision([p.pixel_values for p in prepared])
    return ImageFeatures((ids == IMAGE_TOKEN_ID).nonzero()[:, 0], torch.cat(feats))


@torch.no_grad()
def _ours(model: DecoderModel, ids: torch.Tensor, prepared: list[PreparedImage]) -> torch.Tensor:
    hidden = model(ids, torch.arange(len(ids)), DenseAttention(causal_mask(len(ids))), image_features=_features(model, ids, prepared))
    return model.compute_logits(hidden)


@torch.no_grad()
def _theirs(hf, processor, ids: torch.Tensor, names: list[str]) -> torch.Tensor:
    kwargs = {}
    if names:
        images = sample_images()
        batch = processor([images[n] for n in names], return_tensors="pt")
        kwargs = {"pixel_values": batch["pixel_values"], "image_sizes": batch["image_sizes"]}
    return hf(input_ids=ids[None], **kwargs).logits[0].float()


# ------------------------------------------------------------------------------ preprocessing


@pytest.mark.parametrize("name", sorted(sample_images()))
def test_preprocessing_matches_pixtral_processor(hf_processor, name):
    image = sample_images()[name]
    cfg = ImageProcessorConfig(longest_edge=LONGEST, token_pixels=28)
    ours = preprocess(image, cfg)
    theirs = hf_processor(image, return_tensors="pt")
    h, w = theirs["image_sizes"][0].tolist()
    assert ours.pixel_values.shape == theirs["pixel_values"][0].shape == (3, h, w)
    assert torch.allclose(ours.pixel_values, theirs["pixel_values"][0], atol=1e-6)
    assert ours.grid == (h // 28, w // 28)
    # PixtralProcessor's count: a row of W' image tokens plus one break/end token, H' times
    layout = TOKENS.placeholder_ids(ours.grid)
    assert len(layout) == (w // 28 + 1) * (h // 28)
    assert layout.count(IMAGE_TOKEN_ID) == ours.num_features
    assert layout[-1] == IMAGE_END_ID and layout.count(IMAGE_BREAK_ID) == h // 28 - 1


def test_resize_caps_longest_side_and_rounds_up():
    cfg = ImageProcessorConfig(longest_edge=1540, token_pixels=28)
    assert resized_size(3000, 1000, cfg) == (1540, 532)  # 1000/1.948 = 513.3 -> 513 -> 19 tokens
    assert resized_size(29, 28, cfg) == (56, 28)
    assert resized_size(1540, 1540, cfg) == (1540, 1540)  # 55 x 55 tokens


def test_start_token_layout():
    tokens = ImageTokens(pad=10, row_break=12, end=13, start=14)
    assert tokens.placeholder_ids((2, 3)) == [14, 10, 10, 10, 12, 10, 10, 10, 13]


def test_digest_keys_pixels():
    images = sample_images()
    cfg = ImageProcessorConfig(longest_edge=LONGEST, token_pixels=28)
    a, b = preprocess(images["small_rgb"], cfg), preprocess(images["small_rgb"].copy(), cfg)
    assert a.digest == b.digest and a.digest != preprocess(images["grey"], cfg).digest


# ------------------------------------------------------------------------------ logits parity


@pytest.mark.parametrize("names", [[], ["small_rgb"], ["portrait_rgb", "large"]], ids=["0img", "1img", "2img"])
@pytest.mark.parametrize("layout", ["mistral3", "nld"])
def test_logits_match_mistral3(vlm, hf_processor, names, layout):
    hf, ours_m3, ours_nld = vlm
    ours = ours_m3 if layout == "mistral3" else ours_nld
    prepared = _prepare(ours, names)
    ids = _prompt(prepared)
    got, want = _ours(ours, ids, prepared), _theirs(hf, hf_processor, ids, names)
    assert want.abs().max() > 1.0
    assert (got - want).abs().max().item() <= ATOL


def test_image_content_changes_logits(vlm):
    """The features are really placed: another image of the same grid changes the logits after it."""
    _, ours, _ = vlm
    a, b = _prepare(ours, ["small_rgb"]), _prepare(ours, ["rgba"])
    assert a[0].grid == b[0].grid
    ids = _prompt(a)
    first_pad = int((ids == IMAGE_TOKEN_ID).nonzero()[0, 0])
    la, lb = _ours(ours, ids, a), _ours(ours, ids, b)
    assert torch.equal(la[:first_pad], lb[:first_pad])
    assert (la[first_pad:] - lb[first_pad:]).abs().max() > 1e-2


def test_packed_batch_with_images_matches_separate(vlm):
    """Two prompts with images packed into one flat list (block-diagonal attention, features of
    both in one encoder call) give the same logits as separate runs."""
    _, ours, _ = vlm
    pa, pb = _prepare(ours, ["large"]), _prepare(ours, ["small_rgb", "grey"])
    ia, ib = _prompt(pa), _prompt(pb)
    ids = torch.cat([ia, ib])
    pos = torch.cat([torch.arange(len(ia)), torch.arange(len(ib)) + 50])
    feats = _features(ours, ids, pa + pb)
    with torch.no_grad():
        packed = ours.compute_logits(
            ours(ids, pos, DenseAttention(block_diagonal(causal_mask(len(ia)), causal_mask(len(ib)))), image_features=feats)
        )
        b_alone = ours.compute_logits(
            ours(ib, torch.arange(len(ib)) + 50, DenseAttention(causal_mask(len(ib))), image_features=_features(ours, ib, pb))
        )
    assert (packed[: len(ia)] - _ours(ours, ia, pa)).abs().max().item() <= 1e-5
    assert (packed[len(ia) :] - b_alone).abs().max().item() <= 1e-5


def test_greedy_matches_transformers_generate(vlm, hf_processor):
    hf, ours, _ = vlm
    names = ["portrait_rgb", "small_rgb"]
    prepared = _prepare(ours, names)
    ids = _prompt(prepared)
    images = sample_images()
    batch = hf_processor([images[n] for n in names], return_tensors="pt")
    with torch.no_grad():
        want = hf.generate(
            input_ids=ids[None], pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"],
            max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0,
        )[0, len(ids) :].tolist()
    seq = ids.clone()
    for _ in range(10):
        seq = torch.cat([seq, _ours(ours, seq, prepared)[-1].argmax().view(1)])
    assert seq[len(ids) :].tolist() == want


def test_vision_tensors_are_required(tmp_path, vlm):
    from safetensors.torch import load_file, save_file

    hf, _, _ = vlm
    d = tmp_path / "m3"
    hf.save_pretrained(str(d))
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["multi_modal_projector.linear_1.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match="missing tensors: multi_modal_projector.linear_1.weight"):
        load_model(d, progress=False)


def test_vlm_config_reads_text_config(vlm, tmp_path):
    _, ours_m3, ours_nld = vlm
    assert not ours_m3.config.is_diffusion and ours_nld.config.is_diffusion
    assert ours_m3.config.vocab_size == 320 and ours_m3.config.hidden_size == 64
    assert ours_m3.config.rope.llama_4_scaling_beta == 0.1
    assert ours_nld.config.mask_token_id == 300 and ours_nld.config.block_size == 8
    assert ours_nld.config.vision.image_break_token_id == IMAGE_BREAK_ID
    assert ours_m3.config.vision.image_token_id == IMAGE_TOKEN_ID
    # the image token id comes from config.json, whatever its value
    cfg = json.loads(json.dumps(ours_m3.config.raw))
    cfg["image_token_index"] = 77
    from server.model.config import ModelConfig

    assert ModelConfig.from_dict(cfg).vision.image_token_id == 77
