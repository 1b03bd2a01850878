"""`sensorvla serve`: a pretrained_model folder behind the websocket policy server."""

from __future__ import annotations

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
    sensor_max_gap_s: float | None = None,
) -> int:
    """Serve a pretrained_model folder over websocket + msgpack (openpi-style); /healthz over HTTP.

    Args:
        vl_model: backbone folder or hub id overriding the path recorded in the checkpoint (a checkpoint
            copied to another machine).
        max_queue: requests waiting or running at once; more are answered Busy at once.
        max_instruction_tokens: longest instruction accepted (tokens; characters are bounded first).
        max_image_pixels: largest raw view (h * w) accepted; the processor resizes to max_pixels anyway.
        max_sensor_samples: most sensor rows per request (the server keeps the history).
        sensor_max_gap_s: sensor gap tolerance (default: the rule used in training).
    """
    from sensorvla.inference.checks import RequestLimits
    from sensorvla.inference.runner import PolicyRunner
    from sensorvla.serving.server import PolicyServer

    limits = RequestLimits(
        max_instruction_tokens=max_instruction_tokens,
        max_image_pixels=max_image_pixels,
        max_sensor_samples=max_sensor_samples,
    )
    runner = PolicyRunner.from_pretrained(
        checkpoint,
        device=device,
        vl_refresh_every=vl_refresh_every,
        vl_model=vl_model,
        limits=limits,
        max_gap_s=sensor_max_gap_s,
    )
    server = PolicyServer(
        runner, host=host, port=port, token=token, max_message_bytes=int(max_message_mb * 2**20), max_queue=max_queue
    )
    server.run_forever()
    return 0


def register(app) -> None:
    """Add `serve` to the `sensorvla` app."""
    app.command(serve, name="serve")
