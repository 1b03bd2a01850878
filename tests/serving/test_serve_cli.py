"""`sensorvla serve` flags (issue 19): an empty token, the exposure warning, the memory bounds and --debug reach
the server, and the process ends right after the graceful close. The model load is replaced by a fake runner."""

from __future__ import annotations

import numpy as np
import pytest

from sensorvla.cli import serve as serve_cli
from sensorvla.cli.app import main
from sensorvla.inference.runner import PolicyRunner
from sensorvla.serving.server import PolicyServer


class FakeRunner:
    metadata = {"name": "fake-runner"}
    observation_spec = {"state": ((2,), "f")}

    def __init__(self, limits):
        self.limits = limits

    def infer(self, obs):
        return {"actions": np.zeros((1, 2), np.float32)}


@pytest.fixture
def captured(monkeypatch):
    """Replaces the model load, `run_forever` and `os._exit`; returns what they saw, in order."""
    seen: dict = {"events": []}

    def fake_load(checkpoint, **kwargs):
        seen["runner"] = FakeRunner(kwargs["limits"])
        return seen["runner"]

    def fake_run(self):
        seen["server"] = self
        seen["events"].append("run_forever returned")

    monkeypatch.setattr(PolicyRunner, "from_pretrained", staticmethod(fake_load))
    monkeypatch.setattr(PolicyServer, "run_forever", fake_run)
    monkeypatch.setattr(serve_cli.os, "_exit", lambda code: seen["events"].append(f"os._exit({code})"))
    return seen


def test_empty_token_is_a_clean_error_before_loading(captured, capsys, tmp_path):
    assert main(["serve", "--checkpoint", str(tmp_path), "--token", ""]) == 1
    err = capsys.readouterr().err
    assert "--token must not be empty" in err and "Traceback" not in err
    assert "runner" not in captured  # refused before the model load


def test_flags_reach_the_server_and_the_process_ends_after_the_graceful_close(captured, capsys, tmp_path):
    argv = ["serve", "--checkpoint", str(tmp_path), "--host", "0.0.0.0", "--max-connections", "3"]
    argv += ["--max-inflight-mb", "96", "--max-history-samples", "1000", "--debug"]
    assert main(argv) == 0
    assert "without a token" in capsys.readouterr().err  # --host 0.0.0.0 without --token
    server = captured["server"]
    assert server.max_connections == 3 and server.budget.limit == 96 * 2**20 and server.send_traceback
    assert captured["runner"].limits.max_history_samples == 1000
    assert captured["events"] == ["run_forever returned", "os._exit(0)"]


def test_a_bound_that_cannot_work_is_a_clean_error(captured, capsys, tmp_path):
    argv = ["serve", "--checkpoint", str(tmp_path), "--max-message-mb", "64", "--max-inflight-mb", "8"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "max_inflight_bytes" in err and "Traceback" not in err
