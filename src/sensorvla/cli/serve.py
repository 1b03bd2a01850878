"""`sensorvla serve`: a pretrained_model folder behind the websocket policy server."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path


def serve(
    checkpoint: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    device: str = "cpu",
    vl_refresh_every: int = 1,
    max_message_mb: float = 32.0,
    vl_model: str | None = None,
    max_queue: int = 8,
    max_instruction_tokens: int = 256,
    max_image_pixels: int = 2048 * 2048,
    max_sensor_samples: int = 16384,
    max_history_samples: int = 65536,
    max_connections: int = 16,
    max_inflight_mb: float | None = None,
    sensor_max_gap_s: float | None = None,
    debug: bool = False,
) -> int:
    """Serve a pretrained_model folder over websocket + msgpack (openpi-style); /healthz over HTTP.

    Args:
        checkpoint: a pretrained_model folder (or `sensorvla export` output), or a hub id `org/name[@revision]`.
        host: interface to bind (0.0.0.0: the robot's network; without --token a warning is printed).
        token: shared secret clients must send (`Authorization: Bearer <token>`); must not be empty.
        vl_model: backbone folder or hub id (`org/name[@revision]`, resolved in the local hub cache) overriding the
            path recorded in the checkpoint (a checkpoint copied to another machine).
        max_message_mb: largest request frame (MiB); larger ones close the connection with code 1009.
        max_queue: requests waiting or running at once; more are answered Busy at once.
        max_instruction_tokens: longest instruction accepted (tokens; characters are bounded first).
        max_image_pixels: largest raw view (h * w) accepted; the processor resizes to max_pixels anyway.
        max_sensor_samples: most sensor rows per request (the server keeps the history).
        max_history_samples: most sensor samples one connection's history holds (more are refused).
        max_connections: open connections at once; more get HTTP 503.
        max_inflight_mb: bytes of request frames decoded or served at once (MiB); more are answered Busy.
            Default: 4 x max-message-mb.
        sensor_max_gap_s: sensor gap tolerance (default: the rule used in training).
        debug: include server tracebacks in error replies (off by default: they reveal code and paths).
    """
    from sensorvla import hub
    from sensorvla.config import ConfigError

    _check_access(host, token)
    from sensorvla.inference.checks import RequestLimits
    from sensorvla.inference.runner import PolicyRunner
    from sensorvla.serving.server import PolicyServer

    limits = RequestLimits(
        max_instruction_tokens=max_instruction_tokens,
        max_image_pixels=max_image_pixels,
        max_sensor_samples=max_sensor_samples,
        max_history_samples=max_history_samples,
    )
    runner = PolicyRunner.from_pretrained(
        hub.resolve(checkpoint, repo_type="model").path,  # a folder, or a hub id in the local hub cache
        device=device,
        vl_refresh_every=vl_refresh_every,
        vl_model=vl_model,
        limits=limits,
        max_gap_s=sensor_max_gap_s,
    )
    _compile_before_serving(runner)
    try:
        server = PolicyServer(
            runner,
            host=host,
            port=port,
            token=token,
            max_message_bytes=int(max_message_mb * 2**20),
            max_queue=max_queue,
            max_connections=max_connections,
            max_inflight_bytes=None if max_inflight_mb is None else int(max_inflight_mb * 2**20),
            send_traceback=debug,
        )
    except ValueError as exc:  # a bound that cannot work, e.g. --max-inflight-mb under --max-message-mb
        raise ConfigError(f"sensorvla serve: {exc}") from None
    server.run_forever()
    exit_now(0)
    return 0


def _compile_before_serving(runner) -> None:
    """With `--runtime.compile` (a runner that `compiles`): export and compile now (or load the package an earlier
    start kept: `inference/tick.py`), not in the first request."""
    if getattr(runner, "compiles", False):
        print(
            "[sensorvla] compiling the policy's per-call work (torch.export + AOTInductor; loaded from the compiled "
            "cache when an earlier start kept it) ...",
            file=sys.stderr,
        )
        print(f"[sensorvla] compiled tick ready in {runner.warm_up():.1f} s", file=sys.stderr, flush=True)


def _check_access(host: str, token: str | None) -> None:
    """Refuse an empty token (`ConfigError`); warn on stderr when a network bind has no token."""
    from sensorvla.config import ConfigError
    from sensorvla.serving.server import exposure_warning

    if token is not None and not token.strip():
        raise ConfigError(
            "--token must not be empty: pass a secret (e.g. `--token $(openssl rand -hex 16)`), or leave the flag "
            "out to serve without authentication on 127.0.0.1"
        )
    warning = exposure_warning(host, token)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)


def exit_now(code: int) -> None:
    """End the process right after the server's graceful close: flush the logs and streams, then `os._exit`.

    Connections are already closed (code 1001) and no request is answered any more; what is skipped is the
    interpreter's teardown of torch and transformers (over a second here, several on a loaded machine) and the
    join of an inference thread still running a request nobody will receive.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing left to flush into
            stream.flush()
    os._exit(code)


def register(app) -> None:
    """Add `serve` to the `sensorvla` app."""
    app.command(serve, name="serve")
