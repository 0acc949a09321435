"""Image content parts of chat requests -> preprocessed images and prompt tokens.

An image part is ``{"type": "image_url", "image_url": {"url": ...}}``. ``data:`` URLs
(base64 PNG, JPEG or WebP) are decoded here; ``http(s)`` URLs are refused with a 400 unless
the server was started with URL fetching allowed (it must not fetch arbitrary URLs by
default). Per request there are limits on the number of images, their encoded bytes and
their pixels (before resizing); each violation is a 400 naming the part.

The chat template renders each image part as the image token's text; after tokenization
each such token is expanded into the image's placeholder layout (start, rows of pads with
row breaks, end), so the prompt carries exactly one layout per image, in part order.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

from server.api.errors import bad_request
from server.api.prompts import Prompt, chat_prompt
from server.api.protocol import ChatCompletionRequest, ImageContentPart
from server.model.image_processing import (
    ImageError,
    ImageInputs,
    ImageTooLargeError,
    PreparedImage,
    decode_image,
    preprocess,
)

_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,(?P<data>.*)", re.S)
IMAGE_MIME_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp")


@dataclass(frozen=True)
class ImageLimits:
    """Per-request limits on image inputs (totals over the request's images)."""

    max_images: int = 8
    max_bytes: int = 8 * 1024 * 1024  # encoded image bytes
    max_pixels: int = 40_000_000  # source pixels, before resizing
    allow_urls: bool = False  # fetch http(s) image URLs
    fetch_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if min(self.max_images, self.max_bytes, self.max_pixels) < 1:
            raise ValueError("image limits must be >= 1")


@dataclass(frozen=True)
class ImagePart:
    param: str  # e.g. messages[0].content[1]
    url: str


def image_parts(request: ChatCompletionRequest) -> list[ImagePart]:
    """The request's image parts in prompt order."""
    parts = []
    for i, message in enumerate(request.messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if isinstance(part, ImageContentPart):
                    parts.append(ImagePart(f"messages[{i}].content[{j}]", part.image_url.url))
    return parts


def _decode_data_url(part: ImagePart) -> bytes:
    m = _DATA_URL.fullmatch(part.url.strip())
    param = part.param + ".image_url.url"
    if m is None or not m.group("b64"):
        raise bad_request("The image data URL must look like data:image/png;base64,<data>.", param=param, code="invalid_image_url")
    mime = (m.group("mime") or "").lower()
    if mime not in IMAGE_MIME_TYPES:
        raise bad_request(
            f"Unsupported image type {mime or '(none)'!r}; send image/png, image/jpeg or image/webp.",
            param=param, code="invalid_image_format",
        )
    try:
        return base64.b64decode(re.sub(r"\s+", "", m.group("data")), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("The image data is not valid base64.", param=param, code="invalid_image") from None


def _fetch(part: ImagePart, limits: ImageLimits, max_bytes: int) -> bytes:
    """GET an http(s) image URL (only when allowed), reading at most ``max_bytes``."""
    import httpx

    param = part.param + ".image_url.url"
    try:
        with httpx.Client(timeout=limits.fetch_timeout_s, follow_redirects=True) as client:
            with client.stream("GET", part.url) as resp:
                if resp.status_code != 200:
                    raise bad_request(f"Fetching the image failed with HTTP {resp.status_code}.", param=param, code="image_fetch_failed")
                data = bytearray()
                for chunk in resp.iter_bytes():
                    data.extend(chunk)
                    if len(data) > max_bytes:
                        raise bad_request(f"The images exceed {limits.max_bytes} bytes per request.", param=param, code="image_too_large")
                return bytes(data)
    except httpx.HTTPError as exc:
        raise bad_request(f"Fetching the image failed: {exc}", param=param, code="image_fetch_failed") from None


def _read_bytes(part: ImagePart, limits: ImageLimits, max_bytes: int) -> bytes:
    url = part.url.strip()
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = _decode_data_url(part)
    elif scheme in ("http", "https"):
        if not limits.allow_urls:
            raise bad_request(
                "This server does not fetch image URLs; send the image inline as a data: URL "
                "(data:image/png;base64,...).",
                param=part.param + ".image_url.url", code="image_url_not_allowed",
            )
        data = _fetch(part, limits, max_bytes)
    else:
        raise bad_request("The image URL must be a data: URL.", param=part.param + ".image_url.url", code="invalid_image_url")
    if len(data) > max_bytes:
        raise bad_request(f"The images exceed {limits.max_bytes} bytes per request.", param=part.param, code="image_too_large")
    return data


def prepare_images(request: ChatCompletionRequest, inputs: ImageInputs | None, limits: ImageLimits) -> list[PreparedImage]:
    """Decode and preprocess the request's images (CPU work: call it off the event loop).
    Raises APIError 400 for a model without image inputs, a bad URL or image, or a limit."""
    parts = image_parts(request)
    if not parts:
        return []
    if inputs is None:
        raise bad_request("This model does not accept image inputs.", param=parts[0].param, code="images_not_supported")
    if len(parts) > limits.max_images:
        raise bad_request(
            f"At most {limits.max_images} images per request; this one has {len(parts)}.",
            param=parts[limits.max_images].param, code="too_many_images",
        )
    prepared, used_bytes, used_pixels = [], 0, 0
    for part in parts:
        data = _read_bytes(part, limits, limits.max_bytes - used_bytes)
        used_bytes += len(data)
        try:
            image = decode_image(data, max_pixels=limits.max_pixels - used_pixels)
        except ImageTooLargeError as exc:
            raise bad_request(
                f"The images exceed {limits.max_pixels} pixels per request: {exc}.", param=part.param, code="image_too_large"
            ) from None
        except ImageError as exc:
            raise bad_request(f"Invalid image: {exc}.", param=part.param, code="invalid_image") from None
        used_pixels += image.width * image.height
        prepared.append(preprocess(image, inputs.processor))
    return prepared


def chat_prompt_with_images(
    tokenizer: Any, request: ChatCompletionRequest, inputs: ImageInputs | None, images: list[PreparedImage]
) -> Prompt:
    """The chat prompt with each image's placeholder layout in place of its image part."""
    if not images or inputs is None:
        return chat_prompt(tokenizer, request)
    rendered = chat_prompt(tokenizer, request, image_text=inputs.image_text)
    pad = inputs.tokens.pad
    found = rendered.token_ids.count(pad)
    if found != len(images):
        raise bad_request(
            f"The rendered prompt has {found} image tokens for {len(images)} images; message text must not "
            f"contain the image token {inputs.image_text!r}.",
            param="messages",
        )
    ids: list[int] = []
    queue = iter(images)
    for token in rendered.token_ids:
        ids.extend(inputs.tokens.placeholder_ids(next(queue).grid) if token == pad else [token])
    return Prompt(ids, rendered.text, tuple(images))
