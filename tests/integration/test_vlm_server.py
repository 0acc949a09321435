"""The live server with a vision-language checkpoint, driven by the official ``openai`` client.

Covered: an image request in each mode, streaming and not (greedy: both give the same text,
which depends on the image); PNG, JPEG and WebP data URLs; the same image sent twice hits
the prefix cache and is not re-encoded; bad images (truncated, not an image, too large, too
many, an http URL, bad base64, a non-image MIME type) get 400s in the OpenAI error shape
naming the part, and the server keeps serving with every KV page back; http(s) URLs are
fetched only when allowed; the bench image workload; a text-only model
answers an image part with a 400 naming the field.
"""

from __future__ import annotations

import base64
import io
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import openai
import pytest

from server.api.images import ImageLimits
from tests.integration.conftest import SERVED_NAME, Stack, wait_until
from tests.integration.vlm_checkpoint import write_vlm_checkpoint

MODE_FIELDS: dict[str, dict[str, Any]] = {
    "ar": {"mode": "ar"},
    "diffusion": {"mode": "diffusion", "refine_steps": 4, "block_length": 4},
    "self_spec": {"mode": "self_spec", "block_length": 4},
}
MAX_TOKENS = 6


def _image_bytes(seed: int = 0, size: tuple[int, int] = (40, 60), fmt: str = "PNG") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_messages(*urls: str, text: str = "Describe the image.") -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def vlm_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    d = write_vlm_checkpoint(tmp_path_factory.mktemp("vlm-server") / "tiny-vlm")
    s = Stack(d, SERVED_NAME).start(page_size=4)
    try:
        yield s
    finally:
        s.stop()


def _client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _chat(stack: Stack, messages: list, stream: bool, fields: dict[str, Any]) -> tuple[str, str | None, Any]:
    with _client(stack) as client:
        if not stream:
            r = client.chat.completions.create(
                model=SERVED_NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0, extra_body=fields  # type: ignore[arg-type]
            )
            return r.choices[0].message.content or "", r.choices[0].finish_reason, r.usage
        chunks = list(client.chat.completions.create(
            model=SERVED_NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True}, extra_body=fields,
        ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1
    return text, finish[0], chunks[-1].usage


def _all_pages_free(stack: Stack) -> bool:
    return stack.engine.kv.num_free_pages == stack.engine.kv.num_pages and not stack.engine.has_work


@pytest.mark.parametrize("mode", list(MODE_FIELDS))
def test_image_request_in_each_mode(vlm_stack, mode):
    fields = MODE_FIELDS[mode]
    msgs = image_messages(data_url(_image_bytes(1)))
    text, finish, usage = _chat(vlm_stack, msgs, stream=False, fields=fields)
    s_text, s_finish, s_usage = _chat(vlm_stack, msgs, stream=True, fields=fields)
    assert text and finish == "length" and usage.completion_tokens == MAX_TOKENS
    assert (s_text, s_finish) == (text, finish)
    # 40 x 60 px -> a 2 x 3 token grid: 6 pads, 1 break, 1 end in the prompt
    text_only, _, text_usage = _chat(vlm_stack, [{"role": "user", "content": "Describe the image.\n"}], False, fields)
    assert usage.prompt_tokens - text_usage.prompt_tokens >= 8
    assert s_usage.prompt_tokens == usage.prompt_tokens
    assert wait_until(lambda: _all_pages_free(vlm_stack), 10)


def test_output_depends_on_the_image_and_formats(vlm_stack):
    outs = {}
    for fmt, mime in (("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")):
        outs[fmt] = _chat(vlm_stack, image_messages(data_url(_image_bytes(2, fmt=fmt), mime)), False, MODE_FIELDS["ar"])[0]
    other = _chat(vlm_stack, image_messages(data_url(_image_bytes(3))), False, MODE_FIELDS["ar"])[0]
    two = _chat(vlm_stack, image_messages(data_url(_image_bytes(2)), data_url(_image_bytes(3, size=(90, 30)))), False,
                MODE_FIELDS["ar"])[0]
    assert all(outs.values()) and other and two
    assert len({outs["PNG"], other, two}) == 3  # lossy JPEG/WebP may or may not change the greedy text


def test_same_image_twice_hits_the_prefix_cache(vlm_stack):
    vision = vlm_stack.engine.runner.vision
    msgs = image_messages(data_url(_image_bytes(7, size=(100, 100))), text="A long enough text prefix before the image.")
    before = vision.images_encoded
    first = _chat(vlm_stack, msgs, False, MODE_FIELDS["ar"])[0]
    assert vision.images_encoded == before + 1
    second = _chat(vlm_stack, msgs, False, MODE_FIELDS["self_spec"])[0]
    assert vision.images_encoded == before + 1  # the image's pages were cached: not encoded again
    assert first == second  # self_spec at temperature 0 is AR greedy


BAD_PARTS = {
    "truncated": (data_url(_image_bytes(4)[:60]), "invalid_image"),
    "not_an_image": (data_url(b"hello, this is plain text and not an image at all"), "invalid_image"),
    "bad_base64": ("data:image/png;base64,@@@not-base64@@@", "invalid_image"),
    "text_mime": ("data:text/plain;base64," + base64.b64encode(b"hi").decode(), "invalid_image_format"),
    "http_url": ("https://example.com/cat.png", "image_url_not_allowed"),
    "file_url": ("file:///etc/passwd", "invalid_image_url"),
    "gif": (data_url(_image_bytes(5, fmt="GIF"), "image/png"), "invalid_image"),
}


@pytest.mark.parametrize("case", sorted(BAD_PARTS))
def test_bad_images_get_400(vlm_stack, case):
    url, code = BAD_PARTS[case]
    with _client(vlm_stack) as client:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model=SERVED_NAME, messages=image_messages(data_url(_image_bytes(6)), url), max_tokens=4  # type: ignore[arg-type]
            )
    err = info.value.body
    assert info.value.status_code == 400 and err["type"] == "invalid_request_error"
    assert err["code"] == code and err["param"].startswith("messages[0].content[2]"), err
    assert wait_until(lambda: _all_pages_free(vlm_stack), 10)


