"""The grids that ``globalattn compare`` runs: tasks x contexts x attentions x seeds, one budget each.

What each preset is for, what it costs, and whether it has been measured: docs/training.md
("Comparing"); the measurements: docs/results.md.  This module imports no torch, so that
``globalattn compare --help`` lists the presets cheaply.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from globalattn.harness.config import ATTENTIONS, ModelConfig, TrainConfig

# Routing to the top blocks against dense, plain global, global with a window and the cheap baselines
# (causal tasks: no global-own)
ROUTING_ATTENTIONS = (
    "dense",
    "global",
    "global-top1",
    "global-top2",
    "global-top4",
    "global-window",
    "local",
    "sliding",
)


@dataclass(frozen=True)
class Preset:
    tasks: tuple[str, ...]
    contexts: tuple[int, ...]
    attentions: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    tokens_per_step: int  # batch = tokens_per_step // context: every context sees the same tokens
    model: dict = dataclasses.field(default_factory=dict)  # ModelConfig fields: d_model, n_layer, ...
    options: dict = dataclasses.field(default_factory=dict)  # more TrainConfig fields: precision, ...
    lr: float | None = None  # None: each task's own (config.TASK_LR)
    eval_every: int = 50
    eval_examples: int = 64
    per_task: dict[str, dict] = dataclasses.field(default_factory=dict)  # task -> fields that differ for it
    # the task's own options (TrainConfig.task_options); each task takes its own, so give them in per_task
    task_options: dict[str, int] = dataclasses.field(default_factory=dict)
    # options that differ by context, over task_options: {context: {option: value}} (MQAR's pairs grow with T)
    task_options_by_context: dict[int, dict[str, int]] = dataclasses.field(default_factory=dict)

    def for_task(self, task: str) -> Preset:
        return dataclasses.replace(self, **self.per_task.get(task, {}), per_task={})

    def narrowed(self, *, tasks=None, contexts=None, attentions=None, seeds=None, steps=None) -> Preset:
        """The same grid restricted to the given tasks, contexts and attentions (each task's own
        lists included), with other seeds or steps when given."""

        def keep(values, chosen):
            return tuple(v for v in values if chosen is None or v in chosen)

        def narrow(fields: dict) -> dict:
            fields = dict(fields)
            for name, chosen in (("contexts", contexts), ("attentions", attentions)):
                if name in fields:
                    fields[name] = keep(fields[name], chosen)
            return {**fields, **({"seeds": tuple(seeds)} if seeds else {}), **({"steps": steps} if steps else {})}

        narrowed = dataclasses.replace(
            self,
            tasks=keep(self.tasks, tasks),
            contexts=keep(self.contexts, contexts),
            attentions=keep(self.attentions, attentions),
            per_task={task: narrow(fields) for task, fields in self.per_task.items()},
        )
        return dataclasses.replace(narrowed, **narrow({}))

    def runs(self) -> list[TrainConfig | tuple[str, int, str, int]]:
        """Every run of the grid, in order: a TrainConfig, or (task, context, attention, seed) for
        a cell that cannot exist (global-own on a causal task)."""
        from globalattn.harness.tasks import TASKS  # imports torch: only when a grid is built

        grid = []
        for task in self.tasks:
            plan = self.for_task(task)
            for context in plan.contexts:
                for attention in plan.attentions:
                    for seed in plan.seeds:
                        if attention == "global-own" and TASKS[task].causal:
                            grid.append((task, context, attention, seed))
                            continue
                        grid.append(
                            TrainConfig(
                                task=task,
                                model=ModelConfig(context=context, attention=attention, **plan.model),
                                seed=seed,
                                steps=plan.steps,
                                batch=max(1, plan.tokens_per_step // context),
                                lr=plan.lr,
                                eval_every=plan.eval_every,
                                eval_examples=plan.eval_examples,
                                task_options={**plan.task_options, **plan.task_options_by_context.get(context, {})},
                                **plan.options,
                            )
                        )
        return grid


PRESETS = {
    "cpu-small": Preset(
        tasks=("shakespeare", "mqar", "listops"),
        contexts=(256, 512, 1024),
        attentions=ATTENTIONS,
        seeds=(0,),
        steps=200,
        tokens_per_step=4096,
        model=dict(d_model=64, n_layer=2, n_head=4),
        eval_every=25,
        eval_examples=64,
        per_task={
            "shakespeare": dict(seeds=(0, 1)),  # its differences are small: two seeds show the noise
            "mqar": dict(attentions=(*ATTENTIONS, "global-top2")),
            "listops": dict(eval_every=50, eval_examples=256),  # accuracy over 64 examples is too coarse
        },
    ),
    "cpu-top-blocks": Preset(
        tasks=("shakespeare",),
        contexts=(256,),
        attentions=ROUTING_ATTENTIONS,
        seeds=(0, 1),
        steps=1000,
        tokens_per_step=4096,
        model=dict(d_model=64, n_layer=2, n_head=4),
        eval_every=100,
        eval_examples=64,
    ),
    "gpu": Preset(
        tasks=("shakespeare", "mqar", "listops"),
        contexts=(2048, 8192),
        attentions=ATTENTIONS,
        seeds=(0,),
        steps=250,
        tokens_per_step=32768,
        model=dict(d_model=256, n_layer=4, n_head=4),
        options=dict(precision="bf16"),
        lr=2e-3,
        eval_every=50,
        eval_examples=64,
        per_task={
            "mqar": dict(attentions=(*ATTENTIONS, "global-top2")),
            "listops": dict(eval_examples=256),
        },
    ),
    # Recall on these machines (issue 17): MQAR's pairs spread over the first half of the context (8
    # blocks of the default b: 8 at T = 128, 16 at T = 256), passkey's needle anywhere; docs/training.md's recipe
    "cpu-recall": Preset(
        tasks=("mqar", "passkey"),
        contexts=(128, 256),
        attentions=ROUTING_ATTENTIONS,
        seeds=(0, 1, 2),
        steps=3000,
        tokens_per_step=4096,  # batch 32 at T = 128
        model=dict(d_model=64, n_layer=2, n_head=4),
        options=dict(schedule="constant"),
        eval_every=250,
        eval_examples=256,
        per_task={
            "mqar": dict(
                tokens_per_step=8192,  # batch 64 at T = 128: dense leaves the plateau after ~50-155k sequences
                task_options=dict(vocab_size=64),
                task_options_by_context={128: dict(num_pairs=8, key_span=64), 256: dict(num_pairs=16, key_span=128)},
            ),
            "passkey": dict(contexts=(256, 512)),
        },
    ),
    # Text at a budget that separates the attentions (issue 17): Shakespeare 4x longer than the
    # 1000 steps of the 2026-12-02 window runs, whose ordering was still moving; three seeds.
    "cpu-text": Preset(
        tasks=("shakespeare",),
        contexts=(512, 1024),
        attentions=("dense", "global", "global-top1", "global-window", "local", "sliding"),
        seeds=(0, 1, 2),
        steps=4000,
        tokens_per_step=4096,
        model=dict(d_model=64, n_layer=2, n_head=4),
        eval_every=250,
        eval_examples=64,
    ),
    # Recall through the routing: MQAR's 128 pairs fill 8 of the 16 blocks of b = 32, more than any
    # k <= 4 routes to; why b = 32 and not a smaller b with fewer pairs: docs/training.md.
    "gpu-recall": Preset(
        tasks=("mqar",),
        contexts=(512,),
        attentions=ROUTING_ATTENTIONS,
        seeds=(0, 1),
        steps=2000,
        tokens_per_step=32768,  # batch 64
        model=dict(d_model=128, n_layer=2, n_head=4, block_size=32),
        options=dict(schedule="constant"),  # the recipe of cpu-recall: MQAR's late phase wants the full rate
        eval_every=250,
        eval_examples=128,
        per_task={"mqar": dict(task_options=dict(num_pairs=128, vocab_size=512))},  # vocab >= 2 * (pairs + 1)
    ),
}
