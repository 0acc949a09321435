"""Settings of the HTTP layer (what ``create_app`` was given), kept on ``app.state.settings``."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.api.images import ImageLimits

from server.engine.modes import get_mode


@dataclass(frozen=True)
class ServerSettings:
    served_model_names: tuple[str, ...]
    api_key: str | None
    default_mode: str
    max_body_bytes: int
    version: str
    keepalive_s: float = 10.0  # SSE keep-alive comment interval while waiting for output
    default_max_tokens: int = 4096  # cap of the default completion budget (remaining context)
    max_choices: int = 64  # prompts x n per request
    image_limits: ImageLimits = field(default_factory=ImageLimits)

    def __post_init__(self) -> None:
        if not self.served_model_names:
            raise ValueError("at least one served model name is required")
        get_mode(self.default_mode)  # ParamError (a ValueError) naming the known modes
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        if self.keepalive_s <= 0:
            raise ValueError(f"keepalive_s must be > 0, got {self.keepalive_s}")
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
