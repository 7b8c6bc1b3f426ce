"""Passkey retrieval (Mohtashami & Jaggi, "Landmark Attention", 2023), character level.

Filler text repeats "The grass is green. The sky is blue. ..."; somewhere in it, at a depth drawn
uniformly from [0, 1] (validation: evenly spaced depths), sits "The pass key is 12345. Remember
it. 12345 is the pass key. ".  The sequence ends with "What is the pass key? The pass key is
12345": the model is scored on those last five digits only.  The metric is the fraction of
sequences with all five right (exact match); ``breakdown`` adds the accuracy of each digit (exact
match alone hides a model that has learned some of them) and exact match by where the needle was.
"""

from __future__ import annotations

import torch

from globalattn.harness.tasks.base import IGNORE, Task, accuracy_by_group

FILLER = b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = b"The pass key is %s. Remember it. %s is the pass key. "
QUESTION = b"What is the pass key? The pass key is "
DIGITS = 5


class Passkey(Task):
    name = "passkey"
    vocab_size = 256
    exact_match = True

    def __init__(self, context: int, seed: int = 0):
        super().__init__(context, seed)
        self.needle_len = len(NEEDLE % (b"0" * DIGITS, b"0" * DIGITS))
        self.filler_len = context + 1 - self.needle_len - len(QUESTION) - DIGITS
        if self.filler_len < 0:
            shortest = context - self.filler_len
            raise ValueError(f"passkey needs a context of at least {shortest} characters, got {context}")
        self.filler = (FILLER * (self.filler_len // len(FILLER) + 1))[: self.filler_len]

    def make_batch(self, split, index, size):
        rng = self.torch_generator(split, index)
        keys = torch.randint(10**DIGITS, (size,), generator=rng)
        if split == "train":
            depths = torch.rand(size, generator=rng, dtype=torch.float64)
        else:  # evenly spaced, the same for every run
            depths = (torch.arange(index * size, (index + 1) * size) * 0.6180339887498949) % 1.0
        rows = [self.sequence(int(key), float(depth)) for key, depth in zip(keys, depths)]
        windows = torch.tensor(rows, dtype=torch.long)  # (B, T + 1)
        targets = windows[:, 1:].clone()
        targets[:, :-DIGITS] = IGNORE
        return {"tokens": windows[:, :-1], "targets": targets, "depth": depths.float()}

    def breakdown(self, batch, predicted, block_size):
        digits = (predicted == batch["targets"])[:, -DIGITS:]  # (B, DIGITS): the answer's, first to last
        return {
            "accuracy_by_digit": digits.float().mean(0).tolist(),
            "digit_accuracy": float(digits.float().mean()),
            "accuracy_by_depth": accuracy_by_depth(digits.all(1), batch["depth"]),
        }

    def sequence(self, key: int, depth: float) -> list[int]:
        """The T + 1 characters of one example: filler with the needle at ``depth``, then the question."""
        digits = b"%0*d" % (DIGITS, key)
        cut = round(depth * self.filler_len)
        text = self.filler[:cut] + NEEDLE % (digits, digits) + self.filler[cut:] + QUESTION + digits
        return list(text)


def accuracy_by_depth(correct: torch.Tensor, depths: torch.Tensor, bins: int = 5) -> list[float]:
    """Fraction of sequences right in each of ``bins`` equal depth ranges (0 = start of the text)."""
    return accuracy_by_group(correct, (depths * bins).long().clamp(max=bins - 1), bins)
