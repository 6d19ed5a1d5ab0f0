"""Shared fixtures: crops of real photos, and a small real shard set with a val split.

Everything comes from files installed with scikit-learn and scikit-image; nothing
is downloaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` run only where CUDA is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu); none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def photo_crops() -> list[np.ndarray]:
    """24 RGB uint8 crops of 40x48 pixels from scikit-learn's two sample photos."""
    from sklearn.datasets import load_sample_images

    crops = []
    for photo in load_sample_images().images:
        for row in range(3):
            for col in range(4):
                top, left = 60 + row * 100, 40 + col * 140
                crops.append(np.ascontiguousarray(photo[top : top + 40, left : left + 48]))
    return crops


@pytest.fixture(scope="session")
def faces_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pipeline shard embedded:faces --val-fraction 0.2 --maxcount 50`: a folder with
    train/ (160 samples, 4 shards) and val/ (40 samples, 1 shard), PNG, classes
    non_face=0 and face=1."""
    from pipeline.data.writer import add_shard_arguments, run_shard

    out = tmp_path_factory.mktemp("faces") / "shards"
    parser = argparse.ArgumentParser()
    add_shard_arguments(parser)
    argv = ["embedded:faces", "--out", str(out), "--val-fraction", "0.2", "--maxcount", "50"]
    run_shard(parser.parse_args(argv))
    return out
