"""ListOps (Nangia & Bowman 2018), as generated for the Long Range Arena (Tay et al., 2021).

Nested expressions over the digits 0-9, such as ``[MAX 2 9 [MIN 4 7 ] 0 ]``, with the operators
MIN, MAX, MED (the median, truncated to an int) and SM (sum modulo 10); the label is the value,
10 classes.  LRA's generator: an operator at each depth with probability 1/4 (else a digit), 2 to
10 arguments, depth at most 10; expressions are drawn until one's length falls in
[context / 4, context] (LRA: 500 to 2000 tokens for context 2000), then padded at the end.
Parentheses are left out, as LRA's input pipeline removes them.

Published accuracies at context 2000 (LRA, Table 1): Transformer 36.4, Longformer 35.6,
BigBird 36.1, local attention 15.8.
"""

from __future__ import annotations

import statistics

import torch

from globalattn.harness.tasks.base import Task

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
VOCAB = ("<pad>", *OPERATORS, "]", *map(str, range(10)))
TOKEN_ID = {token: i for i, token in enumerate(VOCAB)}
PAD = TOKEN_ID["<pad>"]
OPERATOR_P, MAX_DEPTH, MAX_ARGS = 0.25, 10, 10


class ListOps(Task):
    name = "listops"
    causal = False
    vocab_size = len(VOCAB)
    num_classes = 10

    def __init__(self, context: int, seed: int = 0):
        super().__init__(context, seed)
        if context < 16:
            raise ValueError(f"listops needs a context of at least 16 tokens, got {context}")
        self.min_length = context // 4

    def make_batch(self, split, index, size):
        rng = self.python_random(split, index)
        tokens = torch.full((size, self.context), PAD)
        labels = torch.empty(size, dtype=torch.long)
        for row in range(size):
            expression, labels[row] = self.draw_expression(rng)
            tokens[row, : len(expression)] = torch.tensor([TOKEN_ID[t] for t in expression])
        return {"tokens": tokens, "labels": labels, "real": tokens != PAD}

    def draw_expression(self, rng) -> tuple[list[str], int]:
        """Expressions of LRA's distribution until one fits [context / 4, context]: (tokens, value)."""
        while True:
            tokens, value = _generate(rng, depth=1, limit=self.context)
            if tokens is not None and self.min_length <= len(tokens):
                return tokens, value


def _generate(rng, depth: int, limit: int) -> tuple[list[str] | None, int]:
    """One random (sub)expression and its value; None once it grows past ``limit`` tokens (rejected
    anyway, so there is no point in finishing it)."""
    if depth >= MAX_DEPTH or rng.random() > OPERATOR_P:
        digit = rng.randrange(10)
        return [str(digit)], digit
    operator = rng.choice(OPERATORS)
    tokens, values = [operator], []
    for _ in range(rng.randint(2, MAX_ARGS)):
        sub_tokens, sub_value = _generate(rng, depth + 1, limit - len(tokens) - 1)
        if sub_tokens is None:
            return None, 0
        tokens += sub_tokens
        values.append(sub_value)
    tokens.append("]")
    return (tokens, apply_operator(operator, values)) if len(tokens) <= limit else (None, 0)


def apply_operator(operator: str, values: list[int]) -> int:
    if operator == "[MIN":
        return min(values)
    if operator == "[MAX":
        return max(values)
    if operator == "[MED":
        return int(statistics.median(values))
    return sum(values) % 10
