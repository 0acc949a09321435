"""The engine with a vision-language model: images in the prompt prefix, every mode.

* AR greedy through the engine (paged cache, chunked prefill under a small token budget)
  equals transformers' ``Mistral3ForConditionalGeneration.generate``.
* self_spec at temperature 0 equals AR greedy with images in the prompt; diffusion runs.
* Mixed batches of image and text requests in all modes equal the same requests run alone.
* Chunked prefill never ends a chunk inside an image; the prefix cache is keyed by image
  content (the same image twice is not re-encoded; another image never hits past its start).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from server.engine.images import clamp_chunk, locate_images
from server.engine.work import PREFILL
from server.model.image_processing import ImageProcessorConfig, preprocess
from tests.engine.helpers import make_engine, model_for, to_params
from tests.fixtures.vlm import IMAGE_TOKEN_ID, image_prompt, sample_images, vlm_models

LONGEST = 112
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """(transformers model, ours in the Mistral-3 layout (AR only), ours in the NLD layout)."""
    return vlm_models(tmp_path_factory.mktemp("vlm-engine"), seed=5, longest_edge=LONGEST)


def _prepared(names: list[str]):
    cfg = ImageProcessorConfig(longest_edge=LONGEST, token_pixels=28)
    images = sample_images()
    return [preprocess(images[n], cfg) for n in names]


def _spec(mode: str, **kw) -> dict:
    return dict(mode=mode, max_tokens=MAX_TOKENS, ignore_eos=True, **kw)


def _run(engine, requests):
    """requests: (id, prompt, params, images) -> {id: token ids}; checks the pool afterwards."""
    for rid, prompt, params, images in requests:
        engine.add_request(rid, prompt, params, images)
    out = {rid: [] for rid, *_ in requests}
    while engine.has_work:
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    engine.check_integrity()
    assert engine.kv.num_free_pages == engine.kv.num_pages
    return out


def _chunk_spy(engine):
    """Record (request, start, length, kind) of every work the runner gets."""
    seen = []
    run = engine.runner.run

    def spy(batch):
        seen.extend((req, req.num_computed, len(work), work.kind) for req, work in batch)
        return run(batch)

    engine.runner.run = spy
    return seen


def test_ar_greedy_equals_transformers_generate(vlm):
    hf, ours, _ = vlm
    from transformers import PixtralImageProcessorPil

    names = ["large", "portrait_rgb"]
    prepared = _prepared(names)
    prompt = image_prompt(prepared)
    proc = PixtralImageProcessorPil(patch_size={"height": 28, "width": 28}, size={"longest_edge": LONGEST})
    batch = proc([sample_images()[n] for n in names], return_tensors="pt")
    with torch.no_grad():
        want = hf.generate(
            input_ids=torch.tensor([prompt]), pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"],
            max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
        )[0, len(prompt) :].tolist()
    # budget 16: the large image spans 15 tokens, so an unclamped chunk would cut it
    engine = make_engine(ours, max_num_batched_tokens=16)
    seen = _chunk_spy(engine)
    got = _run(engine, [("a", prompt, to_params(_spec("ar")), prepared)])["a"]
    assert got == want
    spans = locate_images(prompt, prepared, IMAGE_TOKEN_ID)
    prefills = [(s, n) for _, s, n, kind in seen if kind is PREFILL]
    assert len(prefills) >= 3
    for start, n in prefills:
        assert all(not (sp.start < start + n < sp.end) for sp in spans), (start, n)
    assert engine.runner.vision.images_encoded == 2


@pytest.mark.parametrize("names", [["small_rgb"], ["portrait_rgb", "large"]])
def test_self_spec_greedy_equals_ar_with_images(vlm, names):
    _, _, ours = vlm
    prepared = _prepared(names)
    prompt = image_prompt(prepared)
    ar = _run(make_engine(ours), [("a", prompt, to_params(_spec("ar")), prepared)])["a"]
    for block in (2, 4, 8):
        got = _run(make_engine(ours), [("s", prompt, to_params(_spec("self_spec", block_length=block)), prepared)])["s"]
        assert got == ar, block


def test_mixed_batches_equal_alone_in_all_modes(vlm):
    _, _, ours = vlm
    image_sets = [_prepared(["small_rgb"]), _prepared(["portrait_rgb", "large"]), [], _prepared(["grey"])]
    prompts = [image_prompt(p) if p else [1, 7, 8, 9, 40, 41, 42] for p in image_sets]
    specs = {
        "ar": _spec("ar"),
        "diffusion": _spec("diffusion", block_length=4, refine_steps=2),
        "self_spec": _spec("self_spec", block_length=4),
    }
    requests = [
        (f"{mode}-{i}", prompt, to_params(spec), images)
        for (mode, spec), (i, (prompt, images)) in itertools.product(specs.items(), enumerate(zip(prompts, image_sets)))
    ]
    alone = {}
    for req in requests:
        alone.update(_run(make_engine(ours), [req]))
    for rid, tokens in alone.items():
        assert len(tokens) == MAX_TOKENS, rid  # every mode ran to max_tokens
    engine = make_engine(ours, max_num_batched_tokens=32, page_size=4)
    mixed = _run(engine, requests)
    assert mixed == alone
    # diffusion really used the images: another image changes its output
    other = image_prompt(_prepared(["rgba"]))
    assert other == prompts[0]
    changed = _run(make_engine(ours), [("x", other, to_params(specs["diffusion"]), _prepared(["rgba"]))])["x"]
    assert changed != alone["diffusion-0"]


def test_lookahead_diffusion_with_images_prefills_plainly(vlm):
    """With ``lookahead``, a prompt with images is prefilled without a proposed canvas (its
    image rows stay in plain prefill chunks); the commits after it still propose the next
    block, and the output equals the same request's in a batch with an image-free one."""
    _, _, ours = vlm
    prepared = _prepared(["small_rgb"])
    spec = to_params(_spec("diffusion", block_length=4, refine_steps=2, lookahead=True))
    engine = make_engine(ours)
    seen = _chunk_spy(engine)
    alone = _run(engine, [("img", image_prompt(prepared), spec, prepared)])["img"]
    kinds = {kind.name for _, _, _, kind in seen}
    assert "prefill" in kinds and "commit_lookahead" in kinds and "prefill_lookahead" not in kinds
    both = _run(make_engine(ours), [("img", image_prompt(prepared), spec, prepared), ("txt", [1, 7, 8, 9, 40], spec, None)])
    assert both["img"] == alone and len(alone) == MAX_TOKENS


