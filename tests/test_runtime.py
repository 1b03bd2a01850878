"""Thread setup: OMP_NUM_THREADS wins, 1 per process under torchrun on CPU, physical cores otherwise; the
CLI entry points apply it and print it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from sensorvla.runtime import choose_threads, configure_threads, loader_workers, passive_wait_policy, physical_cores

# a hang guard only, never a performance limit: a loaded machine may take many times the usual time
HANG_GUARD_S = 3600


def fake_sysfs(root, topology: dict[int, tuple[int, int]]):
    for cpu, (package, core) in topology.items():
        d = root / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "physical_package_id").write_text(f"{package}\n")
        (d / "core_id").write_text(f"{core}\n")
    return root


def test_physical_cores_count_smt_siblings_once(tmp_path):
    # 2 packages x 2 cores x 2 hyperthreads = 8 logical CPUs, 4 physical cores
    topo = {cpu: (cpu // 4, (cpu // 2) % 2) for cpu in range(8)}
    sysfs = fake_sysfs(tmp_path, topo)
    assert physical_cores(set(range(8)), sysfs) == 4
    assert physical_cores({0, 1}, sysfs) == 1  # an affinity mask of two siblings is one core
    assert physical_cores({0, 2, 5}, sysfs) == 3
    assert physical_cores({0, 1, 2}, tmp_path / "missing") == 3  # no topology: logical CPUs


@pytest.mark.parametrize(
    "env,cuda,cores,threads,why",
    [
        ({"OMP_NUM_THREADS": "3"}, False, 8, 3, "OMP_NUM_THREADS=3"),
        ({"OMP_NUM_THREADS": "3", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}, False, 8, 3, "OMP_NUM_THREADS"),
        ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, False, 8, 1, "1 per process"),
        ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, True, 8, 4, "8 physical cores / 2 local"),
        ({}, False, 6, 6, "physical cores"),
        ({"OMP_NUM_THREADS": "junk"}, False, 6, 6, "physical cores"),
        ({"OMP_NUM_THREADS": "0"}, False, 2, 2, "physical cores"),
    ],
)
def test_choose_threads(env, cuda, cores, threads, why):
    setting = choose_threads(env, cuda=cuda, cores=cores)
    assert setting.threads == threads and why in setting.reason
    assert str(threads) in setting.describe()


def test_configure_threads_applies_the_choice(monkeypatch, capsys):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        monkeypatch.setenv("LOCAL_RANK", "1")  # only local rank 0 prints
        assert configure_threads().threads == 1 and torch.get_num_threads() == 1
        assert capsys.readouterr().err == ""
        monkeypatch.setenv("LOCAL_RANK", "0")
        configure_threads()
        assert "torch intra-op threads: 1 (OMP_NUM_THREADS=1)" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("module", ["sensorvla.train", "sensorvla.cli"])
def test_entry_points_print_the_setting(module):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    args = ["--help"] if module == "sensorvla.train" else ["stats", "--help"]
    r = subprocess.run(
        [sys.executable, "-m", module, *args], env=env, capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[sensorvla] torch intra-op threads: 2 (OMP_NUM_THREADS=2)" in r.stderr


@pytest.mark.parametrize(
    ("requested", "in_memory", "env", "cores", "workers"),
    [
        (3, False, {}, 2, 3),  # an explicit --data.num-workers is kept
        (0, False, {}, 16, 0),
        (-1, True, {}, 16, 0),  # auto: samples already in memory (preloaded) need no workers
        (-1, False, {}, 16, 2),  # auto: openpi's 2
        (-1, False, {}, 2, 2),
        (-1, False, {}, 1, 1),  # never more than the cores
        (-1, False, {"LOCAL_WORLD_SIZE": "4"}, 4, 1),  # a share of the cores per local process, at least 1
        (-1, False, {"LOCAL_WORLD_SIZE": "2"}, 16, 2),
    ],
)
def test_loader_workers(requested, in_memory, env, cores, workers):
    assert loader_workers(requested, in_memory, env=env, cores=cores) == workers


def test_num_workers_below_auto_is_refused():
    from sensorvla.config import ConfigError, SensorVLAConfig

    cfg = SensorVLAConfig()
    cfg.data.dataset_dir = "x"
    cfg.data.num_workers = -2
    with pytest.raises(ConfigError, match="--data.num-workers"):
        cfg.validate()


def test_passive_wait_policy_is_set_unless_the_environment_names_one():
    env: dict[str, str] = {}
    line = passive_wait_policy(env, torch_loaded=False)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and "passive" in line
    late: dict[str, str] = {}
    assert "child processes only" in passive_wait_policy(late, torch_loaded=True)  # too late for this process
    assert late["OMP_WAIT_POLICY"] == "PASSIVE"
    mine = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert "ACTIVE (from the environment)" in passive_wait_policy(mine, torch_loaded=False)
    assert mine == {"OMP_WAIT_POLICY": "ACTIVE"}  # the user's choice is kept


def test_entry_point_makes_openmp_passive_before_torch_loads():
    """A fresh process without OMP_WAIT_POLICY: the CLI sets it before torch (and libgomp) load, prints it, and a
    child process inherits it."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_NUM_THREADS"] = "1"
    code = (
        "import os, subprocess, sys\n"
        "from sensorvla.runtime import configure_threads\n"
        "configure_threads()\n"
        "print(os.environ.get('OMP_WAIT_POLICY'))\n"
        "print(subprocess.run([sys.executable, '-c', 'import os; print(os.environ.get(\"OMP_WAIT_POLICY\"))'],"
        " capture_output=True, text=True).stdout.strip())\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["PASSIVE", "PASSIVE"]
    assert "idle OpenMP threads: passive (OMP_WAIT_POLICY=PASSIVE" in r.stderr
    assert "child processes only" not in r.stderr  # torch was not loaded before the policy was set
