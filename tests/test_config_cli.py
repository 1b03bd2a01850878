"""Typed config round trip, validation messages, the seed-flag translation and import hygiene."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sensorvla.cli import SEED_ALIASES, parse_train_config, rewrite_seed_flags
from sensorvla.config import ConfigError, SensorVLAConfig


def test_config_json_round_trip():
    cfg = SensorVLAConfig()
    cfg.model.head.type = "flow"
    cfg.data.views = ("a", "b")
    cfg.data.mixture = ("x:1.0",)
    again = SensorVLAConfig.from_json(cfg.to_json())
    assert again == cfg
    assert isinstance(again.data.views, tuple)


def test_dataset_derived_fields_resolve_per_section():
    """`resolve_from_meta` fills the views and the model's shapes; the model
    part alone is `resolve_model`; a section loads from its dict alone (`section_from_dict`)."""
    from types import SimpleNamespace

    from sensorvla.config import DataConfig, resolve_from_meta, resolve_model, section_from_dict

    meta = SimpleNamespace(views=["a", "b"], action_dim=7, sensor_channels=0, state_dim=6, force_channels=1)
    cfg = SensorVLAConfig()
    out = resolve_from_meta(cfg, meta)
    assert out.data.views == ("a", "b") and cfg.data.views == ()  # a new config
    m = out.model
    assert (m.num_views, m.head.action_dim, m.head.horizon, m.state_dim) == (2, 7, cfg.data.horizon, 6)
    assert not m.sensor.enabled  # no sensor stream: vision-only
    assert resolve_model(cfg.model, meta, num_views=2, horizon=cfg.data.horizon) == m
    cfg.model.head.action_dim = 6
    with pytest.raises(ValueError, match="--model.head.action_dim=6 disagrees"):
        resolve_from_meta(cfg, meta)
    cfg.data.views = ("c",)
    with pytest.raises(ValueError, match=r"--data.views \['c'\] not in the dataset"):
        resolve_from_meta(cfg, meta)
    assert section_from_dict(DataConfig, {"views": ["a"]}, "data.").views == ("a",)
    with pytest.raises(ConfigError, match="data.horizon"):
        section_from_dict(DataConfig, {"horizon": "8"}, "data.")


def test_unknown_key_is_rejected():
    d = SensorVLAConfig().to_dict()
    d["train"]["learning_rate"] = 1
    with pytest.raises(ConfigError, match="train.learning_rate"):
        SensorVLAConfig.from_dict(d)


@pytest.mark.parametrize(
    "mutate,flag",
    [
        (lambda c: setattr(c.train, "batch_size", 0), "--train.batch-size"),
        (lambda c: setattr(c.model.head, "type", "gan"), "--model.head.type"),
        (lambda c: setattr(c.model.fusion, "strategy", "sum"), "--model.fusion.strategy"),
        (lambda c: setattr(c.data, "mixture", ("nopath",)), "--data.mixture"),
        (
            lambda c: (setattr(c.model.head, "num_inference_steps", 500), setattr(c.model.head, "type", "diffusion")),
            "--model.head.num-inference-steps",
        ),
    ],
)
def test_validation_names_the_flag(mutate, flag):
    cfg = SensorVLAConfig()
    mutate(cfg)
    with pytest.raises(ConfigError, match=flag.replace(".", r"\.")):
        cfg.validate()


def test_stage2_requires_checkpoint_message():
    cfg = SensorVLAConfig()
    cfg.train.stage = "stage2"
    with pytest.raises(ConfigError, match="Stage 2 training requires --stage1-checkpoint"):
        cfg.validate()


def test_seed_flags_both_spellings():
    a = parse_train_config(
        [
            "--grad_accum",
            "3",
            "--batch_size",
            "5",
            "--dataset_dir",
            "/d",
            "--diffusion_timesteps",
            "50",
            "--sensor_loss_weight",
            "3",
        ],
        "diffusion",
    )
    b = parse_train_config(
        [
            "--grad-accum-steps",
            "3",
            "--batch-size",
            "5",
            "--dataset-dir",
            "/d",
            "--diffusion-timesteps",
            "50",
            "--sensor-loss-weight",
            "3",
        ],
        "diffusion",
    )
    assert a == b
    assert (a.train.grad_accum_steps, a.train.batch_size, a.data.dataset_dir) == (3, 5, "/d")
    assert a.model.head.diffusion_timesteps == 50 and a.train.sensor_loss_weight == 3
    assert a.model.head.type == "diffusion"


def test_seed_defaults_per_stage():
    s1 = parse_train_config(["--training-stage", "stage1"])
    s2 = parse_train_config(["--training-stage", "stage2", "--stage1-checkpoint", "x.pt"])
    assert s1.model.finetune.mode == "none" and s2.model.finetune.mode == "lora"
    assert (s2.model.finetune.lora_r, s2.model.finetune.lora_alpha, s2.model.finetune.lora_dropout) == (16, 32, 0.05)
    assert (s1.train.lr, s1.train.sensor_lr, s1.train.vl_lr) == (1e-4, 5e-4, 1e-5)
    assert s1.model.head.diffusion_timesteps == 100 and s1.train.grad_accum_steps == 8
    assert s1.train.sensor_loss_weight == 2.0 and s1.train.mode == "train"
    off = parse_train_config(["--no-sensor-enabled", "--fusion-strategy", "gated", "--finetune-vl", "full"])
    assert off.model.sensor.enabled is False and off.model.fusion.strategy == "gated"
    assert off.model.finetune.mode == "full"


def test_every_alias_target_exists():
    for target in set(SEED_ALIASES.values()):
        if target.endswith("no-enabled"):
            continue
        value = {"--train.resume": []}.get(target, ["1"])
        args = [target, *value] if target not in ("--model.sensor.enabled",) else [target]
        if target in ("--train.stage",):
            args = [target, "stage1"]
        elif target in ("--train.mode",):
            args = [target, "cache"]
        elif target in ("--model.finetune.mode",):
            args = [target, "none"]
        elif target in ("--model.fusion.strategy",):
            args = [target, "gated"]
        elif target in ("--model.head.type",):
            args = [target, "flow"]
        parse_train_config(args)
    assert rewrite_seed_flags(["--grad_accum=4"]) == ["--train.grad-accum-steps=4"]


def test_imports_touch_nothing(tmp_path):
    """Importing every module reads no file of ours, starts no thread and loads no model."""
    code = (
        "import pkgutil, importlib, sensorvla, threading, json;"
        "mods=[m.name for m in pkgutil.walk_packages(sensorvla.__path__, 'sensorvla.') "
        "if not m.name.endswith(('__main__',)) and m.name not in ('sensorvla.train','sensorvla.train_diffusion')];"
        "[importlib.import_module(m) for m in mods];"
        "print(json.dumps({'n': len(mods), 'threads': threading.active_count()}))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["n"] > 20 and out["threads"] == 1
    assert list(tmp_path.iterdir()) == []


# --- typed loading -----------------------------------------------------------------------------------
def _with(section: str, key: str, value):
    d = SensorVLAConfig().to_dict()
    node = d
    for part in section.split("."):
        node = node[part]
    node[key] = value
    return d


@pytest.mark.parametrize(
    "section,key,value,expected",
    [
        ("model.head", "horizon", "eight", "int"),
        ("model.sensor", "hidden_dim", "256", "int"),
        ("model.head", "horizon", 8.0, "int"),  # a float is not an int
        ("train", "epochs", True, "int"),  # bool is not an int
        ("train", "resume", 1, "bool"),  # nor an int a bool
        ("train", "lr", "1e-4", "float"),
        ("model.backbone", "revision", 3, "str or null"),
        ("data", "views", ["front", 2], "a list of str"),
        ("data", "views", "front", "a list of str"),
        ("model.head", "type", "gan", "one of"),
        ("model.finetune", "mode", True, "one of"),
    ],
)
def test_config_json_type_errors_name_key_type_and_value(section, key, value, expected):
    with pytest.raises(ConfigError) as err:
        SensorVLAConfig.from_json(json.dumps(_with(section, key, value)))
    msg = str(err.value)
    assert f"{section}.{key}" in msg and expected in msg and repr(value) in msg, msg


def test_config_json_accepts_what_the_type_allows():
    d = _with("train", "lr", 1)  # an int where a float is expected is fine, and becomes a float
    d["model"]["backbone"]["revision"] = None
    d["data"]["views"] = ["front", "top"]
    cfg = SensorVLAConfig.from_dict(d)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.model.backbone.revision is None and cfg.data.views == ("front", "top")
    with pytest.raises(ConfigError, match="config section 'model' must be a JSON object"):
        SensorVLAConfig.from_dict({"model": [1, 2]})


def test_validate_type_checks_python_set_values():
    cfg = SensorVLAConfig()
    cfg.model.sensor.hidden_dim = "256"
    with pytest.raises(ConfigError, match=r"model\.sensor\.hidden_dim.*expects int.*'256'"):
        cfg.validate()
    cfg = SensorVLAConfig()
    cfg.train.lr, cfg.data.views = 1, ["a"]
    cfg.validate()
    assert isinstance(cfg.train.lr, float) and cfg.data.views == ("a",)


# --- stage defaults live in validation (Python, JSON and CLI agree) -----------------------------------
def test_stage_defaults_apply_to_python_and_json_configs():
    from sensorvla.config import stage_warnings

    py = SensorVLAConfig()
    py.train.stage, py.train.stage1_checkpoint = "stage2", "s1.pt"
    assert py.validate().model.finetune.mode == "lora"
    d = SensorVLAConfig().to_dict()
    d["train"].update(stage="stage2", stage1_checkpoint="s1.pt")
    del d["model"]["finetune"]["mode"]  # a JSON config that does not say: the stage decides
    assert SensorVLAConfig.from_dict(d).validate().model.finetune.mode == "lora"
    assert SensorVLAConfig().validate().model.finetune.mode == "none"
    cli = parse_train_config(["--training-stage", "stage2", "--stage1-checkpoint", "s1.pt"])
    assert cli.model.finetune.mode == "lora"
    # an explicit `none` in stage 2 is respected, with a warning
    explicit = SensorVLAConfig()
    explicit.train.stage, explicit.train.stage1_checkpoint = "stage2", "s1.pt"
    explicit.model.finetune.mode = "none"
    assert explicit.validate().model.finetune.mode == "none"
    assert any("frozen VL backbone" in w for w in stage_warnings(explicit))
    assert parse_train_config(["--training-stage", "stage2", "--finetune-vl", "none"]).model.finetune.mode == "none"
    s1 = SensorVLAConfig()
    s1.model.finetune.mode = "lora"
    assert any("Stage 1 should use finetune-vl=none" in w for w in stage_warnings(s1.validate()))
    # a checkpoint's config.json (a resolved mode) loads unchanged
    saved = SensorVLAConfig.from_json(explicit.to_json())
    assert saved.model.finetune.mode == "none" and saved == explicit


def test_new_train_flags_parse_and_validate():
    cfg = parse_train_config(["--train.schedule-steps", "50", "--train.progress", "off"])
    assert cfg.train.schedule_steps == 50 and cfg.train.progress == "off"
    with pytest.raises(ConfigError, match="--train.schedule-steps"):
        parse_train_config(["--train.schedule-steps", "-1"]).validate()
    with pytest.raises(SystemExit):
        parse_train_config(["--train.progress", "sometimes"])


# --- the `sensorvla` dispatcher (cli/app.py: one tyro SubcommandApp over the command groups) ----------------
EVERY_COMMAND = [
    ["train"],
    ["plan"],
    ["demo"],
    ["tiny-model"],
    ["data", "synth"],
    ["data", "import-recorder"],
    ["data", "import-hdf5"],
    ["data", "add-sensor"],
    ["stats"],
    ["serve"],
    ["eval"],
    ["rollout"],
    ["bench", "latency"],
    ["bench", "sim"],
]


@pytest.mark.parametrize("command", EVERY_COMMAND, ids=" ".join)
def test_every_command_line_is_dispatched(command, capsys):
    from sensorvla.cli import main

    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"sensorvla {' '.join(command)}" in out  # the leaf's own usage line, not the top-level one


def test_dispatcher_errors_and_top_level_help(capsys):
    from sensorvla.cli import main

    assert main([]) == 0 and "data" in capsys.readouterr().out
    assert main(["fly"]) == 2
    assert main(["data", "synth"]) == 2  # --out is required
    assert "--out" in capsys.readouterr().err
    assert main(["train", "--batch_size", "0"]) == 2  # seed spelling rewritten, then validated
    assert "--train.batch-size must be > 0" in capsys.readouterr().err
    # the seed aliases apply to train/plan only: `demo --head` keeps its own meaning
    assert main(["demo", "--head", "nope"]) == 2


def test_dispatcher_calls_the_leaf_with_its_arguments(tmp_path):
    from sensorvla.cli import main
    from sensorvla.data.format import load_meta

    out = tmp_path / "ds"
    args = ["data", "synth", "--out", str(out), "--episodes", "2", "--image-size", "32", "--image-format", "npy"]
    assert main([*args, "--sensor-channels", "5"]) == 0
    meta = load_meta(out)
    assert meta.sensor_channels == 5 and len(meta.episodes) == 2 and meta.image_shape[:2] == [32, 32]


def test_train_resume_parses_the_flags_over_the_saved_run(tmp_path, monkeypatch, capsys):
    """`sensorvla train --resume`: the saved config is the default, the command line changes only what it names."""
    import sensorvla.cli.train as train_cli
    from sensorvla.cli import main

    saved = SensorVLAConfig()
    saved.model.head.type, saved.train.lr, saved.train.batch_size = "flow", 0.5, 3
    last = tmp_path / "checkpoints" / "last"
    last.mkdir(parents=True)
    (last / "config.json").write_text(saved.to_json())
    seen = []
    monkeypatch.setattr(train_cli, "run_train", lambda cfg, reference=None: seen.append(cfg) or 0)
    assert main(["train", "--resume", "--output-dir", str(tmp_path), "--lr", "0.25"]) == 0
    (cfg,) = seen
    assert (cfg.model.head.type, cfg.train.batch_size, cfg.train.lr, cfg.train.resume) == ("flow", 3, 0.25, True)
    assert cfg == parse_train_config(["--resume", "--output-dir", str(tmp_path), "--lr", "0.25"])
    (last / "config.json").write_text("{not json")
    assert main(["train", "--resume", "--output-dir", str(tmp_path)]) == 2
    assert "the saved run's config" in capsys.readouterr().err


def test_import_flags_reach_the_importer(tmp_path):
    """`data import-hdf5` takes the shared importer flags unprefixed (`--views`, `--image-size`, ...)."""
    from sensorvla.cli import main
    from sensorvla.data.format import load_meta
    from sensorvla.world.examples import export_hdf5_example

    src = tmp_path / "ex"
    export_hdf5_example(src, num_episodes=2, image_size=16, sensor_channels=3)
    out = tmp_path / "ds"
    args = ["--src", str(src), "--out", str(out), "--views", "front", "--image-size", "8", "--image-format", "npy"]
    assert main(["data", "import-hdf5", *args, "--instruction", "touch the surface"]) == 0
    meta = load_meta(out)
    assert meta.views == ["front"] and meta.image_shape[:2] == [8, 8] and meta.tasks == ["touch the surface"]
    assert main(["data", "import-hdf5", *args]) == 1  # exists: refused without --overwrite
    assert main(["data", "import-hdf5", *args, "--overwrite"]) == 0


def test_import_image_size_takes_a_side_or_height_and_width(tmp_path):
    """`--image-size N` (square) as before, or `--image-size H W` like the library's `image_size=(h, w)`."""
    from sensorvla.cli import main
    from sensorvla.data.format import load_meta
    from sensorvla.world.examples import export_hdf5_example

    src = tmp_path / "ex"
    export_hdf5_example(src, num_episodes=1, image_size=16, sensor_channels=3)
    args = ["--src", str(src), "--image-format", "npy"]
    assert main(["data", "import-hdf5", *args, "--out", str(tmp_path / "a"), "--image-size", "8"]) == 0
    assert main(["data", "import-hdf5", *args, "--out", str(tmp_path / "b"), "--image-size", "8", "12"]) == 0
    assert load_meta(tmp_path / "a").image_shape[:2] == [8, 8] and load_meta(tmp_path / "b").image_shape[:2] == [8, 12]


