"""The config: YAML loading, `key.sub=value` overrides, errors that name the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import Config, ConfigError, load_config, save_config

EXPERIMENT = """
run:
  name: faces
  seed: 3
data:
  train: shards/train
  eval: {val: shards/val}
  image_size: 64
  augment: {hflip: false, crop_scale: [0.3, 1.0]}
model: {arch: resnet18, num_classes: 2}
optim: {name: sgd, lr: 0.1}
"""


@pytest.fixture()
def experiment(tmp_path: Path) -> Path:
    path = tmp_path / "faces.yaml"
    path.write_text(EXPERIMENT)
    return path


def test_yaml_values_are_typed_and_defaults_fill_the_rest(experiment):
    config = load_config(experiment)
    assert config.run.name == "faces" and config.run.seed == 3
    assert config.data.eval == {"val": "shards/val"}
    assert config.data.augment.hflip is False
    assert config.data.augment.crop_scale == (0.3, 1.0)
    assert config.model.arch == "resnet18" and config.model.num_classes == 2
    assert config.optim.lr == 0.1 and config.optim.weight_decay == 0.05
    assert config.run_dir == Path("runs") / "faces"


def test_no_file_gives_the_defaults():
    assert load_config(None) == Config()


@pytest.mark.parametrize(
    "override, read, expected",
    [
        ("optim.lr=0.5", lambda c: c.optim.lr, 0.5),
        ("optim.lr=1e-3", lambda c: c.optim.lr, 0.001),
        ("data.augment.hflip=true", lambda c: c.data.augment.hflip, True),
        ("wandb.tags=[a, b]", lambda c: c.wandb.tags, ["a", "b"]),
        ("data.eval={test: t/, ood: o/}", lambda c: c.data.eval, {"test": "t/", "ood": "o/"}),
        ("train.grad_clip_norm=null", lambda c: c.train.grad_clip_norm, None),
        ("train.grad_clip_norm=", lambda c: c.train.grad_clip_norm, None),
        ("data.augment.crop_scale=[0.2, 0.9]", lambda c: c.data.augment.crop_scale, (0.2, 0.9)),
        ("run.name=001", lambda c: c.run.name, "001"),  # text stays text
        ("wandb.group=2024", lambda c: c.wandb.group, "2024"),
        ("data.train=shards/a b", lambda c: c.data.train, "shards/a b"),
    ],
)
def test_overrides_are_typed(experiment, override, read, expected):
    assert read(load_config(experiment, [override])) == expected


def test_overrides_win_over_the_file_and_keep_its_other_keys(experiment):
    config = load_config(experiment, ["optim.lr=0.01", "data.augment.hflip=true"])
    assert config.optim.lr == 0.01 and config.optim.name == "sgd"
    assert config.data.augment.hflip is True
    assert config.data.augment.crop_scale == (0.3, 1.0)


def test_later_overrides_win(experiment):
    assert load_config(experiment, ["run.seed=1", "run.seed=2"]).run.seed == 2


@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("optim.lrr=0.1", "did you mean 'optim.lr'"),
        ("modle.num_classes=3", "did you mean 'model'"),
        ("data.augment.hfilp=false", "did you mean 'data.augment.hflip'"),
    ],
)
def test_unknown_key_suggests_the_closest(experiment, override, suggestion):
    with pytest.raises(ConfigError, match=f"unknown config key .*; {suggestion}"):
        load_config(experiment, [override])


def test_unknown_key_in_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="'optim.learning_rate'"):
        load_config(path)


def test_unknown_key_without_a_close_one_lists_the_valid_keys():
    with pytest.raises(ConfigError, match="valid keys: run, data, model"):
        load_config(None, ["zzz=1"])


@pytest.mark.parametrize(
    "override, key, shown",
    [
        ("optim.lr=abc", "optim.lr", "'abc'"),
        ("optim.lr=-1", "optim.lr", "-1"),
        ("model.num_classes=2.5", "model.num_classes", "2.5"),
        ("model.arch=resnet51", "model.arch", "'resnet51'"),
    ],
)
def test_type_error_names_the_key_and_value(experiment, override, key, shown):
    with pytest.raises(ConfigError) as err:
        load_config(experiment, [override])
    assert f"config key '{key}' = {shown}:" in str(err.value)
    assert str(experiment) in str(err.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr", "not of the form key.sub=value"),
        ("=3", "not of the form key.sub=value"),
        ("wandb.tags=[a, b", "the value is not valid YAML"),
        ("optim.lr.max=1", "'lr' holds a value, not a section"),
    ],
)
def test_override_syntax_errors(experiment, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(experiment, [override])


@pytest.mark.parametrize(
    "text, message",
    [
        ("- a\n- b\n", "must hold a mapping"),
        ("run: {name: [unclosed\n", "is not valid YAML"),
    ],
)
def test_bad_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_save_config_round_trip(experiment, tmp_path):
    config = load_config(experiment, ["wandb.tags=[x]", "model.weights=w/init.pt"])
    path = tmp_path / "run" / "config.yaml"
    save_config(config, path)
    assert load_config(path) == config
    saved = yaml.safe_load(path.read_text())
    assert saved["model"]["weights"] == "w/init.pt" and saved["wandb"]["tags"] == ["x"]
