"""Gradient accumulation: which micro-batches of an epoch make up one optimizer step.

The rule, for an epoch of S micro-batches (the loader's steps_per_epoch, the same on
every rank) and k = train.grad_accum_steps:

- micro-batches are taken in order, k to a group; when k does not divide S, the
  last group of the epoch holds the remaining S mod k micro-batches;
- each group ends with one optimizer step, so an epoch has ceil(S / k) of them,
  and the LR schedule is sized and stepped in optimizer steps;
- each micro-batch's loss is divided by the size of its own group, so every step's
  gradient is the mean over its micro-batches (all full batches of the same size):
  a short last group is as strong a step as the others, not a weaker one;
- groups never cross an epoch boundary, so an epoch ends with no partial gradient;
- under DDP, gradients are averaged over ranks only on a group's last micro-batch.

Micro-batches are numbered from 1 within their epoch, as the training loop counts.
"""

from __future__ import annotations


def optimizer_steps_per_epoch(micro_batches: int, accum_steps: int) -> int:
    """ceil(S / k): one step per group, the short last group included."""
    return -(-micro_batches // accum_steps)


def group_size(micro_step: int, micro_batches: int, accum_steps: int) -> int:
    """Micro-batches in the group of `micro_step` (1-based): k, or S mod k for the last."""
    _check_position(micro_step, micro_batches)
    full_groups_end = micro_batches - micro_batches % accum_steps
    return accum_steps if micro_step <= full_groups_end else micro_batches % accum_steps


def ends_group(micro_step: int, micro_batches: int, accum_steps: int) -> bool:
    """Whether the optimizer steps after `micro_step` (1-based)."""
    _check_position(micro_step, micro_batches)
    return micro_step % accum_steps == 0 or micro_step == micro_batches


def starts_group(micro_step: int, micro_batches: int, accum_steps: int) -> bool:
    _check_position(micro_step, micro_batches)
    return (micro_step - 1) % accum_steps == 0


def _check_position(micro_step: int, micro_batches: int) -> None:
    # An internal invariant: the training loop numbers micro-batches 1..S
    assert 1 <= micro_step <= micro_batches, (micro_step, micro_batches)
