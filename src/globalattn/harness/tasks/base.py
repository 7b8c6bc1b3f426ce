"""What every task provides: deterministic batches by (seed, split, index), and how they are scored.

A batch is a dict of tensors with one row per example:

    tokens   (B, T) int64   the model's input
    targets  (B, T) int64   causal tasks: the next token to predict, IGNORE where there is no loss
    labels   (B,)   int64   classification tasks: the class
    real     (B, T) bool    classification tasks: False at padding (not pooled)
    document_ids (B, T) int64  packed tasks (``pack=True``): the document of each position, 0, 1, ...
                            along the row; targets never cross from one document into the next

Batch ``index`` of a split is a pure function of (seed, split, index): a resumed run, a second
process in data-parallel training and a rerun all see the same data without any sampler state.
"""

from __future__ import annotations

import random
import zlib

import torch

from globalattn import checks

IGNORE = -100  # targets that carry no loss (F.cross_entropy's ignore_index)
SPLITS = ("train", "val")


class Task:
    """A causal task (decoder, next-token targets) or a classification task (encoder, labels)."""

    name: str
    causal: bool = True
    vocab_size: int
    num_classes: int | None = None
    metric: str = "accuracy"  # "bpc" (bits per character, lower is better) or "accuracy"
    exact_match: bool = False  # accuracy counts whole examples (every target right), not target tokens
    # The constructor's keyword options that a run may set (TrainConfig.task_options, make_task's
    # **options, ``--task-option``); describe() records the value of each.
    options: tuple[str, ...] = ()
    packs: bool = False  # the constructor takes pack=True: rows of packed documents, with document_ids

    def __init__(self, context: int, seed: int = 0):
        checks.positive_int("context", context)
        self.context, self.seed = context, seed

    def batch(self, split: str, index: int, size: int) -> dict[str, torch.Tensor]:
        """Batch ``index`` of ``split``: ``size`` examples, the same every time it is asked for."""
        checks.choice("split", split, SPLITS)
        return self.make_batch(split, index, size)

    def make_batch(self, split: str, index: int, size: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def breakdown(self, batch: dict[str, torch.Tensor], predicted: torch.Tensor, block_size: int) -> dict:
        """Accuracies by kind of example or target, beside the one ``metric``: what shows a model
        learning before the metric moves.  ``batch``: every validation batch joined, ``predicted``:
        the model's argmax (B, T) (causal tasks), ``block_size``: the model's resolved block size."""
        return {}

    def recall_positions(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...] | None:
        """For tasks whose answers are copied from earlier in the sequence: (row, query, source), three
        int64 tensors, one entry per scored query: the position it is scored at and the position of
        the token it must find (MQAR: the key).  None for the others."""
        return None

    def describe(self) -> dict:
        """What a results table should record about the data (corpus checksums, held-out parts)."""
        return {}

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"

    def torch_generator(self, split: str, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(_mix(self.seed, split, index))

    def python_random(self, split: str, index: int) -> random.Random:
        return random.Random(_mix(self.seed, split, index))


def _mix(seed: int, split: str, index: int) -> int:
    """A stable 63-bit seed for (seed, split, index) (Python's hash() is salted per process)."""
    text = f"{seed}/{split}/{index}".encode()
    return (zlib.crc32(text) << 31) ^ zlib.adler32(text)


def accuracy_by_group(correct: torch.Tensor, group: torch.Tensor, groups: int) -> list[float]:
    """The fraction of ``correct`` in each of groups 0 .. ``groups`` - 1; None for an empty group (JSON
    null: NaN is not JSON, and unequal to itself, so two records of one run would differ)."""
    return [float(correct[group == g].float().mean()) if (group == g).any() else None for g in range(groups)]
