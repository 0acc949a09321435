"""Image content parts at the API layer (fake engine, no model): the schema accepts them, a
text-only model refuses them with a 400 naming the part, malformed parts are 400s; and the
data-URL / placeholder helpers of ``server/api/images.py``."""

from __future__ import annotations

import base64

import pytest

from server.api.errors import APIError
from server.api.images import ImageLimits, ImagePart, _read_bytes, chat_prompt_with_images
from server.api.protocol import ChatCompletionRequest
from server.model.image_processing import ImageInputs, ImageProcessorConfig, ImageTokens, PreparedImage
from tests.api.test_api_errors import error_of, post

PNG_URL = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nnot really").decode()


def _chat(*parts):  # type: ignore[no-untyped-def]
    return {"model": "fake-nld", "messages": [{"role": "user", "content": list(parts)}], "max_tokens": 2}


def test_text_only_model_refuses_image_parts(server):  # type: ignore[no-untyped-def]
    body = _chat({"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": PNG_URL}})
    err = error_of(post(server, "/v1/chat/completions", body), 400)
    assert err["param"] == "messages[0].content[1]" and err["code"] == "images_not_supported"


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {}},
        {"type": "image_url", "image_url": {"url": 5}},
        {"type": "image_url"},
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
    ],
)
def test_malformed_parts_are_400(server, part):  # type: ignore[no-untyped-def]
    err = error_of(post(server, "/v1/chat/completions", _chat(part)), 400)
    assert err["param"].startswith("messages[0].content")


def test_text_parts_still_work(server):  # type: ignore[no-untyped-def]
    r = post(server, "/v1/chat/completions", _chat({"type": "text", "text": "a"}, {"type": "text", "text": "b"}))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "url,code",
    [
        ("data:image/png;base64,!!!", "invalid_image"),
        ("data:image/png,rawdata", "invalid_image_url"),
        ("data:application/pdf;base64,AAAA", "invalid_image_format"),
        ("http://169.254.169.254/latest", "image_url_not_allowed"),
        ("ftp://x/y.png", "invalid_image_url"),
    ],
)
def test_url_checks(url, code):  # type: ignore[no-untyped-def]
    with pytest.raises(APIError) as info:
        _read_bytes(ImagePart("messages[0].content[0]", url), ImageLimits(), 1 << 20)
    assert info.value.status == 400 and info.value.code == code


def test_data_url_decodes_and_byte_limit():
    data = b"\x89PNG" + bytes(range(200))
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert _read_bytes(ImagePart("p", url), ImageLimits(), 1 << 20) == data
    with pytest.raises(APIError) as info:
        _read_bytes(ImagePart("p", url), ImageLimits(), 100)
    assert info.value.code == "image_too_large"


def test_placeholders_are_expanded_in_part_order(tokenizer):  # type: ignore[no-untyped-def]
    import torch

    pad = tokenizer.convert_tokens_to_ids("<|pad|>")  # any single special token stands in for [IMG]
    inputs = ImageInputs(ImageTokens(pad=pad, row_break=901, end=902), ImageProcessorConfig(112, 28), "<|pad|>")
    images = [PreparedImage(torch.zeros(3, 28 * h, 28 * w), (h, w), f"d{h}{w}") for h, w in ((1, 2), (2, 1))]
    request = ChatCompletionRequest.model_validate(_chat(
        {"type": "image_url", "image_url": {"url": PNG_URL}}, {"type": "text", "text": "between"},
        {"type": "image_url", "image_url": {"url": PNG_URL}},
    ))
    prompt = chat_prompt_with_images(tokenizer, request, inputs, images)
    ids = prompt.token_ids
    first = ids.index(pad)
    assert ids[first : first + 3] == [pad, pad, 902]  # 1 x 2 grid: one row, then the end token
    second = ids.index(pad, first + 3)
    assert ids[second : second + 4] == [pad, 901, pad, 902]  # 2 x 1 grid: row, break, row, end
    assert ids.count(pad) == 4 and prompt.images == tuple(images)
