"""The compiled tick kept on disk (`export_tick`'s cache, inference/tick.py): a later process with the same policy
loads the package instead of compiling; another weight is another key; a corrupt package, or one whose output is
not eager's, is removed with a warning and compiled again; an unwritable cache folder still serves.

The default tests replace AOTInductor's compiler and loader with stand-ins (the keying and the file handling are
ours; compiling takes tens of seconds); the slow one compiles for real, in two processes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from test_tick import has_cxx, tick_inputs

from sensorvla.eval.latency import _obs, _runner
from sensorvla.inference import tick as tick_mod
from sensorvla.inference.tick import compiled_cache_dir, export_tick

FAKE = b"a compiled tick package"


class FakeAOTI:
    """`_compile` and `aoti_load_package` stand-ins: a "package" is the bytes FAKE; loading it gives the eager tick
    (once a wrong one, after `wrong = True`); anything else fails to load as a truncated zip does."""

    def __init__(self, tick):
        self.tick, self.compiles, self.loads, self.wrong = tick, 0, 0, False

    def compile(self, program) -> bytes:
        """Count the compile; return the fake package."""
        self.compiles += 1
        return FAKE

    def load(self, path):
        """Read the package from a path or a buffer; raise unless it is FAKE."""
        self.loads += 1
        data = path.getvalue() if hasattr(path, "getvalue") else Path(path).read_bytes()
        if data != FAKE:
            raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")
        if self.wrong:
            self.wrong = False
            return lambda *a: self.tick(*a) + 1.0
        return self.tick


@pytest.fixture
def setup(tiny_vl_dir, monkeypatch, tmp_path):
    """A regression runner, the tick's inputs after one call, a fake compiler and a cache folder."""
    runner = _runner(tiny_vl_dir, "regression", 1, "fast_slow", "cpu", 33, 56, (3, 2))
    inputs = tick_inputs(runner, _obs(1, 33, 56, np.random.default_rng(0)))
    fake = FakeAOTI(runner.tick)
    monkeypatch.setattr(tick_mod, "_compile", fake.compile)
    monkeypatch.setattr(torch._inductor, "aoti_load_package", fake.load)
    return runner, inputs, fake, tmp_path / "compiled"


def test_second_start_loads_the_cached_package_and_a_new_weight_is_a_new_key(setup, caplog):
    runner, inputs, fake, cache = setup
    caplog.set_level(logging.INFO, logger="sensorvla.inference.tick")
    export_tick(runner.tick, inputs, cache)
    assert fake.compiles == 1 and len(files := list(cache.glob("*.pt2"))) == 1
    assert "saved to " + str(files[0]) in caplog.text
    caplog.clear()
    compiled = export_tick(runner.tick, inputs, cache)  # a restart: the same policy exported again
    assert fake.compiles == 1, "the cached package was not used"
    assert f"compiled tick loaded from cache {files[0]}" in caplog.text
    torch.testing.assert_close(compiled(*inputs), runner.tick(*inputs))
    assert list(cache.iterdir()) == files  # no temporary file left behind
    with torch.no_grad():
        runner.policy.head.parameters().__next__().view(-1)[0] += 1e-3  # one weight of the head
    export_tick(runner.tick, inputs, cache)
    assert fake.compiles == 2 and len(list(cache.glob("*.pt2"))) == 2


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong output"])
def test_a_bad_cached_package_is_removed_with_a_warning_and_compiled_again(setup, caplog, damage):
    runner, inputs, fake, cache = setup
    export_tick(runner.tick, inputs, cache)
    (path,) = cache.glob("*.pt2")
    if damage == "truncated":
        path.write_bytes(FAKE[:5])
    elif damage == "garbage":
        path.write_bytes(b"\0" * 100)
    else:
        fake.wrong = True  # loads, but its output on the example is not eager's
    caplog.set_level(logging.INFO, logger="sensorvla.inference.tick")
    compiled = export_tick(runner.tick, inputs, cache)
    assert fake.compiles == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"removing the compiled tick cached at {path}" in warnings[0].getMessage()
    assert path.read_bytes() == FAKE  # replaced by the new package
    torch.testing.assert_close(compiled(*inputs), runner.tick(*inputs))


def test_an_unwritable_cache_folder_still_compiles_and_serves(setup, caplog, tmp_path):
    runner, inputs, fake, _ = setup
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    compiled = export_tick(runner.tick, inputs, blocker / "compiled")
    assert fake.compiles == 1 and "could not keep the compiled tick" in caplog.text
    torch.testing.assert_close(compiled(*inputs), runner.tick(*inputs))


