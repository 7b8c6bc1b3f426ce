"""Train one small transformer on one task, with checkpoints that resume exactly.

    globalattn train --task shakespeare --attention global --context 512 --steps 300 --out runs/sh-global
    globalattn train ... --out runs/sh-global --resume        # continue from the last checkpoint
    torchrun --nproc_per_node=8 -m globalattn train ...       # the same options, data-parallel (DDP)

    from globalattn.train import TrainConfig, train
    summary = train(TrainConfig(task="mqar", attention="dense", context=256, steps=100))
    train(TrainConfig(task="mqar", attention="dense", context=512, task_options={"num_pairs": 32}))  # the task's own

Every ``eval_every`` steps (and at the end) the run evaluates on fixed validation batches, writes
``metrics.json`` and a checkpoint into ``--out``.  The batch of step s is a pure function of
(seed, s) (see ``tasks.base``) and the learning rate one of s, so a run resumed from its checkpoint
(weights, optimizer state, RNG state, history) ends bitwise where the uninterrupted run ends, on
the same device.  A non-finite loss or gradient stops the run before the update that would spread
it, with the last good checkpoint kept.

Data-parallel: each of the W processes takes B / W rows of the same global batch, and the loss of
each is scaled so that the averaged gradient is that of the whole batch: W processes train as one
would, to rounding.  ``--fsdp`` shards parameters and optimizer state (FSDP2) for large models.

Context-parallel (``--context-parallel N``, language-model tasks, attention global or global-own):
groups of N consecutive ranks split every sequence into N shards of whole blocks and exchange only
the global tokens (``globalattn.distributed``); the W / N groups are data-parallel over the rows.
Each rank's loss is its shard's share of the same sum, so the scaling above still holds.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from globalattn.models import ModelConfig, build_model, use_context_parallel
from globalattn.tasks import IGNORE, TASKS, Task, check_options, make_task

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
METRICS = "metrics.json"
DISTRIBUTED_TIMEOUT = timedelta(minutes=10)
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    task: str
    attention: str
    context: int
    steps: int = 200
    batch: int = 16  # global batch: sequences per step over all processes
    lr: float = 3e-3
    seed: int = 0
    # the model
    d_model: int = 128
    n_layer: int = 2
    n_head: int = 4
    block_size: int | None = None  # None: a power of two near sqrt(context) (attention.default_block_size)
    window: int | None = None  # sliding; None: matched to global's attended-key count
    dropout: float = 0.0
    precision: str = "fp32"  # or "bf16": matmuls and attention under bfloat16 autocast (weights stay fp32)
    # the optimisation: AdamW, linear warm-up then cosine decay to lr / 10
    warmup: int | None = None  # None: steps // 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 50  # also checkpoints then
    eval_examples: int = 64  # validation sequences per evaluation (whole batches: rounded up)
    context_parallel: int = 1  # ranks that share each sequence (see the module docstring)
    # the task's own options, given to its constructor (tasks.make_task), e.g. mqar's num_pairs
    task_options: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.task_options, Mapping):
            raise ValueError(f"task_options must be a dict of option name -> value, got {self.task_options!r}")
        if self.task in TASKS:  # an unknown task is refused by make_task, naming the known ones
            check_options(self.task, self.task_options)  # names here; the task checks the values
        options = dict(sorted(self.task_options.items(), key=lambda item: str(item[0])))
        object.__setattr__(self, "task_options", options)  # a copy, in one order for the records
        for name in ("context", "steps", "batch", "eval_every", "eval_examples", "context_parallel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    def model_config(self, task: Task) -> ModelConfig:
        return ModelConfig(
            vocab_size=task.vocab_size,
            context=self.context,
            attention=self.attention,
            causal=task.causal,
            block_size=self.block_size,
            window=self.window,
            n_layer=self.n_layer,
            n_head=self.n_head,
            d_model=self.d_model,
            dropout=self.dropout,
            num_classes=task.num_classes,
        )

    def lr_at(self, step: int) -> float:
        warmup = self.steps // 10 if self.warmup is None else self.warmup
        if step < warmup:
            return self.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, self.steps - warmup)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


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
    task = make_task(config.task, config.context, config.seed, **config.task_options)
    model_config = config.model_config(task)
    torch.manual_seed(config.seed)  # the same initial weights in every process and every attention variant
    model = build_model(model_config).to(device)
    share = _share_of_this_rank(config, task, model, rank, world)
    wrapped = _wrap_for_distributed(model, world, device, fsdp)
    optimizer = _make_optimizer(model, config)

    summary = {
        "config": dataclasses.asdict(config),
        "data": {"task": task.name, "metric": task.metric, **task.describe()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "block_size": model_config.resolved_block_size,
        **({"window": model_config.resolved_window} if config.attention == "sliding" else {}),
        **model_config.attention_cost(),
        "world_size": world,
        "device": str(device),
        "history": [],
        "train_seconds": 0.0,
        "step": 0,
    }
    if out is not None:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)  # an --out that cannot be written fails before any step
        checkpoint = _latest_checkpoint(out)
        if checkpoint is not None and not resume:
            raise ValueError(f"{out} already holds a checkpoint (step {checkpoint[0]}); pass --resume or another --out")
        if checkpoint is not None:
            summary = _load_checkpoint(*checkpoint, wrapped, optimizer, summary)

    bar = _progress_bar(config.steps, summary["step"], enabled=progress and rank == 0)
    losses, tokens_per_step = [], config.batch * config.context
    while summary["step"] < config.steps:
        step = summary["step"]
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        try:
            loss = _train_step(wrapped, optimizer, task, config, step, share, world, device)
        except NonFiniteLoss as stop:
            kept = _latest_checkpoint(out) if out is not None else None
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
                _save_checkpoint(out, wrapped, optimizer, summary, rank)
        bar.update(1)
        last_val = f"{summary['history'][-1]['metric']:.3f}" if summary["history"] else "-"
        throughput = summary["step"] * tokens_per_step / max(summary["train_seconds"], 1e-9)
        bar.set_postfix(loss=f"{loss:.3f}", val=last_val, tok_s=f"{throughput:.0f}")
    bar.close()
    summary["final"] = summary["history"][-1] if summary["history"] else None
    summary["tokens_per_second"] = summary["step"] * tokens_per_step / max(summary["train_seconds"], 1e-9)
    if out is not None and rank == 0:
        _write_json_atomically(out / METRICS, summary)
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
    shard = shard_range(
        config.context, model.config.resolved_block_size, dist.get_rank(groups.context_parallel), size, causal=True
    )
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
    """(B, T, vocab) next-token logits (causal tasks) or (B, classes) class logits."""
    device_type = batch["tokens"].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        return model(batch["tokens"]) if task.causal else model(batch["tokens"], batch["real"])


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
    exact-match task, at every target of the example.  Passkey adds ``accuracy_by_depth``.
    """
    model.eval()
    loss_sum, loss_count, correct, depths = 0.0, 0, [], []
    positions = _Share(rows=slice(None), positions=share.positions) if share else _Share(rows=slice(None))
    for index in range(-(-config.eval_examples // config.batch)):
        batch = positions.of(task.batch("val", index, config.batch), device)
        logits = logits_of(model, task, batch, config.precision)
        loss_sum += float(loss_sum_of(task, logits, batch))
        loss_count += _loss_count(task, batch)
        if task.causal:
            scored = batch["targets"] != IGNORE
            hits = (logits.argmax(-1) == batch["targets"]) | ~scored
            correct.append(hits.all(1) if task.exact_match else hits[scored])
        else:
            correct.append(logits.argmax(-1) == batch["labels"])
        if "depth" in batch:
            depths.append(batch["depth"])
    model.train()
    if share is not None and share.group is not None:  # each rank scored its shard: add them up
        totals = torch.tensor([loss_sum, loss_count], dtype=torch.float64, device=device)
        dist.all_reduce(totals, group=share.group)
        loss_sum, loss_count = float(totals[0]), int(totals[1])
    loss = loss_sum / loss_count
    correct = torch.cat(correct).cpu()
    result = {"val_loss": loss, "metric": loss / math.log(2) if task.metric == "bpc" else float(correct.float().mean())}
    if depths:
        from globalattn.tasks.passkey import accuracy_by_depth

        result["accuracy_by_depth"] = accuracy_by_depth(correct, torch.cat(depths).cpu())
    return result


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


# ---------------------------------------------------------------------------------------------
# Checkpoints: out/checkpoints/step-NNNNNNNN/{model,optimizer}.safetensors + state.json, and
# out/checkpoints/latest.json naming the complete one.  A checkpoint is written into a temporary
# folder that is renamed into place, and latest.json is replaced atomically only after that: a run
# killed mid-save leaves the previous checkpoint named and whole.  Nothing is ever unpickled.


def _save_checkpoint(out: Path, model, optimizer, summary: dict, rank: int) -> None:
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)  # every process takes part (FSDP gathers)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    if rank != 0:
        return
    root = out / CHECKPOINTS
    name = f"step-{summary['step']:08d}"
    staging = root / f"{name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tensors = {f"{fqn}/{key}": value for fqn, state in optimizer_state["state"].items() for key, value in state.items()}
    save_file({k: v.contiguous() for k, v in weights.items()}, staging / "model.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, staging / "optimizer.safetensors")
    state = {
        "summary": summary,
        "param_groups": optimizer_state["param_groups"],
        "rng": {"cpu": _encode(torch.get_rng_state())},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["rng"]["cuda"] = _encode(torch.cuda.get_rng_state())
    (staging / "state.json").write_text(json.dumps(state))
    for path in staging.iterdir():
        _fsync(path)
    shutil.rmtree(root / name, ignore_errors=True)
    os.replace(staging, root / name)
    _write_json_atomically(root / LATEST, {"step": summary["step"], "path": name})
    _write_json_atomically(out / METRICS, summary)
    for old in root.iterdir():  # earlier checkpoints, and leftovers of a save that was killed
        if old.is_dir() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def _latest_checkpoint(out: Path) -> tuple[int, Path] | None:
    """(step, folder) of the checkpoint that latest.json names, checked; None when there is none."""
    root = out / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.exists():
        return None
    latest = _read_json(pointer)
    latest = latest if isinstance(latest, dict) else {}
    step, name = latest.get("step"), latest.get("path")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"cannot resume from {pointer}: its step must be a non-negative int, got {step!r}")
    # The folder its step names, inside checkpoints/: any other path could load another run's state.
    expected = f"step-{step:08d}"
    if name != expected or not (root / name).is_dir():
        raise ValueError(f"cannot resume from {pointer}: it must name the folder {expected} in {root}, got {name!r}")
    return step, root / name


def _load_checkpoint(step: int, path: Path, model, optimizer, summary: dict) -> dict:
    """Restore weights, optimizer state and RNG state; returns the saved summary (step, history).

    Everything is checked before anything is restored: a checkpoint with a missing or misshapen
    tensor, or a step other than latest.json's, is refused with the file and what is wrong.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = _read_json(path / "state.json")
    try:
        saved, param_groups, rng = state["summary"], state["param_groups"], state["rng"]["cpu"]
        saved_step = saved["step"]
    except (KeyError, TypeError) as missing:
        raise ValueError(f"cannot resume from {path / 'state.json'}: it lacks {missing}") from None
    if saved_step != step:
        raise ValueError(f"cannot resume from {path / 'state.json'}: step {saved_step!r}, latest.json says {step}")
    if saved["config"] != summary["config"]:
        fields = saved["config"].keys() | summary["config"].keys()  # a field added since it was saved counts too
        changed = sorted(k for k in fields if saved["config"].get(k) != summary["config"].get(k))
        raise ValueError(f"cannot resume from {path}: it was trained with other settings ({', '.join(changed)})")
    options = StateDictOptions(full_state_dict=True)
    expected = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    weights = _read_tensors(path / "model.safetensors")
    _check_tensors(path / "model.safetensors", weights, {name: t.shape for name, t in expected.items()})
    per_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in _read_tensors(path / "optimizer.safetensors").items():
        fqn, name = key.rsplit("/", 1)
        per_param.setdefault(fqn, {})[name] = value
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    trainable = {name.removeprefix("module.") for name in trainable}  # DDP's wrapper prefix
    if saved_step > 0 and set(per_param) != trainable:
        missing = sorted(trainable - set(per_param)) or sorted(set(per_param) - trainable)
        raise ValueError(
            f"cannot resume from {path / 'optimizer.safetensors'}: no optimizer state for, or unknown, {missing[:3]}"
        )
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, {"state": per_param, "param_groups": param_groups}, options=options)
    torch.set_rng_state(_decode(rng))
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(_decode(state["rng"]["cuda"]))
    return {**saved, "world_size": summary["world_size"], "device": summary["device"]}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except OSError as failed:
        raise ValueError(f"cannot resume from {path}: {failed.strerror or failed}") from None
    except json.JSONDecodeError as bad:
        raise ValueError(f"cannot resume from {path}: not valid JSON ({bad})") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except OSError as failed:
        raise ValueError(f"cannot resume from {path}: {failed.strerror or failed}") from None
    except SafetensorError as bad:
        raise ValueError(f"cannot resume from {path}: not a whole safetensors file ({bad})") from None


def _check_tensors(path: Path, tensors: dict, shapes: dict) -> None:
    """Every expected tensor present with its shape, and no other."""
    for name, shape in shapes.items():
        if name not in tensors:
            raise ValueError(f"cannot resume from {path}: tensor {name!r} is missing")
        if tensors[name].shape != shape:
            raise ValueError(
                f"cannot resume from {path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                f"the model's is {tuple(shape)}"
            )
    if unknown := sorted(tensors.keys() - shapes.keys()):
        raise ValueError(f"cannot resume from {path}: unknown tensors {unknown[:3]}")


def _encode(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _write_json_atomically(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(data, indent=1))
    _fsync(staging)
    os.replace(staging, path)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


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