def test_presets_through_the_dispatcher(monkeypatch, capsys):
    """`sensorvla train|plan --preset NAME`: the preset is the default the flags override; a bad name exits 2."""
    import sensorvla.cli.train as train_cli
    from sensorvla.cli import main
    from sensorvla.presets import preset_config

    seen = []
    monkeypatch.setattr(train_cli, "run_train", lambda cfg, reference=None: seen.append(cfg) or 0)
    assert main(["train", "--preset", "seed-regression-stage2", "--lr", "5e-5", "--dataset-dir", "/d"]) == 0
    (cfg,) = seen
    want = preset_config("seed-regression-stage2")
    assert (cfg.train.stage, cfg.train.epochs, cfg.train.lr) == (want.train.stage, want.train.epochs, 5e-5)
    assert cfg == parse_train_config(["--preset", "seed-regression-stage2", "--lr", "5e-5", "--dataset-dir", "/d"])
    assert main(["train", "--preset", "nope"]) == 2
    assert "--preset 'nope' is not a preset" in capsys.readouterr().err
    assert main(["plan", "--preset"]) == 2
    assert "--preset needs a name" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "changed"),
    [
        (
            ["--preset", "seed-regression-stage2", "--lr", "5e-5", "--dataset-dir", "/d"],
            {"train.lr", "data.dataset_dir"},
        ),
        (["--batch_size", "3", "--model.head.type", "flow"], {"train.batch_size", "model.head.type"}),
        # stage 2's default finetune mode (auto -> lora) is no change; the stage and its checkpoint are
        (
            ["--train.stage", "stage2", "--train.stage1-checkpoint", "/s1.pt"],
            {"train.stage", "train.stage1_checkpoint"},
        ),
        (["--preset", "demo"], set()),
    ],
)
def test_config_diff_names_exactly_the_flags_given(monkeypatch, argv, changed):
    """The start of a run logs what differs from the command's preset or defaults: exactly the flags given."""
    import sensorvla.cli.train as train_cli
    from sensorvla.cli import main
    from sensorvla.config import config_changes, describe_changes

    seen = []
    monkeypatch.setattr(train_cli, "run_train", lambda cfg, reference=None: seen.append((cfg, reference)) or 0)
    assert main(["train", *argv]) == 0
    ((cfg, reference),) = seen
    changes = config_changes(cfg, reference)
    assert set(changes) == changed
    text = describe_changes(changes)
    assert len(text.splitlines()) == 1 + len(changed)
    if "train.lr" in changed:
        assert changes["train.lr"] == (1e-4, 5e-5) and "  --train.lr 5e-05 (was 0.0001)" in text
    assert config_changes(SensorVLAConfig()) == {}