def test_prefix_cache_is_keyed_by_image_content(vlm):
    _, _, ours = vlm
    a, b = _prepared(["small_rgb"]), _prepared(["rgba"])  # same grid, different pixels
    prompt = image_prompt(a, prefix=(1,) * 9)
    assert image_prompt(b, prefix=(1,) * 9) == prompt
    engine = make_engine(ours, page_size=4)
    first = _run(engine, [("a1", prompt, to_params(_spec("ar")), a)])
    reqs = {}
    for rid, images in (("a2", a), ("b1", b)):
        reqs[rid] = engine.add_request(rid, prompt, to_params(_spec("ar")), images)
        before = engine.runner.vision.images_encoded
        assert len(_run(engine, [])[rid]) == MAX_TOKENS
        encoded = engine.runner.vision.images_encoded - before
        span = locate_images(prompt, images, IMAGE_TOKEN_ID)[0]
        cached = reqs[rid].stats.cached_prompt_tokens
        if rid == "a2":  # the whole image is in cached pages: no encoding
            assert cached >= span.end and encoded == 0
        else:  # another image: the cache stops at the page holding its first pad
            assert cached <= span.start and encoded == 1
    assert first["a1"]


def test_clamp_chunk():
    prepared = _prepared(["large"])  # 4 x 3 grid: 15-token span
    prompt = image_prompt(prepared)
    spans = locate_images(prompt, prepared, IMAGE_TOKEN_ID)
    s, e = spans[0].start, spans[0].end
    assert (s, e) == (3, 18)
    assert clamp_chunk(spans, 0, 10) == 3  # would end inside: stop before the image
    assert clamp_chunk(spans, 0, 18) == 18 and clamp_chunk(spans, 0, 30) == 30
    assert clamp_chunk(spans, 3, 14) == 0  # cannot take the image whole: wait for budget
    assert clamp_chunk(spans, 8, 10) == 10  # started inside (cache hit), ends at the span end


def test_requests_with_images_are_validated(vlm):
    _, _, ours = vlm
    prepared = _prepared(["large"])
    prompt = image_prompt(prepared)
    engine = make_engine(ours)
    with pytest.raises(ValueError, match="placeholder tokens"):
        engine.add_request("x", prompt, to_params(_spec("ar")), [])
    with pytest.raises(ValueError, match="placeholder tokens"):
        engine.add_request("y", prompt, to_params(_spec("ar")), prepared * 2)
    with pytest.raises(ValueError, match="per-step token budget"):
        make_engine(ours, max_num_batched_tokens=8).add_request("z", prompt, to_params(_spec("ar")), prepared)
    with pytest.raises(ValueError, match="does not accept images"):
        make_engine(model_for(0)).add_request("t", [1, 2, 3], to_params(_spec("ar")), prepared)
    assert not engine.has_work


def test_preemption_recomputes_images(vlm):
    """A pool too small for all requests at once: preempted requests re-prefill their images."""
    _, _, ours = vlm
    prepared = _prepared(["portrait_rgb", "large"])
    prompt = image_prompt(prepared)
    alone = _run(make_engine(ours), [("a", prompt, to_params(_spec("ar")), prepared)])["a"]
    engine = make_engine(ours, kv_cache_tokens=80, max_model_len=48, page_size=4, enable_prefix_caching=False)
    reqs = [(f"r{i}", prompt, to_params(_spec("ar")), prepared) for i in range(4)]
    out = _run(engine, reqs)
    assert engine.scheduler.num_preemptions > 0
    assert all(tokens == alone for tokens in out.values())


@pytest.mark.parametrize("clear_encoder_cache", [False, True])
def test_prefix_hit_inside_an_image(vlm, clear_encoder_cache):
    """Same image, different text right after it: the cache hit ends inside the image's span,
    the next chunk starts there and takes the tail of the image's features (from the encoder
    LRU, or encoded again when it was evicted); the output equals a cold run."""
    _, _, ours = vlm
    prepared = _prepared(["large"])
    tokens_a = image_prompt(prepared, suffix=())[:-2] + [50, 51, 52]
    tokens_b = image_prompt(prepared, suffix=())[:-2] + [60, 61, 62]
    span = locate_images(tokens_b, prepared, IMAGE_TOKEN_ID)[0]
    cold = _run(make_engine(ours, page_size=4), [("b", tokens_b, to_params(_spec("ar")), prepared)])["b"]
    engine = make_engine(ours, page_size=4)
    _run(engine, [("a", tokens_a, to_params(_spec("ar")), prepared)])
    if clear_encoder_cache:
        engine.runner.vision.cache.clear()
    before = engine.runner.vision.images_encoded
    req = engine.add_request("b", tokens_b, to_params(_spec("ar")), prepared)
    assert _run(engine, [])["b"] == cold
    assert span.start < req.stats.cached_prompt_tokens < span.end
    assert engine.runner.vision.images_encoded - before == (1 if clear_encoder_cache else 0)
