"""The logit-control fields reach the engine parameters (honoured, never silently dropped)."""

from __future__ import annotations

from server.engine.penalties import LogitControls
from tests.api.conftest import LiveServer, http


def test_fields_reach_the_engine(server: LiveServer) -> None:
    body = {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "presence_penalty": 0.5,
        "frequency_penalty": -0.25, "repetition_penalty": 1.1, "logit_bias": {"7": 3, "12": -100},
        "min_tokens": 2, "stop_token_ids": [4, 9],
    }
    resp = http().post(server.url + "/v1/chat/completions", json=body, timeout=20)
    assert resp.status_code == 200, resp.text
    sampling = server.engine.submitted[-1][2].sampling
    assert sampling.controls == LogitControls(0.5, -0.25, 1.1, ((7, 3.0), (12, -100.0)), 2)
    assert sampling.stop_token_ids == (4, 9)


def test_neutral_penalties_are_accepted_in_diffusion(server: LiveServer) -> None:
    body = {"prompt": "hi", "max_tokens": 3, "mode": "diffusion", "presence_penalty": 0, "repetition_penalty": 1,
            "logit_bias": {"7": 1}, "min_tokens": 1}
    resp = http().post(server.url + "/v1/completions", json=body, timeout=20)
    assert resp.status_code == 200, resp.text
    assert server.engine.submitted[-1][2].sampling.controls.logit_bias == ((7, 1.0),)
