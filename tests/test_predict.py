"""`pipeline predict` against a plain PyTorch loop on the same real images.

Each test builds a tiny run folder by hand (config.yaml and a safetensors
checkpoint of a seeded resnet18 at 32 px); nothing is trained.
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.cli import main as cli_main
from pipeline.config import Config, ConfigError, ModelConfig, save_config
from pipeline.data.transforms import build_eval_transform
from pipeline.data.writer import ShardSample, write_shard_set
from pipeline.model import build_model
from pipeline.predict import predict_to_csv

CLASSES = ["real", "fake"]
# The valid images of the `images` folder, relative to it; sorted as predict sorts paths
GOOD = ["a.jpg", "b.jpg", "c.png", "sub/F.JPG", "sub/d.png", "sub/e.jpeg"]
BAD = ["sub/broken.jpg", "truncated.png"]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny forwards: two OpenMP threads spin against each other on a busy 2-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def exact_cuda_math():
    # TF32 convolutions would differ between batch sizes by more than 1e-5
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


def encoded(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images(tmp_path_factory, photo_crops) -> Path:
    """JPEG and PNG crops of real photos in a folder tree, two broken files, a text file."""
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    for name, crop in zip(GOOD, photo_crops[::3]):
        fmt = "PNG" if name.endswith(".png") else "JPEG"
        (root / name).write_bytes(encoded(crop, fmt))
    (root / "sub/broken.jpg").write_bytes(b"this is not a JPEG file")
    (root / "truncated.png").write_bytes(encoded(photo_crops[1], "PNG")[:300])
    (root / "notes.txt").write_text("not an image, not scored")
    return root


def write_set(out: Path, crops: list[np.ndarray], class_names: list[str]) -> Path:
    samples = [
        ShardSample(encoded(crop, "PNG"), "png", i % len(class_names), {})
        for i, crop in enumerate(crops)
    ]
    write_shard_set(samples, out, "val", class_names, maxcount=3)
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory, photo_crops) -> Path:
    """7 PNG samples of classes real/fake in 3 shards."""
    return write_set(tmp_path_factory.mktemp("sets") / "val", photo_crops[1:8], CLASSES)


def make_run(root: Path, train: Path | str, num_classes: int, loss: str) -> tuple[Path, Config]:
    """A run folder: resolved config and checkpoints/step-00000010 of a seeded model."""
    config = Config.model_validate(
        {
            "data": {"train": str(train), "image_size": 32, "batch_size": 4, "num_workers": 0},
            "model": {"arch": "resnet18", "num_classes": num_classes},
            "loss": {"name": loss},
        }
    )
    run = root / "run"
    save_config(config, run / "config.yaml")
    ckpt = run / "checkpoints" / "step-00000010"
    ckpt.mkdir(parents=True)
    save_file(seeded_weights(num_classes), str(ckpt / "model.safetensors"))
    (run / "checkpoints" / "latest").write_text("step-00000010\n")
    return run, config


@functools.cache
def seeded_weights(num_classes: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="resnet18", num_classes=num_classes)).state_dict()


def set_threshold(run: Path, config: Config, threshold: float) -> None:
    config.eval.threshold = threshold
    save_config(config, run / "config.yaml")


def by_hand(run: Path, config: Config, pictures: list[Image.Image]) -> np.ndarray:
    """Probabilities `[N, K]` from a plain loop: same weights, same eval crop, plain
    normalisation."""
    model = build_model(config.model)
    model.load_state_dict(load_file(str(run / "checkpoints/step-00000010/model.safetensors")))
    transform = build_eval_transform(config.data)
    pixels = torch.stack([transform(p.convert("RGB")) for p in pictures]).float() / 255
    mean = torch.tensor(config.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.data.std).view(1, 3, 1, 1)
    images = (pixels - mean) / std
    with torch.no_grad():
        logits = model.to(DEVICE).eval()(images.to(DEVICE)).cpu()
    if config.loss.name == "cross_entropy":
        return torch.softmax(logits, dim=1).numpy()
    return torch.sigmoid(logits).numpy()


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as stream:
        reader = csv.DictReader(stream)
        return list(reader.fieldnames or []), list(reader)


def probs_of(rows: list[dict[str, str]], columns: list[str]) -> np.ndarray:
    return np.array([[float(row[c]) for c in columns] for row in rows])


def midpoint(values: np.ndarray) -> float:
    """A threshold between the two middle values: some predictions fall on each side."""
    ordered = np.sort(values)
    middle = len(ordered) // 2
    return float(ordered[middle - 1] + ordered[middle]) / 2


def shard_pictures(folder: Path) -> dict[str, tuple[Image.Image, int]]:
    """Every sample of a shard set read with tarfile: key -> (image, class index)."""
    found: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                found.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return {key: (Image.open(io.BytesIO(m["png"])), int(m["cls"])) for key, m in found.items()}


def test_one_logit_head_on_a_folder(tmp_path, images, shards, caplog):
    run, config = make_run(tmp_path, shards, 1, "bce_with_logits")
    expected = by_hand(run, config, [Image.open(images / name) for name in GOOD])
    set_threshold(run, config, midpoint(expected[:, 0]))
    out = tmp_path / "preds.csv"

    with caplog.at_level(logging.INFO):
        summary = predict_to_csv(run, [str(images)], out)

    columns, rows = read_csv(out)
    assert columns == ["key", "source", "prob_fake", "predicted", "label"]
    assert [row["key"] for row in rows] == GOOD
    assert {row["source"] for row in rows} == {str(images)}
    np.testing.assert_allclose(probs_of(rows, ["prob_fake"]), expected, atol=1e-5)
    wanted = ["fake" if p >= config.eval.threshold else "real" for p in expected[:, 0]]
    assert [row["predicted"] for row in rows] == wanted
    assert set(wanted) == {"real", "fake"}
    assert all(row["label"] == "" for row in rows)
    assert (summary.rows, summary.skipped) == (len(GOOD), len(BAD))
    for name in BAD:
        assert f"skipped {images / name}: cannot decode it" in caplog.text
    assert "wrote 6 predictions" in caplog.text and "2 undecodable" in caplog.text


def test_two_logit_head_softmax_and_threshold(tmp_path, images, shards):
    run, config = make_run(tmp_path, shards, 2, "cross_entropy")
    expected = by_hand(run, config, [Image.open(images / name) for name in GOOD])
    set_threshold(run, config, midpoint(expected[:, 1]))
    out = tmp_path / "preds.csv"

    predict_to_csv(run, [str(images)], out, batch_size=4)

    columns, rows = read_csv(out)
    assert columns == ["key", "source", "prob_real", "prob_fake", "predicted", "label"]
    probs = probs_of(rows, ["prob_real", "prob_fake"])
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    wanted = ["fake" if p >= config.eval.threshold else "real" for p in expected[:, 1]]
    assert [row["predicted"] for row in rows] == wanted
    assert set(wanted) == {"real", "fake"}


def test_multiclass_head_predicts_the_most_probable(tmp_path, photo_crops):
    names = ["sky", "sea", "sand"]
    train = write_set(tmp_path / "three", photo_crops[:6], names)
    run, config = make_run(tmp_path, train, 3, "cross_entropy")
    out = tmp_path / "preds.csv"

    predict_to_csv(run, [str(train)], out)

    columns, rows = read_csv(out)
    assert columns[2:5] == ["prob_sky", "prob_sea", "prob_sand"]
    samples = shard_pictures(train)
    expected = by_hand(run, config, [samples[row["key"]][0] for row in rows])
    np.testing.assert_allclose(probs_of(rows, columns[2:5]), expected, atol=1e-5)
    assert [row["predicted"] for row in rows] == [names[i] for i in expected.argmax(axis=1)]
    assert [row["label"] for row in rows] == [names[samples[r["key"]][1]] for r in rows]


def test_shard_inputs_folder_manifest_and_pattern(tmp_path, shards):
    run, config = make_run(tmp_path, shards, 1, "bce_with_logits")
    specs = [str(shards), str(shards / "manifest.json"), str(shards / "val-00000{0,2}.tar")]
    out = tmp_path / "preds.csv"

    summary = predict_to_csv(run, specs, out)

    _, rows = read_csv(out)
    samples = shard_pictures(shards)
    by_source = {spec: [row["key"] for row in rows if row["source"] == spec] for spec in specs}
    assert sorted(by_source[specs[0]]) == sorted(by_source[specs[1]]) == sorted(samples)
    assert sorted(by_source[specs[2]]) == [
        "val-00000000",
        "val-00000001",
        "val-00000002",
        "val-00000006",
    ]
    expected = by_hand(run, config, [samples[row["key"]][0] for row in rows])
    np.testing.assert_allclose(probs_of(rows, ["prob_fake"]), expected, atol=1e-5)
    assert [row["label"] for row in rows] == [CLASSES[samples[r["key"]][1]] for r in rows]
    assert (summary.rows, summary.skipped) == (7 + 7 + 4, 0)


def test_file_input_through_the_cli_with_workers(tmp_path, images, shards):
    run, config = make_run(tmp_path, shards, 1, "bce_with_logits")
    out = tmp_path / "out" / "preds.csv"
    argv = ["predict", "--run-dir", str(run), "--out", str(out), "--num-workers", "2"]
    argv += ["--batch-size", "3", str(images / "sub/d.png"), str(shards)]

    assert cli_main(argv) == 0

    _, rows = read_csv(out)
    assert rows[0]["key"] == "d.png" and rows[0]["source"] == str(images / "sub/d.png")
    expected = by_hand(run, config, [Image.open(images / "sub/d.png")])
    assert float(rows[0]["prob_fake"]) == pytest.approx(float(expected[0, 0]), abs=1e-5)
    assert len(rows) == 1 + 7 and not (out.parent / "preds.csv.partial").exists()


def test_class_names_fall_back_without_the_training_manifest(tmp_path, images):
    run, _ = make_run(tmp_path, tmp_path / "moved-away", 1, "bce_with_logits")
    out = tmp_path / "preds.csv"

    predict_to_csv(run, [str(images / "a.jpg")], out)

    columns, rows = read_csv(out)
    assert columns == ["key", "source", "prob_class_1", "predicted", "label"]
    assert rows[0]["predicted"] in ("class_0", "class_1")


def bad_cases(run: Path, images: Path) -> dict[str, tuple[dict, str]]:
    out = str(run.parent / "x.csv")
    good = [str(images)]
    return {
        "no run": (dict(run_dir=run.parent / "nope", inputs=good, out=out), "does not exist"),
        "no config": (dict(run_dir=images, inputs=good, out=out), "has no config.yaml"),
        "no input": (dict(run_dir=run, inputs=[str(images / "zz")], out=out), "does not exist"),
        "no images": (
            dict(run_dir=run, inputs=[str(run / "checkpoints")], out=out),
            "holds no image files",
        ),
        "not an image": (
            dict(run_dir=run, inputs=[str(images / "notes.txt")], out=out),
            "is not an image file",
        ),
        "bad checkpoint": (
            dict(run_dir=run, inputs=good, out=out, checkpoint="step-9"),
            "--checkpoint 'step-9' is not a folder",
        ),
        "out is a folder": (dict(run_dir=run, inputs=good, out=images), "is a folder"),
        "bad pattern": (
            dict(run_dir=run, inputs=[str(images.parent / "x" / "v-*.tar")], out=out),
            "does not exist",
        ),
    }


def test_bad_inputs_raise_config_errors(tmp_path, images, shards):
    run, _ = make_run(tmp_path, shards, 1, "bce_with_logits")
    for kwargs, words in bad_cases(run, images).values():
        with pytest.raises(ConfigError, match=words):
            predict_to_csv(**kwargs)
    with pytest.raises(ConfigError, match=r"holds the shard sets \['val'\], not one set"):
        predict_to_csv(run, [str(shards.parent)], tmp_path / "x.csv")
    assert not (tmp_path / "x.csv").exists()


def test_missing_checkpoint_and_foreign_weights(tmp_path, images, shards):
    run, config = make_run(tmp_path, shards, 1, "bce_with_logits")
    (run / "checkpoints" / "latest").unlink()
    with pytest.raises(ConfigError, match="has no checkpoint .* pass --checkpoint"):
        predict_to_csv(run, [str(images)], tmp_path / "x.csv")

    other = tmp_path / "other"
    other.mkdir()
    model: nn.Module = build_model(config.model.model_copy(update={"num_classes": 2}))
    save_file(model.state_dict(), str(other / "model.safetensors"))
    with pytest.raises(ConfigError, match="does not fit the run's model"):
        predict_to_csv(run, [str(images)], tmp_path / "x.csv", checkpoint=str(other))


def test_cli_turns_config_errors_into_exit_code_2(tmp_path, images):
    argv = ["predict", "--run-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "x.csv")]
    assert cli_main([*argv, str(images)]) == 2


def test_eval_on_bad_data_ends_with_one_message_and_exit_1(tmp_path, shards, caplog):
    from loader_support import truncate

    from pipeline.cli import main as cli_main

    run, _ = make_run(tmp_path, shards, 1, "bce_with_logits")
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in shards.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    first = sorted(broken.glob("*.tar"))[0]
    truncate(first, len(first.read_bytes()) // 2)
    code = cli_main(["eval", "--run-dir", str(run), "--set", f"cut={broken}",
                     "data.on_bad_sample=strict"])
    assert code == 1
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and first.name in errors[0].getMessage()
    assert "Traceback" not in caplog.text
