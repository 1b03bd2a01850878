"""One progress rule for every loop (`sensorvla.progress`): a bar on a terminal, plain lines otherwise, silence
when asked; a redirected command's output holds no carriage return (ours, transformers' or huggingface_hub's)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap

import pytest

from sensorvla.progress import progress, use_progress_bar


def test_the_rule_auto_is_a_bar_only_on_a_terminal():
    assert use_progress_bar("on") and not use_progress_bar("off") and not use_progress_bar(False)
    assert not use_progress_bar("on", allowed=False)
    assert not use_progress_bar("auto") and not use_progress_bar(True)  # pytest's streams are not terminals
    with pytest.raises(ValueError, match="progress mode 'sometimes'"):
        use_progress_bar("sometimes")


def test_plain_lines_without_a_terminal_and_silence_when_off(caplog, capfd):
    caplog.set_level(logging.INFO, logger="sensorvla.progress")
    assert list(progress(range(3), desc="stats", unit="episodes")) == [0, 1, 2]
    out, err = capfd.readouterr()
    assert "\r" not in out + err
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("stats: 3/3 episodes | done in ")
    caplog.clear()
    with progress(total=4, desc="cache", mode="off", interval_s=0.0) as bar:  # every update writes a line
        bar.set_postfix(loss="0.5")
        bar.update(2)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("cache: 2/4 it | ") and "eta" in lines[0] and lines[0].endswith("loss 0.5")
    assert lines[-1].startswith("cache: 2/4 it | done in ")
    caplog.clear()
    for _ in progress(range(3), desc="quiet", mode=False):
        pass
    for _ in progress(range(5), desc="stopped"):  # a loop left early gets no "done" line
        break
    assert [r.getMessage() for r in caplog.records] == []
    list(progress(range(2), desc="bar", mode="on"))
    assert "\r" in capfd.readouterr().err  # "on" is a real tqdm bar


def test_a_redirected_command_writes_no_carriage_return(tmp_path):
    """Through the CLI as a user runs it, output to a pipe: the tiny model's save (transformers' shard bar), the
    dataset writer, the stats, and a weight load (transformers' "Loading weights") write plain lines only."""
    script = textwrap.dedent(
        f"""
        import sys
        import torch
        from sensorvla.cli import main
        d = {str(tmp_path)!r}
        assert main(["tiny-model", "--out", d + "/vl"]) == 0
        assert main(["data", "synth", "--out", d + "/ds", "--episodes", "3", "--image-size", "32"]) == 0
        assert main(["stats", "--dataset", d + "/ds"]) == 0
        from sensorvla.models.backbone import load_vl_model
        load_vl_model(d + "/vl", dtype=torch.float32)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "\r" not in r.stdout + r.stderr
    assert "writing episodes: 3 episodes | done in" in r.stderr, r.stderr
    assert re.search(r"stats: (\d+)/\1 episodes \| done in", r.stderr)