def test_the_folder_keeps_its_budget_dropping_the_least_recently_used(setup, monkeypatch):
    """Saving a package removes the least recently used ones (by mtime; a hit touches its file) until the folder
    is within $SENSORVLA_COMPILED_CACHE_GB; the package just saved stays; a bad budget is refused naming the fix."""
    runner, inputs, fake, cache = setup
    cache.mkdir()
    now = os.stat(cache).st_mtime
    for i, name in enumerate(["oldest", "older", "recent"]):
        (cache / f"{name}.pt2").write_bytes(b"x" * 40)
        os.utime(cache / f"{name}.pt2", (now - 300 + 100 * i, now - 300 + 100 * i))
    (cache / "notes.txt").write_bytes(b"x" * 1000)  # not a package: never counted or removed
    monkeypatch.setenv("SENSORVLA_COMPILED_CACHE_GB", str(110 / 1e9))  # 110 bytes: 2 old ones + the new 23
    export_tick(runner.tick, inputs, cache)
    (new,) = set(cache.glob("*.pt2")) - {cache / "older.pt2", cache / "recent.pt2"}
    assert sorted(p.name for p in cache.iterdir()) == sorted(["older.pt2", "recent.pt2", new.name, "notes.txt"])
    os.utime(new, (now - 1000, now - 1000))  # made the oldest; a cache hit makes it the newest again
    export_tick(runner.tick, inputs, cache)
    assert fake.compiles == 1 and new.stat().st_mtime >= now
    monkeypatch.setenv("SENSORVLA_COMPILED_CACHE_GB", str(30 / 1e9))  # smaller than any two packages
    with torch.no_grad():
        runner.policy.head.parameters().__next__().view(-1)[0] += 1e-3  # another key: a new package
    export_tick(runner.tick, inputs, cache)
    (newest,) = set(cache.glob("*.pt2"))
    assert fake.compiles == 2 and newest != new  # everything older went; the one just saved stays
    monkeypatch.setenv("SENSORVLA_COMPILED_CACHE_GB", "lots")
    with pytest.raises(ValueError, match="SENSORVLA_COMPILED_CACHE_GB='lots'.*in GB"):
        tick_mod.compiled_cache_budget()
    with pytest.raises(ValueError, match="SENSORVLA_COMPILED_CACHE_GB='lots'"):
        export_tick(runner.tick, inputs, cache)
    assert fake.compiles == 2  # refused before compiling


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("SENSORVLA_COMPILED_CACHE", raising=False)
    monkeypatch.setenv("SENSORVLA_CACHE_DIR", str(tmp_path / "c"))
    assert compiled_cache_dir() == tmp_path / "c" / "compiled"
    monkeypatch.setenv("SENSORVLA_COMPILED_CACHE", str(tmp_path / "mine"))
    assert compiled_cache_dir() == tmp_path / "mine"
    monkeypatch.setenv("SENSORVLA_COMPILED_CACHE", "off")
    assert compiled_cache_dir() is None


CHILD = textwrap.dedent(
    """
    import json, logging, sys
    import numpy as np
    from sensorvla.eval.latency import _obs, _runner
    from sensorvla.inference import tick

    logging.basicConfig(level=logging.INFO)
    calls = []
    compile_ = tick._compile
    tick._compile = lambda program: calls.append(1) or compile_(program)
    runner = _runner(sys.argv[1], "flow", 1, "fast_slow", "cpu", 33, 56, (3, 2), compile_model=True)
    runner.warm_up()
    actions = runner.infer(_obs(1, 33, 56, np.random.default_rng(0)))["actions"]
    print(json.dumps({"compiles": len(calls), "actions": actions.tolist()}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not has_cxx(), reason="AOTInductor needs a C++ compiler (g++ / clang++)")
def test_a_new_process_loads_the_compiled_tick_and_gives_the_same_actions(tiny_vl_dir, tmp_path):
    """Two `sensorvla serve`-like starts (warm up, one call) in fresh processes sharing a cache folder: the first
    compiles and saves, the second loads the package, compiles nothing, and gives the same actions."""
    env = dict(os.environ, SENSORVLA_COMPILED_CACHE=str(tmp_path / "compiled"))
    runs = []
    for _ in range(2):
        p = subprocess.run(
            [sys.executable, "-c", CHILD, str(tiny_vl_dir)], env=env, capture_output=True, text=True, timeout=600
        )
        assert p.returncode == 0, p.stderr[-3000:]
        runs.append((json.loads(p.stdout.strip().splitlines()[-1]), p.stderr))
    (first, log1), (second, log2) = runs
    assert first["compiles"] == 1 and "saved to" in log1
    assert second["compiles"] == 0 and "compiled tick loaded from cache" in log2, log2[-3000:]
    np.testing.assert_allclose(second["actions"], first["actions"], atol=1e-6, rtol=1e-6)
    assert len(list((tmp_path / "compiled").glob("*.pt2"))) == 1
