"""Train one small transformer on one task, with checkpoints that resume exactly.

    globalattn train --task shakespeare --attention global --context 512 --steps 300 --out runs/sh-global
    globalattn train ... --out runs/sh-global --resume        # continue from the last checkpoint
    torchrun --nproc_per_node=8 -m globalattn train ...       # the same options, data-parallel (DDP)

    from globalattn.harness.config import ModelConfig, TrainConfig
    from globalattn.harness.train import train
    summary = train(TrainConfig(task="mqar", model=ModelConfig(context=256, attention="dense"), steps=100))
    train(TrainConfig(task="mqar", model=ModelConfig(context=512, attention="dense"), task_options={"num_pairs": 32}))

Every ``eval_every`` steps (and at the end) the run evaluates on fixed validation batches, writes
``metrics.json`` and a checkpoint (checkpoint.py) into ``--out``.  The batch of step s is a pure
function of (seed, s) (see ``tasks.base``) and the learning rate one of s, so a run resumed from
its checkpoint (weights, optimizer state, RNG state, history) ends bitwise where the uninterrupted
run ends, on the same device.  A non-finite loss or gradient stops the run before the update that would spread
it, with the last good checkpoint kept.

Data-parallel: each of the W processes takes B / W rows of the same global batch, and the loss of
each is scaled so that the averaged gradient is that of the whole batch: W processes train as one
would, to rounding.  ``--fsdp`` shards parameters and optimizer state (FSDP2) for large models.

Packed documents (``--pack``, language-model tasks): the batches carry ``document_ids``, which the
model receives with the tokens, and targets that never cross a document boundary (tasks/text.py).

Context-parallel (``--context-parallel N``, language-model tasks, attention global or global-own):
groups of N consecutive ranks split every sequence into N shards of whole blocks and exchange only
the global tokens (``globalattn.distributed``); the W / N groups are data-parallel over the rows.
Each rank's loss is its shard's share of the same sum, so the scaling above still holds.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from globalattn.harness import checkpoint
from globalattn.harness.attention import resolved_block_size, resolved_window, routing_hits
from globalattn.harness.config import TrainConfig, top_blocks_of
from globalattn.harness.tasks import IGNORE, Task, make_task
from globalattn.harness.transformer import attention_cost, build_model, recorded_attention_inputs, use_context_parallel

METRICS = "metrics.json"
DISTRIBUTED_TIMEOUT = timedelta(minutes=10)


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient became NaN or infinite; the run stopped before updating on it."""


def train(
    config: TrainConfig,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    device: str = "cpu",
    fsdp: bool = False,
    progress: bool = False,
) -> dict:
    """Train, evaluate and checkpoint as the module docstring says; returns the run's summary (what
    ``metrics.json`` holds): config, data, model size, attention cost, history and final metrics."""
    out = Path(out) if out is not None else None
    rank, world, device = _init_distributed(device)
    task = make_task(config.task, config.model.context, config.seed, pack=config.pack, **config.task_options)
    model_config = config.model.for_task(task)
    torch.manual_seed(config.seed)  # the same initial weights in every process and every attention variant
    model = build_model(model_config).to(device)
    share = _share_of_this_rank(config, task, model, rank, world)
    wrapped = _wrap_for_distributed(model, world, device, fsdp)
    optimizer = _make_optimizer(model, config)
    window = resolved_window(model_config)  # None: the variant has no window

    summary = {
        "config": dataclasses.asdict(config),
        "data": {"task": task.name, "metric": task.metric, **task.describe()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "block_size": resolved_block_size(model_config),
        **({"window": window} if window is not None else {}),
        **attention_cost(model_config),
        "world_size": world,
        "device": str(device),
        "history": [],
        "train_seconds": 0.0,
        "step": 0,
    }
    if out is not None:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)  # an --out that cannot be written fails before any step
        found = checkpoint.latest(out)
        if found is not None and not resume:
            raise ValueError(f"{out} already holds a checkpoint (step {found[0]}); pass --resume or another --out")
        if found is not None:
            summary = checkpoint.load(*found, wrapped, optimizer, summary)

    bar = _progress_bar(config.steps, summary["step"], enabled=progress and rank == 0)
    losses, tokens_per_step = [], config.batch * config.model.context
    while summary["step"] < config.steps:
        step = summary["step"]
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        try:
            loss = _train_step(wrapped, optimizer, task, config, step, share, world, device)
        except NonFiniteLoss as stop:
            kept = checkpoint.latest(out) if out is not None else None
            where = f"the last good checkpoint (step {kept[0]}) is kept in {kept[1]}" if kept else "no checkpoint kept"
            raise NonFiniteLoss(f"{stop}; training stopped, {where}") from None
        summary["train_seconds"] += time.perf_counter() - started
        summary["step"] = step + 1
        losses.append(loss)
        if summary["step"] % config.eval_every == 0 or summary["step"] == config.steps:
            summary["history"].append(
                {
                    "step": summary["step"],
                    "train_seconds": round(summary["train_seconds"], 3),
                    "train_loss": sum(losses) / len(losses),
                    **evaluate(model, task, config, device, share),
                }
            )
            losses = []
            if out is not None:
                checkpoint.save(out, wrapped, optimizer, summary, rank)
                if rank == 0:
                    checkpoint.write_json_atomically(out / METRICS, summary)
        bar.update(1)
        last_val = f"{summary['history'][-1]['metric']:.3f}" if summary["history"] else "-"
        throughput = summary["step"] * tokens_per_step / max(summary["train_seconds"], 1e-9)
        bar.set_postfix(loss=f"{loss:.3f}", val=last_val, tok_s=f"{throughput:.0f}")
    bar.close()
    summary["final"] = summary["history"][-1] if summary["history"] else None
    summary["tokens_per_second"] = summary["step"] * tokens_per_step / max(summary["train_seconds"], 1e-9)
    if out is not None and rank == 0:
        checkpoint.write_json_atomically(out / METRICS, summary)
    return summary


