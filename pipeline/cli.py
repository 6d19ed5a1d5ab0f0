"""The `pipeline` command: `pipeline shard | train | eval ...`."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.config import ConfigError
from pipeline.data.decode import BadDataError
from pipeline.log import setup_logging

log = logging.getLogger("pipeline")


def build_parser() -> argparse.ArgumentParser:
    from pipeline import evaluate, predict, train
    from pipeline.data import split, verify, writer

    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    shard = commands.add_parser("shard", help="write images into WebDataset shards")
    writer.add_shard_arguments(shard)
    shard.set_defaults(handler=writer.run_shard)
    trainp = commands.add_parser("train", help="train in this process (see launch/ for more)")
    train.build_parser(trainp)
    trainp.set_defaults(handler=lambda a: train.main([a.config, *a.overrides]))
    evalp = commands.add_parser("eval", help="evaluate a run's checkpoint on eval sets")
    evaluate.build_parser(evalp)
    evalp.set_defaults(handler=evaluate.run)
    predictp = commands.add_parser("predict", help="score images or shards, write a CSV")
    predict.build_parser(predictp)
    predictp.set_defaults(handler=predict.run)
    verifyp = commands.add_parser("verify", help="check a shard set against its manifest")
    verify.add_verify_arguments(verifyp)
    verifyp.set_defaults(handler=verify.run_verify)
    planp = commands.add_parser("plan", help="show which shards each rank and worker reads")
    split.add_plan_arguments(planp)
    planp.set_defaults(handler=split.run_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        return int(args.handler(args) or 0)
    except ConfigError as err:
        log.error("%s", err)
        return 2
    except BadDataError as err:  # the message names the shard, the key and the limit
        log.error("%s", err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
