"""The run configuration: one typed schema, a YAML file, `key.sub=value` overrides.

Defaults live here, an experiment's values in its YAML file, and the command line
overrides both. Unknown keys are refused with the closest valid key suggested, and
the resolved config is written to the run folder so a run can always be repeated.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A user's configuration cannot be used; the message says which key and how to fix it."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    name: str = Field("run", description="Run name; the run folder is output_dir/name.")
    output_dir: Path = Field(Path("runs"), description="Folder that holds run folders.")
    seed: int = Field(0, description="Seeds weights, shard order and augmentation.")
    log_every_steps: int = Field(10, ge=1, description="Steps between two log lines.")


class AugmentConfig(Section):
    random_resized_crop: bool = Field(True, description="Random crop and resize (train only).")
    crop_scale: tuple[float, float] = Field(
        (0.5, 1.0), description="Area range kept by the random crop, as fractions."
    )
    hflip: bool = Field(True, description="Random horizontal flip (train only).")
    blur_prob: float = Field(0.0, ge=0, le=1, description="Chance of a Gaussian blur.")
    blur_sigma: tuple[float, float] = Field((0.0, 3.0), description="Blur sigma range, pixels.")
    jpeg_prob: float = Field(0.0, ge=0, le=1, description="Chance of a JPEG re-encode.")
    jpeg_quality: tuple[int, int] = Field((30, 100), description="JPEG quality range.")


class DataConfig(Section):
    train: str | None = Field(
        None, description="Training shards: a shard folder, its manifest.json, or a pattern."
    )
    eval: dict[str, str] = Field(
        default_factory=dict, description="Named evaluation shard sets, name: shards."
    )
    image_size: int = Field(224, ge=8, description="Side of the square model input, pixels.")
    eval_resize_ratio: float = Field(
        1.0, ge=1.0, description="Eval resizes the short side to image_size*ratio, then crops."
    )
    batch_size: int = Field(32, ge=1, description="Samples per process per step.")
    num_workers: int = Field(2, ge=0, description="Loader worker processes per rank.")
    shuffle_buffer: int = Field(
        1000, ge=0, description="Encoded samples held for shuffling, per worker (0: off)."
    )
    mean: tuple[float, float, float] = Field((0.485, 0.456, 0.406), description="RGB mean.")
    std: tuple[float, float, float] = Field((0.229, 0.224, 0.225), description="RGB std.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    on_bad_sample: Literal["skip", "strict"] = Field(
        "skip", description="Bad sample or unreadable shard: skip (count, log, go on) or strict."
    )
    max_bad_fraction: float = Field(
        0.01, ge=0, lt=1, description="Stop when more of a rank's reads in an epoch are bad."
    )
    resampled: bool = Field(
        False, description="Draw training shards with replacement (approximate epochs)."
    )
    draft_decode: bool = Field(
        True, description="Decode large JPEGs at a reduced size still covering the crop."
    )
    cache_dir: Path | None = Field(
        None, description="Folder caching remote (http(s)/s3/gs) shards; null: stream them."
    )
    fetch_timeout_s: float = Field(
        60.0, gt=0, description="Seconds to wait on one remote shard request (manifests: 60)."
    )


class ModelConfig(Section):
    arch: Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"] = Field(
        "resnet50", description="torchvision ResNet variant."
    )
    num_classes: int = Field(1, ge=1, description="Outputs of the head (logits).")
    weights: Path | None = Field(
        None, description="Local file of initial weights (state dict); never downloaded."
    )
    init_bias_from_prior: bool = Field(
        False, description="Start the head's bias at the class prior (log-odds), for imbalance."
    )


LossName = Literal["bce_with_logits", "bce", "cross_entropy"]


class LossConfig(Section):
    name: LossName = Field("bce_with_logits", description="Loss; see docs/heads-and-losses.md.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross_entropy only.")
    pos_weight: float | list[float] | Literal["auto"] | None = Field(
        None,
        description="BCE losses: weight of positives; a number (one logit), a list of K "
        "(multi-label), or auto (negatives / positives from the shard manifest).",
    )
    class_weights: list[float] | None = Field(None, description="Per-class weights (CE).")


class OptimConfig(Section):
    name: Literal["sgd", "adamw"] = Field("adamw", description="Optimizer.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.05, ge=0, description="Decoupled (AdamW) or L2 (SGD).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    warmup_fraction: float = Field(
        0.05, ge=0, lt=1, description="Share of all steps spent warming the LR up linearly."
    )
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final LR as a share of lr.")


class TrainConfig(Section):
    epochs: int = Field(1, ge=1, description="Passes over the training shards.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="Autocast dtype; bf16 needs a GPU to be fast."
    )
    grad_clip_norm: float | None = Field(None, gt=0, description="Clip gradients to this norm.")
    eval_every_epochs: int = Field(1, ge=1, description="Epochs between evaluations.")
    keep_checkpoints: int = Field(
        2, ge=1, description="Checkpoints kept in the run folder (the newest ones)."
    )
    checkpoint_every_steps: int = Field(
        0, ge=0, description="Also checkpoint every N global steps, mid-epoch (0: epoch ends "
        "only). A stop signal (SIGUSR1/SIGTERM) always saves one.",
    )


class EvalConfig(Section):
    threshold: float = Field(
        0.5, gt=0, lt=1, description="Positive-class probability threshold (binary)."
    )
    batch_size: int | None = Field(None, ge=1, description="Eval batch size (data.batch_size).")
    calibrate: Literal["none", "balanced_accuracy", "target_fpr"] = Field(
        "balanced_accuracy",
        description="Binary: how to choose a second threshold on calibration_set.",
    )
    target_fpr: float = Field(0.05, gt=0, lt=1, description="False-positive rate for target_fpr.")
    calibration_set: str | None = Field(
        None, description="Eval set that chooses the threshold (default: the first one)."
    )


class WandbConfig(Section):
    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="auto: WANDB_MODE if set, online with an API key, else offline."
    )
    project: str = Field("pipeline", description="wandb project.")
    entity: str | None = Field(None, description="wandb entity (team or user).")
    group: str | None = Field(None, description="wandb group.")
    tags: list[str] = Field(default_factory=list, description="wandb tags.")
    # Capped well below the process group's 30 min timeout: the other ranks wait meanwhile
    init_timeout_s: float = Field(
        60.0, gt=0, le=600,
        description="Seconds wandb may take to start online; then the run logs offline.",
    )


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)

    @property
    def run_dir(self) -> Path:
        return self.run.output_dir / self.run.name


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file, apply `key.sub=value` overrides, validate; raise ConfigError."""
    raw = _read_yaml(Path(path)) if path is not None else {}
    for override in overrides:
        _apply_override(raw, override)
    _check_keys(raw, Config, prefix="")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err, path)) from None


