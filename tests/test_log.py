"""pipeline.log as units: the wandb mode and start-up fallback (with a stand-in wandb
module), the progress line and its ETAs, the loader-bottleneck warning, the
metrics file, and what a run records about its code and data.

Real wandb runs are in test_wandb.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import types
from pathlib import Path

import pytest

from pipeline import log as plog
from pipeline.config import load_config
from pipeline.data.shards import resolve_shards

# --- the wandb mode is decided before init ----------------------------------------


@pytest.mark.parametrize(
    ("mode", "env", "expected"),
    [
        ("offline", {"WANDB_MODE": "online", "WANDB_API_KEY": "k"}, "offline"),
        ("disabled", {}, "disabled"),
        ("auto", {"WANDB_MODE": "disabled", "WANDB_API_KEY": "k"}, "disabled"),
        ("auto", {"WANDB_MODE": "dryrun"}, "offline"),
        ("auto", {"WANDB_API_KEY": "k"}, "online"),
        ("auto", {}, "offline"),
        ("auto", {"WANDB_MODE": " Offline "}, "offline"),
    ],
)
def test_resolve_wandb_mode(monkeypatch, mode, env, expected):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert plog.resolve_wandb_mode(mode) == expected


class FakeWandb(types.ModuleType):
    """Stands in for the wandb module: records init calls, fails online ones on request."""

    def __init__(self, fail_online: bool) -> None:
        super().__init__("wandb")
        self.fail_online = fail_online
        self.inits: list[dict] = []
        self.teardowns = 0

    def Settings(self, **kwargs):  # noqa: N802 - mirrors wandb.Settings
        return kwargs

    def init(self, **kwargs):
        self.inits.append(kwargs)
        if kwargs["mode"] == "online" and self.fail_online:
            raise TimeoutError("context deadline exceeded\nwhile retrying: connect refused")
        return types.SimpleNamespace(id=kwargs["id"], dir="/nowhere/run/files")

    def teardown(self):
        self.teardowns += 1


@pytest.fixture
def fake_wandb(monkeypatch, tmp_path):
    def install(fail_online: bool) -> FakeWandb:
        module = FakeWandb(fail_online)
        monkeypatch.setitem(sys.modules, "wandb", module)
        for key in ("WANDB_MODE", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR",
                    "WANDB_ARTIFACT_DIR", "WANDB_ERROR_REPORTING", "WANDB_SILENT"):
            # set, then delete: monkeypatch then removes what start_wandb sets
            monkeypatch.setenv(key, "")
            monkeypatch.delenv(key)
        return module

    return install


def online_config(timeout_s: float = 7):
    return load_config(None, ["wandb.mode=online", f"wandb.init_timeout_s={timeout_s}",
                              "wandb.project=p", "wandb.group=g", "wandb.tags=[a, b]",
                              "run.name=r"])


def test_failed_online_start_falls_back_offline_with_one_warning(
        fake_wandb, monkeypatch, tmp_path, caplog):
    wandb = fake_wandb(fail_online=True)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    run = plog.start_wandb(online_config(), tmp_path, "abc123", {"code": {"git": "x"}})
    assert run.id == "abc123"
    assert [i["mode"] for i in wandb.inits] == ["online", "offline"]
    assert wandb.teardowns == 1  # the failed run's id is freed for the offline one
    assert all(i["id"] == "abc123" and i["resume"] == "allow" for i in wandb.inits)
    assert wandb.inits[0]["settings"]["init_timeout"] == 7
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "could not start online within 7 s" in warnings[0]
    assert "context deadline exceeded" in warnings[0] and "retrying" not in warnings[0]


def test_start_wandb_passes_names_config_and_run_info(fake_wandb, monkeypatch, tmp_path):
    wandb = fake_wandb(fail_online=False)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    plog.start_wandb(online_config(), tmp_path, "abc123", {"code": {"git": "x"}})
    (init,) = wandb.inits
    assert (init["project"], init["group"], init["tags"], init["name"]) == \
        ("p", "g", ["a", "b"], "r")
    assert init["config"]["run_info"] == {"code": {"git": "x"}}
    assert init["config"]["wandb"]["init_timeout_s"] == 7
    assert init["dir"] == str(tmp_path)
    assert init["settings"]["silent"] is True


def test_wandb_files_and_settings_stay_in_the_run_folder(fake_wandb, monkeypatch, tmp_path):
    fake_wandb(fail_online=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    plog.start_wandb(load_config(None, ["wandb.mode=offline"]), tmp_path, "abc123")
    for key in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        assert Path(os.environ[key]).is_relative_to(tmp_path / "wandb"), key
    assert os.environ["WANDB_ERROR_REPORTING"] == "false"
    assert os.environ["WANDB_SILENT"] == "true"


def test_online_without_key_logs_offline(fake_wandb, monkeypatch, tmp_path, caplog):
    wandb = fake_wandb(fail_online=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    plog.start_wandb(online_config(), tmp_path, "abc123")
    assert [i["mode"] for i in wandb.inits] == ["offline"]
    assert "WANDB_API_KEY is unset" in caplog.text


def test_disabled_starts_nothing(fake_wandb, tmp_path):
    wandb = fake_wandb(fail_online=False)
    config = load_config(None, ["wandb.mode=disabled"])
    assert plog.start_wandb(config, tmp_path / "run", "abc123") is None
    assert wandb.inits == [] and not (tmp_path / "run").exists()


def test_init_timeout_is_bounded_in_the_config():
    from pipeline.config import ConfigError

    assert load_config(None, []).wandb.init_timeout_s == 60
    with pytest.raises(ConfigError, match="wandb.init_timeout_s"):
        load_config(None, ["wandb.init_timeout_s=3600"])


# --- the progress line --------------------------------------------------------------


def test_step_line_has_every_field_with_units():
    line = plog.step_line({
        "epoch": 2, "epochs": 5, "step": 10, "steps": 20, "loss": 0.31204, "lr": 8.123e-4,
        "images_per_s": 36.44, "step_s": 0.2195, "data_wait_pct": 2.4, "memory_gib": 0.612,
        "eval_eta": "0:00:12", "eta": "0:03:41",
    })
    assert line == (
        "epoch 2/5 step 10/20 | loss 0.3120 | lr 8.12e-04 | 36.4 img/s | 0.220 s/step | "
        "data 2% | mem 0.61 GiB | eval in 0:00:12 | eta 0:03:41"
    )


@pytest.mark.parametrize(
    ("epoch", "step", "until", "expected"),
    [(1, 5, 1, 15), (1, 20, 1, 0), (2, 5, 3, 35), (3, 20, 3, 0)],
)
def test_steps_left(epoch, step, until, expected):
    assert plog.steps_left(epoch, step, 20, until) == expected


@pytest.mark.parametrize(
    ("epoch", "every", "epochs", "expected"),
    [(1, 1, 5, 1), (1, 2, 5, 2), (2, 2, 5, 2), (3, 2, 5, 4), (5, 2, 5, 5), (4, 3, 5, 5)],
)
def test_next_eval_epoch_matches_the_trainer_rule(epoch, every, epochs, expected):
    # train.py evaluates after epoch e when e % every == 0 or e == epochs
    assert plog.next_eval_epoch(epoch, every, epochs) == expected
    evaluated = [e for e in range(epoch, epochs + 1) if e % every == 0 or e == epochs]
    assert evaluated[0] == expected


def test_format_duration():
    assert plog.format_duration(3725.9) == "1:02:05"
    assert plog.format_duration(-3) == "0:00:00"


# --- the loader-bottleneck warning ------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_data_wait_warning_names_numbers_and_remedies():
    watch = plog.DataWaitWatch(threshold_pct=20, min_steps=20, every_s=600, clock=Clock())
    assert watch.add(wait_s=5, total_s=10, steps=10, num_workers=2) is None  # too few steps
    message = watch.add(wait_s=5, total_s=10, steps=10, num_workers=2, draft_decode=False)
    assert "50% of the time over the last 20 steps (10.0 of 20.0 s" in message
    for remedy in ("data.num_workers, now 2", "smaller stored images", "data.draft_decode"):
        assert remedy in message
    # A remedy already in place is not offered
    again = plog.bottleneck_message(50, 10, 20, 20, num_workers=2, draft_decode=True)
    assert "draft_decode" not in again


def test_data_wait_warning_is_rate_limited_and_quiet_below_threshold():
    clock = Clock()
    watch = plog.DataWaitWatch(threshold_pct=20, min_steps=10, every_s=600, clock=clock)
    assert watch.add(1, 10, 10, 1) is None  # 10%: fine
    assert watch.add(5, 10, 10, 1) is not None
    clock.now += 599
    assert watch.add(5, 10, 10, 1) is None  # within the quiet interval
    clock.now += 2
    assert watch.add(5, 10, 10, 1) is not None


# --- metrics.jsonl and the wandb side ------------------------------------------------


class FakeRun:
    def __init__(self, fail: bool = False) -> None:
        self.logged: list[tuple[dict, int]] = []
        self.fail = fail
        self.exit_code = None

    def log(self, items, step):
        if self.fail:
            raise ConnectionError("service gone")
        self.logged.append((dict(items), step))

    def finish(self, exit_code=0):
        self.exit_code = exit_code


def test_metrics_file_and_wandb_get_the_same_scalars(tmp_path):
    run = FakeRun()
    metrics = plog.MetricsLogger(tmp_path / "metrics.jsonl", run)
    metrics.log({"train/loss": 0.5, "perf/images_per_s": 12.25}, step=5)
    metrics.log_media({"eval/val/pr_curve": object()}, step=5)
    metrics.close()
    (line,) = [json.loads(t) for t in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert line["step"] == 5 and isinstance(line["time"], float)
    assert {k: v for k, v in line.items() if k not in ("step", "time")} == run.logged[0][0]
    assert [step for _, step in run.logged] == [5, 5]
    assert run.exit_code == 0


def test_a_wandb_failure_warns_once_and_the_file_goes_on(tmp_path, caplog):
    metrics = plog.MetricsLogger(tmp_path / "metrics.jsonl", FakeRun(fail=True))
    for step in (1, 2, 3):
        metrics.log({"train/loss": 1.0}, step=step)
    metrics.close()
    assert caplog.text.count("wandb stopped logging") == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_run_that_raises_is_marked_failed(tmp_path):
    run = FakeRun()
    metrics = plog.MetricsLogger(tmp_path / "metrics.jsonl", run)
    with pytest.raises(RuntimeError):
        try:
            raise RuntimeError("a step failed")
        finally:
            metrics.close()
    assert run.exit_code == 1


def test_other_ranks_write_no_file():
    metrics = plog.MetricsLogger(None)
    metrics.log({"train/loss": 1.0}, step=1)
    metrics.close()


# --- what a run was made from ----------------------------------------------------------


def test_code_version_has_the_package_and_the_commit():
    info = plog.code_version()
    assert info["package"]
    repo = Path(plog.__file__).resolve().parents[1]
    if (repo / ".git").exists():
        assert info["git"] and isinstance(info["git_modified"], bool)


def test_shard_set_checksums(faces_shards):
    train = resolve_shards(str(faces_shards / "train"))
    info = plog.describe_shard_set(train)
    manifest = (faces_shards / "train" / "manifest.json").read_bytes()
    assert info["manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
    assert (info["num_shards"], info["num_samples"]) == (4, 160)
    first = resolve_shards(str(faces_shards / "train" / "faces-train-000000.tar"))
    part = plog.describe_shard_set(first)
    assert part["manifest_sha256"] == info["manifest_sha256"]
    assert part["shards_sha256"] != info["shards_sha256"]  # a subset has its own digest