def _field_docs(cls, prefix: str = "") -> dict[str, tuple[str, str]]:
    """Every leaf field of a config dataclass tree -> (its flag, its own `#:` comment), read from the source."""
    import ast
    import dataclasses
    import inspect
    import textwrap

    source = textwrap.dedent(inspect.getsource(cls)).split("\n")
    node = ast.parse("\n".join(source)).body[0]
    line_of = {s.target.id: s.lineno for s in node.body if isinstance(s, ast.AnnAssign)}
    hints = typing_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_field_docs(hints[f.name], name + "."))
            continue
        doc, i = [], line_of[f.name] - 2
        while i >= 0 and source[i].strip().startswith("#:"):
            doc.insert(0, source[i].strip()[2:].strip())
            i -= 1
        out[name] = ("--" + name.replace("_", "-"), " ".join(doc))
    return out


def typing_hints(cls) -> dict:
    """The resolved annotations of a dataclass (config.py uses postponed annotations)."""
    import typing

    return typing.get_type_hints(cls)


def test_every_train_flag_help_is_its_own_fields_doc():
    """Issue 19: `sensorvla train --help` showed another field's comment for eight flags (tyro carries a comment
    block over to the next field that has none). Every flag's help must be its own field's `#:` comment, and
    every field must have one."""
    import re
    import warnings

    import tyro

    from sensorvla.cli.train import base_train_config

    docs = _field_docs(SensorVLAConfig)
    undocumented = sorted(k for k, (_, doc) in docs.items() if not doc)
    assert not undocumented, f"add a `#:` comment above each of these config fields: {undocumented}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        parser = tyro.extras.get_parser(SensorVLAConfig, default=base_train_config())
    helps = {}
    for action in parser._actions:
        for opt in action.option_strings:
            helps[opt] = " ".join(re.sub(r"\s*\(default: .*\)\s*$", "", action.help or "", flags=re.S).split())

    def negation(flag: str) -> str:
        return "--{}no-{}".format(*re.match(r"--((?:[\w-]+\.)*)([\w-]+)$", flag).groups())

    flags = {flag: " ".join(doc.split()) for flag, doc in docs.values()}
    flags.update({negation(f): doc for f, doc in flags.items() if negation(f) in helps})  # --x.no-y: x.y's doc
    assert set(helps) - {"-h", "--help"} - set(flags) == set()  # every flag is a field's
    wrong = {flag: (helps.get(flag), doc) for flag, doc in flags.items() if helps.get(flag) != doc}
    assert not wrong, f"flags whose help is not their own field's doc (help, doc): {wrong}"
