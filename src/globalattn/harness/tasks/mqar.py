"""MQAR, multi-query associative recall (Arora et al., "Zoology", 2023), Zoology's generator in torch.

A sequence starts with P key-value pairs ``k1 v1 k2 v2 ...`` (keys from the lower half of the
vocabulary, values from the upper half, each drawn without replacement), then holds P queries, each
a key seen before, at gaps drawn from a power law (small gaps likelier), with random tokens
everywhere else.  With ``key_span`` S > 2P the pairs sit at random even positions of the first S
tokens instead of the first 2P, so that they fill several blocks, not block 0 alone; the queries
follow the span.  At a query key the target is its value; nothing else is scored.  The metric is
the fraction of queries answered (teacher-forced argmax); ``breakdown`` splits it by the query's gap
to its key (quarters of the context: near keys against far ones) and by whether the key sits in the
query's own block of the model's block size (a block ``global`` and ``local`` see raw) or an earlier one.

One change from Zoology: the filler tokens are drawn from the value half only.  Zoology draws them
from the whole vocabulary, which at its vocabulary of 8192 rarely repeats a key; at the small
vocabularies a CPU budget allows it would plant decoy copies of the keys.

Recall of one exact token is what a block mean blurs, so this is the hardest test for global tokens.
"""

from __future__ import annotations

import torch

from globalattn import checks
from globalattn.harness.tasks.base import IGNORE, Task, accuracy_by_group

GAP_QUARTERS = ("[0, T/4)", "[T/4, T/2)", "[T/2, 3T/4)", "[3T/4, T)")  # accuracy_by_gap's groups
BLOCKS = ("own", "earlier")  # accuracy_by_block's: the key in the query's block, or before it


class MQAR(Task):
    name = "mqar"
    options = ("num_pairs", "vocab_size", "key_span")

    def __init__(
        self,
        context: int,
        seed: int = 0,
        *,
        vocab_size: int = 256,
        num_pairs: int = 16,
        key_span: int | None = None,
        power_a=0.01,
    ):
        super().__init__(context, seed)
        checks.positive_int("mqar option num_pairs", num_pairs)
        checks.positive_int("mqar option vocab_size", vocab_size)
        if context % 2 or 4 * num_pairs > context:
            raise ValueError(f"mqar needs an even context of at least 4 * num_pairs = {4 * num_pairs}, got {context}")
        if vocab_size // 2 - 1 < num_pairs:
            raise ValueError(f"mqar needs vocab_size >= 2 * (num_pairs + 1) = {2 * num_pairs + 2}, got {vocab_size}")
        key_span = 2 * num_pairs if key_span is None else key_span
        checks.positive_int("mqar option key_span", key_span)
        if key_span % 2 or not 2 * num_pairs <= key_span <= context - 2 * num_pairs:
            raise ValueError(
                f"mqar option key_span must be even, from 2 * num_pairs = {2 * num_pairs} to context - 2 * num_pairs "
                f"= {context - 2 * num_pairs} (room for the queries), got {key_span}"
            )
        self.vocab_size, self.num_pairs, self.key_span = vocab_size, num_pairs, key_span
        space = (context - key_span) // 2  # query slots: every other position after the pairs' span
        gaps = torch.arange(1, space + 1, dtype=torch.float64)
        self.gap_weights = power_a * gaps ** (power_a - 1)  # Zoology's power law over the slot index

    def make_batch(self, split, index, size):
        rng = self.torch_generator(split, index)
        pairs, half = self.num_pairs, self.vocab_size // 2
        keys = torch.stack([torch.randperm(half - 1, generator=rng)[:pairs] + 1 for _ in range(size)])  # (B, P)
        values = torch.stack([torch.randperm(half, generator=rng)[:pairs] + half for _ in range(size)])
        slots = torch.stack([torch.multinomial(self.gap_weights, pairs, generator=rng) for _ in range(size)])
        tokens = torch.randint(half, self.vocab_size, (size, self.context), generator=rng)  # filler: values only
        if self.key_span == 2 * pairs:  # Zoology's layout: the pairs first, in order
            key_pos = torch.arange(0, 2 * pairs, 2).expand(size, pairs)
        else:
            pair_slots = [torch.randperm(self.key_span // 2, generator=rng)[:pairs].sort().values for _ in range(size)]
            key_pos = 2 * torch.stack(pair_slots)  # (B, P)
        tokens.scatter_(1, key_pos, keys).scatter_(1, key_pos + 1, values)
        query_pos = self.key_span + 2 * slots  # (B, P)
        tokens.scatter_(1, query_pos, keys)
        targets = torch.full_like(tokens, IGNORE).scatter_(1, query_pos, values)
        return {"tokens": tokens, "targets": targets}

    def recall_positions(self, batch):
        tokens = batch["tokens"]
        row, query_at = (batch["targets"] != IGNORE).nonzero(as_tuple=True)  # the queries
        # a key occurs once before its query (keys are distinct within a row; filler holds none)
        key_at = (tokens[row] == tokens[row, query_at][:, None]).int().argmax(-1)
        return row, query_at, key_at

    def breakdown(self, batch, predicted, block_size):
        targets = batch["targets"]
        correct = (predicted == targets)[targets != IGNORE]  # in the order of recall_positions
        _, query_at, key_at = self.recall_positions(batch)
        quarter = (query_at - key_at) * len(GAP_QUARTERS) // self.context  # gaps are 1 .. T - 1
        earlier = (key_at // block_size != query_at // block_size).long()
        return {
            "accuracy_by_gap": dict(zip(GAP_QUARTERS, accuracy_by_group(correct, quarter, len(GAP_QUARTERS)))),
            "queries_by_gap": dict(zip(GAP_QUARTERS, torch.bincount(quarter, minlength=len(GAP_QUARTERS)).tolist())),
            "accuracy_by_block": dict(zip(BLOCKS, accuracy_by_group(correct, earlier, len(BLOCKS)))),
            "queries_by_block": dict(zip(BLOCKS, torch.bincount(earlier, minlength=len(BLOCKS)).tolist())),
        }

    def describe(self):
        return {"vocab_size": self.vocab_size, "num_pairs": self.num_pairs, "key_span": self.key_span}