def test_limits_get_400(vlm_stack):
    app = vlm_stack.app
    original = app.state.settings
    try:
        for limits, code, images in (
            (ImageLimits(max_images=2), "too_many_images", [_image_bytes(i) for i in range(3)]),
            (ImageLimits(max_bytes=len(_image_bytes(0)) + 10), "image_too_large", [_image_bytes(0), _image_bytes(1)]),
            (ImageLimits(max_pixels=3000), "image_too_large", [_image_bytes(0), _image_bytes(1)]),  # 2400 px each
        ):
            app.state.settings = replace(original, image_limits=limits)
            with _client(vlm_stack) as client, pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(
                    model=SERVED_NAME, messages=image_messages(*map(data_url, images)), max_tokens=4  # type: ignore[arg-type]
                )
            assert info.value.body["code"] == code, info.value.body
            assert info.value.body["param"] == ("messages[0].content[3]" if len(images) == 3 else "messages[0].content[2]")
    finally:
        app.state.settings = original
    # still serving
    text, finish, _ = _chat(vlm_stack, image_messages(data_url(_image_bytes(0))), False, MODE_FIELDS["diffusion"])
    assert text and finish == "length"
    assert wait_until(lambda: _all_pages_free(vlm_stack), 10)


def test_text_only_model_refuses_image_parts(tiny_checkpoint: Path):
    stack = Stack(tiny_checkpoint, SERVED_NAME).start()
    try:
        with _client(stack) as client, pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model=SERVED_NAME, messages=image_messages(data_url(_image_bytes(0))), max_tokens=4  # type: ignore[arg-type]
            )
        body = info.value.body
        assert body["param"] == "messages[0].content[1]" and body["code"] == "images_not_supported"
        assert "image" in body["message"]
    finally:
        stack.stop()


def test_image_token_text_in_a_message_is_refused(vlm_stack):
    with _client(vlm_stack) as client, pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=SERVED_NAME, messages=image_messages(data_url(_image_bytes(0)), text="sneaky [IMG] token"),  # type: ignore[arg-type]
            max_tokens=4,
        )
    assert info.value.body["param"] == "messages" and "image token" in info.value.body["message"]
    # a token-id prompt with image placeholders but no images is refused by the engine
    pad = vlm_stack.engine.image_inputs.tokens.pad
    with _client(vlm_stack) as client, pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=SERVED_NAME, prompt=[5, pad, 6], max_tokens=4)
    assert "placeholder" in info.value.body["message"]
    assert wait_until(lambda: _all_pages_free(vlm_stack), 10)


@pytest.mark.parametrize("same", [True, False], ids=["same-image", "distinct-images"])
def test_bench_image_workload(vlm_stack, tmp_path, same):
    import json
    import os
    import subprocess
    import sys

    from tests.integration.conftest import ROOT, SUBPROCESS_ENV

    out = tmp_path / "bench"
    argv = [sys.executable, "-m", "server", "bench", "--base-url", vlm_stack.url, "--modes", "ar,self_spec",
            "--num-prompts", "3", "--max-tokens", "4", "--images", "1", "--image-size", "84x56",
            "--max-concurrency", "1", "--out", str(out), "--no-progress", "--no-plots", "--quality", "off"]
    argv += ["--same-image"] if same else ["--seed", "1"]  # seed 1: images no earlier test sent
    env = {**os.environ, **SUBPROCESS_ENV, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(argv, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["images_per_request"] == 1
    runs = {r["label"]: r for r in result["runs"]}
    first, second = runs["ar"], runs["self_spec"]
    assert first["summary"]["completed"] == 3 and second["summary"]["completed"] == 3
    # one image sent by every request: encoded at most once; distinct images: once each in the
    # first run, never in the second (same prompts: their image pages are in the prefix cache)
    encoded = [(r["vision"] or {}).get("images_encoded", 0) for r in (first, second)]
    if same:
        assert sum(encoded) <= 1  # at most once (0 when an earlier test already encoded it)
    else:
        assert encoded[0] == 3 and encoded[1] == 0  # the second run's prompts are all in the prefix cache
        assert first["vision"]["ms_per_image"] > 0


def test_http_image_urls_are_fetched_only_when_allowed(vlm_stack, tmp_path):
    import functools
    import http.server
    import threading

    (tmp_path / "img.png").write_bytes(_image_bytes(8))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/img.png"
    app, original = vlm_stack.app, vlm_stack.app.state.settings
    try:
        inline = _chat(vlm_stack, image_messages(data_url(_image_bytes(8))), False, MODE_FIELDS["ar"])[0]
        with _client(vlm_stack) as client, pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=SERVED_NAME, messages=image_messages(url), max_tokens=4)  # type: ignore[arg-type]
        assert info.value.body["code"] == "image_url_not_allowed"
        app.state.settings = replace(original, image_limits=ImageLimits(allow_urls=True))
        assert _chat(vlm_stack, image_messages(url), False, MODE_FIELDS["ar"])[0] == inline
        with _client(vlm_stack) as client, pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=SERVED_NAME, messages=image_messages(url + ".missing"), max_tokens=4)  # type: ignore[arg-type]
        assert info.value.body["code"] == "image_fetch_failed"
    finally:
        app.state.settings = original
        httpd.shutdown()
        httpd.server_close()