def save_config(config: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; give the path of a YAML file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections at the top")
    return data


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} is not of the form key.sub=value")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} holds a value, not a section")
        node = child
    node[leaf] = _parse_override_value(text, [*parents, leaf], override)


def _parse_override_value(text: str, path: list[str], override: str) -> Any:
    if not text.strip():
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or err
        message = f"override {override!r}: the value is not valid YAML ({problem})"
        raise ConfigError(message) from None
    # A text field keeps the text as typed: run.name=001 must not become the number 1.
    if not isinstance(value, (str, list, dict)) and value is not None and _is_text_field(path):
        return text.strip()
    return value


def _is_text_field(path: list[str]) -> bool:
    schema: type[BaseModel] | None = Config
    for part in path[:-1]:
        info = schema.model_fields.get(part)
        schema = _section_type(info.annotation) if info else None
        if schema is None:
            return False
    info = schema.model_fields.get(path[-1])
    return info is not None and info.annotation in (str, str | None)


def _check_keys(raw: Any, schema: type[BaseModel], prefix: str) -> None:
    if not isinstance(raw, dict):
        return
    fields = schema.model_fields
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(_unknown_key_message(dotted, prefix, fields))
        section = _section_type(fields[key].annotation)
        if section is not None:
            _check_keys(value, section, prefix=f"{dotted}.")


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is not None:
        for arg in get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return None


def _unknown_key_message(dotted: str, prefix: str, fields: dict[str, Any]) -> str:
    valid = [f"{prefix}{name}" for name in fields]
    close = difflib.get_close_matches(dotted, valid, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
    return f"unknown config key {dotted!r}; {hint}"


def _describe(err: ValidationError, path: Any) -> str:
    lines = []
    for item in err.errors():
        key = ".".join(str(part) for part in item["loc"])
        value = item.get("input")
        lines.append(f"config key {key!r} = {value!r}: {item['msg']}")
    where = f" in {path}" if path else ""
    return f"invalid config{where}:\n  " + "\n  ".join(lines)


def reference_markdown() -> str:
    """The config reference (docs/config.md), generated from the schema itself."""
    lines = [
        "# Config reference",
        "",
        "Generated by `python -m pipeline.config` from `pipeline/config.py`; do not edit.",
        "Every key can be set in the YAML file or on the command line as `key.sub=value`.",
    ]
    for name, info in Config.model_fields.items():
        lines += ["", f"## `{name}`", "", "| key | default | meaning |", "|---|---|---|"]
        lines += _reference_rows(info.annotation, name)
    return "\n".join(lines) + "\n"


def _reference_rows(schema: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, info in schema.model_fields.items():
        key = f"{prefix}.{name}"
        section = _section_type(info.annotation)
        if section is not None:
            rows += _reference_rows(section, key)
            continue
        default = info.get_default(call_default_factory=True)
        shown = default.value if hasattr(default, "value") else default
        text = (info.description or "").replace("|", "\\|")
        rows.append(f"| `{key}` | `{_yaml_value(shown)}` | {text} |")
    return rows


def _yaml_value(value: Any) -> str:
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


if __name__ == "__main__":
    import sys

    sys.stdout.write(reference_markdown())