@dataclass(frozen=True)
class _Share:
    """The part of every global batch this rank computes: some rows, and (context parallel) a shard of
    each sequence's positions, whose attention runs over ``group``."""

    rows: slice
    positions: slice = field(default_factory=lambda: slice(None))
    group: dist.ProcessGroup | None = None

    def of(self, batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
        return {
            k: (v[self.rows, self.positions] if v.dim() == 2 else v[self.rows]).to(device) for k, v in batch.items()
        }


def _share_of_this_rank(config: TrainConfig, task: Task, model, rank: int, world: int) -> _Share:
    size = config.context_parallel
    if size == 1:
        if config.batch % world:
            raise ValueError(f"batch ({config.batch}) must be a multiple of the number of processes ({world})")
        rows = config.batch // world
        return _Share(rows=slice(rank * rows, (rank + 1) * rows))
    from globalattn.distributed import context_parallel_groups, shard_range

    if task.metric != "bpc":
        raise ValueError(f"--context-parallel runs the language-model tasks (bits per character), not {task.name}")
    if world % size:
        raise ValueError(f"--context-parallel {size} needs a multiple of {size} processes (torchrun), got {world}")
    groups = context_parallel_groups(size, timeout=DISTRIBUTED_TIMEOUT)
    replicas, replica = world // size, dist.get_rank(groups.data_parallel)
    if config.batch % replicas:
        raise ValueError(f"batch ({config.batch}) must be a multiple of the data-parallel groups ({replicas})")
    rank_in_group = dist.get_rank(groups.context_parallel)
    shard = shard_range(config.model.context, resolved_block_size(model.config), rank_in_group, size, causal=True)
    use_context_parallel(model, groups.context_parallel, shard)
    rows = config.batch // replicas
    return _Share(
        rows=slice(replica * rows, (replica + 1) * rows),
        positions=slice(shard.start, shard.stop),
        group=groups.context_parallel,
    )


def _train_step(wrapped, optimizer, task, config, step, share: _Share, world, device) -> float:
    """One update on the global batch of ``step``; returns the global batch's mean loss."""
    batch = task.batch("train", step, config.batch)
    count = _loss_count(task, batch)
    local = share.of(batch, device)
    loss_sum = loss_sum_of(task, logits_of(wrapped, task, local, config.precision), local)
    (loss_sum * (world / count)).backward()  # DDP averages over processes: the sum of all / count
    loss = loss_sum.detach()
    if world > 1:
        dist.all_reduce(loss)
    loss = float(loss) / count
    grad_norm = float(torch.nn.utils.clip_grad_norm_(wrapped.parameters(), config.grad_clip))
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise NonFiniteLoss(f"step {step + 1}: the loss is {loss} and the gradient norm {grad_norm}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def logits_of(model, task: Task, batch: dict[str, torch.Tensor], precision: str) -> torch.Tensor:
    """(B, T, vocab) next-token logits (causal tasks; packed rows with their document ids) or
    (B, classes) class logits."""
    device_type = batch["tokens"].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        if task.causal:
            return model(batch["tokens"], batch.get("document_ids"))
        return model(batch["tokens"], batch["real"])


def loss_sum_of(task: Task, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy over the batch's scored targets (causal) or labels (classification)."""
    if task.causal:
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), reduction="sum")
    return F.cross_entropy(logits.float(), batch["labels"], reduction="sum")


def _loss_count(task: Task, batch) -> int:
    return int((batch["targets"] != IGNORE).sum()) if task.causal else len(batch["labels"])


@torch.no_grad()
def evaluate(model, task: Task, config: TrainConfig, device, share: _Share | None = None) -> dict:
    """Validation loss and metric on the fixed "val" batches 0, 1, ... of ``config.batch`` sequences,
    enough of them for ``eval_examples`` sequences.

    bpc: mean loss / ln 2.  accuracy: argmax right at each scored target (each label), or, for an
    exact-match task, at every target of the example.  The task's ``breakdown`` adds its accuracies
    by kind (MQAR by gap and block, passkey by digit and depth), and ``global-top{k}`` on MQAR how
    often each layer routes a query to its key's block (``_routing_hits``).
    """
    model.eval()
    loss_sum, loss_count, correct, batches, predictions = 0.0, 0, [], [], []
    positions = _Share(rows=slice(None), positions=share.positions) if share else _Share(rows=slice(None))
    for index in range(-(-config.eval_examples // config.batch)):
        batch = positions.of(task.batch("val", index, config.batch), device)
        logits = logits_of(model, task, batch, config.precision)
        loss_sum += float(loss_sum_of(task, logits, batch))
        loss_count += _loss_count(task, batch)
        if task.causal:
            scored = batch["targets"] != IGNORE
            predicted = logits.argmax(-1)
            hits = (predicted == batch["targets"]) | ~scored
            correct.append(hits.all(1) if task.exact_match else hits[scored])
            batches.append({k: v.cpu() for k, v in batch.items()})
            predictions.append(predicted.cpu())
        else:
            correct.append(logits.argmax(-1) == batch["labels"])
    routing = _routing_hits(model, task, config, device) if top_blocks_of(model.config.attention) else {}
    model.train()
    if share is not None and share.group is not None:  # each rank scored its shard: add them up
        totals = torch.tensor([loss_sum, loss_count], dtype=torch.float64, device=device)
        dist.all_reduce(totals, group=share.group)
        loss_sum, loss_count = float(totals[0]), int(totals[1])
    loss = loss_sum / loss_count
    correct = torch.cat(correct).cpu()
    result = {"val_loss": loss, "metric": loss / math.log(2) if task.metric == "bpc" else float(correct.float().mean())}
    if batches:
        joined = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        result.update(task.breakdown(joined, torch.cat(predictions), resolved_block_size(model.config)))
    return result | routing


def evaluate_run(out: str | Path, *, attention: str | None = None, device: str = "cpu") -> dict:
    """``evaluate`` on the last checkpoint of the run in ``out``, on the validation sequences its
    training saw, under its own attention or, with the same weights, ``attention`` (say a dense-trained
    model routed to its top blocks: whether its queries and keys would let a router find the right
    block).  Returns the step, the attention and the evaluation."""
    found = checkpoint.latest(Path(out), action="evaluate")
    if found is None:
        raise ValueError(f"{out} holds no checkpoint: give the --out folder of a run of globalattn train or compare")
    step, path = found
    config = checkpoint.saved_config(path, "evaluate")
    if attention is not None:
        config = dataclasses.replace(config, model=config.model.replace(attention=attention))
    task = make_task(config.task, config.model.context, config.seed, pack=config.pack, **config.task_options)
    model = build_model(config.model.for_task(task))
    checkpoint.load_weights(path, model, "evaluate")
    model.to(device)
    return {"step": step, "attention": config.model.attention, **evaluate(model, task, config, torch.device(device))}


# Validation sequences whose attention weights are looked at for the routing's hit rate: the weights
# are dense (B, H, T, T + G) float64 per layer, so few rows.
ROUTING_PROBE_ROWS = 16


def _routing_hits(model, task: Task, config: TrainConfig, device) -> dict:
    """For ``global-top{k}`` on a recall task: by layer, the fraction of (query, head) pairs routed to
    the block of the token the query must find (``attention.routing_hits``), and the fraction a
    random choice would reach.  Nothing for other tasks."""
    batch = task.batch("val", 0, min(config.batch, ROUTING_PROBE_ROWS))
    recall = task.recall_positions(batch)
    if recall is None:
        return {}
    batch = {k: v.to(device) for k, v in batch.items()}
    recall = tuple(x.to(device) for x in recall)
    with recorded_attention_inputs(model) as layers:
        logits_of(model, task, batch, config.precision)
    options = dict(block_size=resolved_block_size(model.config), top_blocks=top_blocks_of(model.config.attention))
    hits = [routing_hits(q, k, recall, **options) for q, k in layers]
    if hits[0] is None:  # no query recalls from an earlier block
        return {}
    return {"routed_to_key_block": [h["routed"] for h in hits], "routing_chance": hits[0]["chance"]}


def _make_optimizer(model, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; matrices decay, norms and biases do not (the embedding is a matrix: it decays)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


# ---------------------------------------------------------------------------------------------
# Distributed: torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).


def _init_distributed(device: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=DISTRIBUTED_TIMEOUT)
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return dist.get_rank(), world, torch.device(device)


def _wrap_for_distributed(model, world: int, device: torch.device, fsdp: bool):
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.blocks:
            fully_shard(block)
        return fully_shard(model)
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _progress_bar(total: int, initial: int, enabled: bool):
    """tqdm's bar (ETA, rate) when wanted and installed; otherwise a stand-in that does nothing."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        except ImportError:
            pass
    return _NoBar()


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, **values):
        pass

    def close(self):
        pass
