"""A new action head is an addition: its module plus one line in `config.HEADS` (issue 20), proved on a copy of
the package that gains a Huber-loss head that way and trains, predicts, saves and loads through the usual paths."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sensorvla
from sensorvla.config import HEADS, HeadConfig
from sensorvla.models.heads import build_head

HUBER_HEAD = '''"""A regression head trained with a Huber loss (the registry test's new head)."""

import torch.nn.functional as F

from sensorvla.models.heads.base import masked_mean
from sensorvla.models.heads.regression import RegressionHead


class HuberHead(RegressionHead):
    """The regression head with a Huber loss."""

    def loss(self, cond, cond_mask, actions, action_mask, generator=None):
        """Per-sample Huber loss (B,), masked over the horizon."""
        return masked_mean(F.huber_loss(self.predict(cond, cond_mask), actions, reduction="none"), action_mask)
'''

SCRIPT = """
import dataclasses, sys
import torch
sys.path.insert(0, {tests!r})
from test_policy import make_batch, make_cfg, overfit
from sensorvla.config import SensorVLAConfig, section_from_dict
from sensorvla.models.folder import save_pretrained
from sensorvla.models.policy import build_policy, load_pretrained

cfg = section_from_dict(SensorVLAConfig, dataclasses.asdict(make_cfg({vl!r}, head="huber")))  # validated
torch.manual_seed(0)
policy = build_policy(cfg)
assert type(policy.head).__name__ == "HuberHead", type(policy.head)
batches = [make_batch({vl!r}, seed=0), make_batch({vl!r}, seed=1)]
before, after, _ = overfit(policy, batches, steps=60)
assert after < 0.7 * before, (before, after)
policy.eval()
save_pretrained(policy, {out!r}, cfg)
again = load_pretrained({out!r})[0].eval()
with torch.no_grad():
    a, b = policy.predict_chunk(batches[0]), again.predict_chunk(batches[0])
assert torch.equal(a, b), (a - b).abs().max()
print("ok", before, after)
"""


def test_the_registry_names_every_head_and_an_unknown_one_is_refused():
    assert tuple(HEADS) == ("regression", "diffusion", "flow")
    with pytest.raises(ValueError, match=r"--model.head.type 'nope' is unknown; choose one of \['diffusion'"):
        build_head(HeadConfig(type="nope", horizon=2, action_dim=3), 8)


def test_a_new_head_is_its_module_plus_one_registry_line(tmp_path, tiny_vl_dir):
    pkg = tmp_path / "src" / "sensorvla"
    shutil.copytree(Path(sensorvla.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "models" / "heads" / "huber.py").write_text(HUBER_HEAD)  # file 1: the head
    config = pkg / "config.py"  # file 2: one registry line
    text = config.read_text()
    anchor = "HEADS: dict[str, str] = {\n"
    assert text.count(anchor) == 1
    config.write_text(text.replace(anchor, anchor + '    "huber": "sensorvla.models.heads.huber:HuberHead",\n'))
    tests = str(Path(__file__).parent)
    script = SCRIPT.format(tests=tests, vl=str(tiny_vl_dir), out=str(tmp_path / "pretrained"))
    env = {"PYTHONPATH": str(pkg.parent), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-3000:]
