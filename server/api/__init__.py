"""The HTTP layer: an OpenAI-compatible FastAPI app over an ``EngineClient``.

Modules: ``app`` (create_app, routes), ``protocol`` (wire models), ``serving`` (the two
generation endpoints), ``generation`` (engine requests of one HTTP request), ``streaming``
(SSE), ``detokenize`` / ``stop`` (text), ``prompts``, ``sampling`` (request -> params),
``usage``, ``logprobs``, ``errors``, ``middleware``, ``disconnect``, ``settings``.
"""

from server.api.app import create_app

__all__ = ["create_app"]
