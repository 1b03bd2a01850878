"""Config loading through pydantic (config.py): the annotations pydantic knows load with strict JSON types, also
where the hand-written coercion it replaced passed values through unchecked (dataclasses inside a list: the
declared sensor streams of issue 20), and errors still name the key, the expected type and the value."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from sensorvla.config import ConfigError, section_from_dict


@dataclass
class Stream:
    """A stand-in for a declared sensor stream."""

    name: str = "wrench"
    rate_hz: float = 1000.0
    shape: tuple[int, ...] = (6,)


@dataclass
class Streams:
    """A section holding a list of streams."""

    streams: tuple[Stream, ...] = field(default_factory=tuple)


def test_dataclasses_inside_a_list_load_typed():
    got = section_from_dict(Streams, {"streams": [{"name": "tactile", "rate_hz": 30, "shape": [4, 4]}]}, "data.")
    assert got.streams == (Stream("tactile", 30.0, (4, 4)),)
    assert isinstance(got.streams[0].rate_hz, float)


@pytest.mark.parametrize(
    ("stream", "match"),
    [
        ({"name": "tactile", "rate_hz": "30"}, r"data\.streams\.0\.rate_hz .*expects float, got '30'"),
        ({"name": "tactile", "colour": "red"}, r"unknown config keys \['data\.streams\.0\.colour'\]"),
    ],
)
def test_a_bad_stream_names_its_key(stream, match):
    with pytest.raises(ConfigError, match=match):
        section_from_dict(Streams, {"streams": [stream]}, "data.")
