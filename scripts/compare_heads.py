"""Train the three binary heads on the demo faces with the same seed and steps.

    .venv/bin/python scripts/compare_heads.py [--epochs 5] [--image-size 64]

Writes the faces shards if needed, trains one logit + bce_with_logits, one logit
+ bce, and two logits + cross_entropy one after another (one process each), and
prints a markdown table of the final training loss and the held-out metrics:
the table in docs/heads-and-losses.md comes from this script.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEADS = [("bce_with_logits", 1), ("bce", 1), ("cross_entropy", 2)]


def main() -> int:
    args = parse_args()
    shards = ensure_faces(args.data)
    rows = [train_one(loss, k, shards, args) for loss, k in HEADS]
    print(table(rows, args))
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "faces")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "compare-heads")
    return parser.parse_args()


def ensure_faces(folder: Path) -> Path:
    if not (folder / "train" / "manifest.json").is_file():
        command = [sys.executable, "-m", "pipeline", "shard", "embedded:faces", "--out",
                   str(folder), "--val-fraction", "0.2", "--maxcount", "32", "--overwrite"]
        subprocess.run(command, check=True)
    return folder


def train_one(loss: str, k: int, shards: Path, args: argparse.Namespace) -> dict:
    name = f"{loss}-k{k}"
    command = [sys.executable, "-m", "pipeline.train", str(REPO / "configs" / "demo.yaml"),
               f"data.train={shards / 'train'}", f"data.eval.val={shards / 'val'}",
               f"run.output_dir={args.out}", f"run.name={name}", f"run.seed={args.seed}",
               f"loss.name={loss}", f"model.num_classes={k}", f"train.epochs={args.epochs}",
               f"data.image_size={args.image_size}", "wandb.mode=disabled"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    run_dir = args.out / name
    metrics = json.loads((run_dir / "eval_results.json").read_text())["val"]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["train/loss"] for line in lines if "train/loss" in line]
    return {"loss": loss, "k": k, "train_loss": losses[-1], **metrics}


def table(rows: list[dict], args: argparse.Namespace) -> str:
    head = (f"faces demo, 160 train / 40 held out, {args.epochs} epochs, "
            f"{args.image_size} px, seed {args.seed}, one process\n\n"
            "| head | loss | final train loss | accuracy @0.5 | AP | ROC-AUC |\n"
            "|---|---|---|---|---|---|")
    body = [f"| {r['k']} logit{'s' if r['k'] > 1 else ''} | `{r['loss']}` | "
            f"{r['train_loss']:.4f} | {r['accuracy']:.3f} | {r['ap']:.3f} | "
            f"{r['roc_auc']:.3f} |" for r in rows]
    return "\n".join([head, *body])


if __name__ == "__main__":
    sys.exit(main())
