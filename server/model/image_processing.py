"""Images to model inputs: decoding, Pixtral preprocessing, and the prompt's placeholder layout.

Preprocessing follows transformers' Pixtral image processor (the PIL one) exactly: convert to
RGB (transparent pixels composited on white), cap the longer side at ``longest_edge`` keeping
the aspect ratio (floor), round each side UP to a multiple of the token size t = patch x merge
(28 px), resize bicubic in uint8 with PIL, scale by 1/255 (float64, then float32) and normalise
with the CLIP mean/std. The image then covers an ``H' x W'`` grid of tokens, H' = H / t.

Placeholder layout (as transformers' ``PixtralProcessor``): per image, ``[start]`` (only when
the checkpoint has an image-start token), then H' rows of W' image (pad) tokens, the rows
separated by row-break tokens, then the end token in place of the last break. The features of
the image replace the pad tokens' embeddings, row-major.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from server.model.config import VisionConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# special tokens of the Mistral / Pixtral tokenizers, used when config.json does not name the ids
IMAGE_TOKEN, IMAGE_BREAK_TOKEN, IMAGE_END_TOKEN, IMAGE_START_TOKEN = "[IMG]", "[IMG_BREAK]", "[IMG_END]", "[IMG_START]"


class ImageError(ValueError):
    """The bytes are not a usable image (user input)."""


class ImageTooLargeError(ImageError):
    """The image has more pixels than allowed."""


@dataclass(frozen=True)
class ImageTokens:
    """The token ids of the placeholder layout."""

    pad: int
    row_break: int
    end: int
    start: int | None = None

    @classmethod
    def resolve(cls, vision: VisionConfig, tokenizer: Any) -> "ImageTokens":
        """Ids from config.json where it names them, else from the tokenizer's special tokens.
        Raises ValueError when an id cannot be found (never falls back to a constant)."""

        def from_tokenizer(token: str) -> int | None:
            if tokenizer is None:
                return None
            tid = tokenizer.convert_tokens_to_ids(token)
            unk = getattr(tokenizer, "unk_token_id", None)
            return int(tid) if isinstance(tid, int) and tid >= 0 and tid != unk else None

        pad = vision.image_token_id if vision.image_token_id is not None else from_tokenizer(IMAGE_TOKEN)
        brk = vision.image_break_token_id if vision.image_break_token_id is not None else from_tokenizer(IMAGE_BREAK_TOKEN)
        end = vision.image_end_token_id if vision.image_end_token_id is not None else from_tokenizer(IMAGE_END_TOKEN)
        start = vision.image_start_token_id if vision.image_start_token_id is not None else from_tokenizer(IMAGE_START_TOKEN)
        if pad is None or brk is None or end is None:
            raise ValueError(
                "cannot resolve the image token ids (image, row break, end) from config.json or the tokenizer "
                f"(got {pad}, {brk}, {end})"
            )
        return cls(pad=pad, row_break=brk, end=end, start=start)

    def placeholder_ids(self, grid: tuple[int, int]) -> list[int]:
        rows, cols = grid
        ids = [self.start] if self.start is not None else []
        for r in range(rows):
            ids.extend([self.pad] * cols)
            ids.append(self.end if r == rows - 1 else self.row_break)
        return ids


@dataclass(frozen=True)
class ImageProcessorConfig:
    longest_edge: int
    token_pixels: int  # patch_size * spatial_merge_size
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @classmethod
    def for_model(cls, vision: VisionConfig, model_dir: str | Path | None = None) -> "ImageProcessorConfig":
        """From ``preprocessor_config.json`` when the folder has one, else the vision config."""
        longest, mean, std = vision.image_size, CLIP_MEAN, CLIP_STD
        path = Path(model_dir) / "preprocessor_config.json" if model_dir is not None else None
        if path is not None and path.is_file():
            import json

            pre = json.loads(path.read_text())
            longest = int((pre.get("size") or {}).get("longest_edge", longest))
            mean = tuple(pre.get("image_mean", mean))  # type: ignore[assignment]
            std = tuple(pre.get("image_std", std))  # type: ignore[assignment]
        return cls(longest_edge=longest, token_pixels=vision.token_pixels, mean=mean, std=std)


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """One preprocessed image: ``pixel_values`` ``[3, H, W]`` float32 covering ``grid`` tokens.
    ``digest`` identifies the pixels (the prefix cache and the encoder cache key on it)."""

    pixel_values: torch.Tensor
    grid: tuple[int, int]
    digest: str

    @property
    def num_features(self) -> int:
        return self.grid[0] * self.grid[1]


def resized_size(height: int, width: int, cfg: ImageProcessorConfig) -> tuple[int, int]:
    """Output (height, width): the longer side capped (floor), both rounded up to ``token_pixels``."""
    ratio = max(height / cfg.longest_edge, width / cfg.longest_edge)
    if ratio > 1:
        height, width = int(math.floor(height / ratio)), int(math.floor(width / ratio))
    t = cfg.token_pixels
    return ((height - 1) // t + 1) * t, ((width - 1) // t + 1) * t


def to_rgb(image: Any) -> Any:
    """RGB copy of a PIL image; transparency is composited on white (as transformers does)."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def preprocess(image: Any, cfg: ImageProcessorConfig) -> PreparedImage:
    """A PIL image -> ``PreparedImage`` (see the module docstring for the exact steps)."""
    from PIL import Image

    rgb = to_rgb(image)
    h, w = resized_size(rgb.height, rgb.width, cfg)
    resized = np.asarray(rgb.resize((w, h), resample=Image.Resampling.BICUBIC))
    scaled = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    normed = (scaled - np.asarray(cfg.mean, dtype=np.float32)) / np.asarray(cfg.std, dtype=np.float32)
    pixels = torch.from_numpy(np.ascontiguousarray(normed.transpose(2, 0, 1)))
    digest = hashlib.sha256(resized.tobytes() + f"{h}x{w}".encode()).hexdigest()
    return PreparedImage(pixels, (h // cfg.token_pixels, w // cfg.token_pixels), digest)


def decode_image(data: bytes, max_pixels: int) -> Any:
    """Decode PNG / JPEG / WebP bytes into a loaded PIL image. Raises ImageError for anything
    else, for truncated or corrupt data, and for images over ``max_pixels`` (checked from the
    header, before the pixels are decoded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ("PNG", "JPEG", "WEBP"):
                raise ImageError(f"unsupported image format {image.format}; send PNG, JPEG or WebP")
            if image.width * image.height > max_pixels:
                raise ImageTooLargeError(
                    f"the image has {image.width}x{image.height} = {image.width * image.height} pixels; "
                    f"the limit is {max_pixels}"
                )
            image.load()
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"the data is not a readable image ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # truncated / corrupt
        raise ImageError(f"the image could not be decoded ({exc})") from exc
    if image.width < 1 or image.height < 1:
        raise ImageError("the image is empty")
    return image


@dataclass(frozen=True)
class ImageInputs:
    """What the HTTP layer needs to turn images into prompt tokens for one model."""

    tokens: ImageTokens
    processor: ImageProcessorConfig
    image_text: str  # the pad token as text: how an image part is rendered by the chat template

    @classmethod
    def for_model(cls, vision: VisionConfig, tokenizer: Any, model_dir: str | Path | None) -> "ImageInputs":
        """Raises ValueError when the image token ids cannot be resolved."""
        tokens = ImageTokens.resolve(vision, tokenizer)
        text = tokenizer.convert_ids_to_tokens(tokens.pad) if tokenizer is not None else None
        if not isinstance(text, str) or tokenizer.convert_tokens_to_ids(text) != tokens.pad:
            raise ValueError(f"the tokenizer has no token string for the image token id {tokens.pad}")
        return cls(tokens, ImageProcessorConfig.for_model(vision, model_dir), text)
