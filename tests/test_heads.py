"""Every valid head/loss/label combination trains on real data (the bundled digits).

Multiclass: the ten digits with cross-entropy. Multi-label: two labels built from
each digit, "is even" and "is greater than 4", with both BCE losses. A small
ResNet keeps these quick (3 epochs: well above chance, short of converged); the head
and loss code is the same for every backbone.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.writer import ShardSample, write_shard_set

REPO = Path(__file__).resolve().parents[1]


def digit_samples(indices, images, targets, multilabel: bool):
    for i in indices:
        buffer = io.BytesIO()
        Image.fromarray(np.rint(images[i] * 255 / 16).astype(np.uint8)).save(buffer, "PNG")
        digit = int(targets[i])
        label = [int(digit % 2 == 0), int(digit > 4)] if multilabel else digit
        yield ShardSample(buffer.getvalue(), "png", label, {"digit": digit})


@pytest.fixture(scope="module", params=["multiclass", "multilabel"])
def digits(request, tmp_path_factory) -> tuple[str, Path]:
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    multilabel = request.param == "multilabel"
    names = ["even", "greater_than_4"] if multilabel else [str(d) for d in range(10)]
    root = tmp_path_factory.mktemp(request.param)
    for split, part in (("train", order[:1400]), ("val", order[1400:])):
        samples = digit_samples(part, data.images, data.target, multilabel)
        write_shard_set(samples, root / split, f"digits-{split}", names, maxcount=400)
    return request.param, root


def train(digits_root: Path, out: Path, *overrides: str) -> dict:
    args = [sys.executable, "-m", "pipeline.train", str(REPO / "configs" / "digits.yaml"),
            f"data.train={digits_root / 'train'}", f"data.eval.val={digits_root / 'val'}",
            f"run.output_dir={out}", "run.name=heads", "model.arch=resnet18",
            "train.epochs=3", "wandb.mode=disabled", *overrides]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "heads" / "eval_results.json").read_text())["val"]


@pytest.mark.slow
@pytest.mark.timeout(650)
@pytest.mark.parametrize(
    ("kind", "overrides", "check"),
    [
        ("multiclass", ["loss.name=cross_entropy", "model.num_classes=10",
                        "loss.label_smoothing=0.1", "model.init_bias_from_prior=true"],
         lambda m: m["accuracy"] >= 0.7 and m["top5"] >= 0.95),
        ("multiclass", ["loss.name=cross_entropy", "model.num_classes=10",
                        "loss.label_smoothing=0", f"loss.class_weights=[{','.join(['1.0'] * 10)}]"],
         lambda m: m["accuracy"] >= 0.7 and len(m["confusion_matrix"]) == 10),
        ("multilabel", ["loss.name=bce_with_logits", "model.num_classes=2",
                        "loss.label_smoothing=0", "loss.pos_weight=auto"],
         lambda m: m["mean_ap"] >= 0.85 and set(m["per_label_ap"]) == {"even", "greater_than_4"}),
        ("multilabel", ["loss.name=bce", "model.num_classes=2", "loss.label_smoothing=0",
                        "model.init_bias_from_prior=true"],
         lambda m: m["mean_ap"] >= 0.85),
    ],
)
def test_valid_combination_trains(digits, tmp_path, kind, overrides, check):
    if digits[0] != kind:
        pytest.skip(f"runs on the {kind} shards")
    metrics = train(digits[1], tmp_path, *overrides)
    assert metrics["num_samples"] == 397
    assert check(metrics), metrics


@pytest.mark.parametrize("kind", ["multilabel"])
def test_multilabel_shards_refuse_cross_entropy(digits, tmp_path, kind, caplog):
    from pipeline.train import main

    if digits[0] != kind:
        pytest.skip("multi-label shards only")
    args = [str(REPO / "configs" / "digits.yaml"), f"data.train={digits[1] / 'train'}",
            f"data.eval.val={digits[1] / 'val'}", f"run.output_dir={tmp_path}"]
    assert main(args) == 2
    assert "cannot learn the shards' label_format=multi_hot" in caplog.text
