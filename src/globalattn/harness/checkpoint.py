"""Checkpoints of a training run, written atomically and checked whole before anything is restored.

    out/checkpoints/step-NNNNNNNN/model.safetensors       the weights alone, loadable by anyone
                                 /optimizer.safetensors   AdamW's state, one tensor per (parameter, key)
                                 /state.json              the run's summary, param groups, RNG state
    out/checkpoints/latest.json                           {"step": N, "path": "step-NNNNNNNN"}

A checkpoint is written into a temporary folder that is renamed into place, and latest.json is
replaced atomically only after that: a run killed mid-save leaves the previous checkpoint named and
whole.  Nothing is ever unpickled.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from globalattn import checks
from globalattn.harness.config import ModelConfig, TrainConfig

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"


def save(out: Path, model, optimizer, summary: dict, rank: int) -> None:
    """Write the checkpoint of ``summary["step"]`` into ``out`` and drop the earlier ones.  Every
    process calls it (FSDP gathers the full tensors); rank 0 writes."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    if rank != 0:
        return
    root = out / CHECKPOINTS
    name = _folder_name(summary["step"])
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
    write_json_atomically(root / LATEST, {"step": summary["step"], "path": name})
    for old in root.iterdir():  # earlier checkpoints, and leftovers of a save that was killed
        if old.is_dir() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def latest(out: Path, action: str = "resume from") -> tuple[int, Path] | None:
    """(step, folder) of the checkpoint that latest.json names, checked; None when there is none.
    ``action`` names what a refusal could not do ("cannot resume from ...")."""
    root = out / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.exists():
        return None
    named = _read_json(pointer, action)
    named = named if isinstance(named, dict) else {}
    step, name = named.get("step"), named.get("path")
    checks.non_negative_int(f"cannot {action} {pointer}: its step", step)
    # The folder its step names, inside checkpoints/: any other path could load another run's state.
    expected = _folder_name(step)
    if name != expected or not (root / name).is_dir():
        raise ValueError(f"cannot {action} {pointer}: it must name the folder {expected} in {root}, got {name!r}")
    return step, root / name


def load(step: int, path: Path, model, optimizer, summary: dict) -> dict:
    """Restore weights, optimizer state and RNG state; returns the saved summary (step, history)
    with this run's world size and device.

    Everything is checked before anything is restored: a checkpoint trained with other settings
    than ``summary["config"]``, with a missing or misshapen tensor, or with a step other than
    latest.json's, is refused with the file and what is wrong.
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
        saved_step, saved_config = saved["step"], saved["config"]
    except (KeyError, TypeError) as missing:
        raise ValueError(f"cannot resume from {path / 'state.json'}: it lacks {missing}") from None
    if saved_step != step:
        raise ValueError(f"cannot resume from {path / 'state.json'}: step {saved_step!r}, latest.json says {step}")
    if changed := _changed_settings(saved_config, summary["config"]):
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


def saved_config(path: Path, action: str) -> TrainConfig:
    """The config the checkpoint folder ``path`` (from ``latest``) was trained with."""
    state = _read_json(path / "state.json", action)
    try:
        saved = dict(state["summary"]["config"])
        model = saved.pop("model")
        return TrainConfig(model=ModelConfig(**model), **saved)
    except (KeyError, TypeError) as bad:
        raise ValueError(f"cannot {action} {path / 'state.json'}: its config is not this version's ({bad})") from None


def load_weights(path: Path, model, action: str) -> None:
    """The weights alone of the checkpoint folder ``path`` into ``model``, every tensor checked first."""
    weights = _read_tensors(path / "model.safetensors", action)
    expected = {name: t.shape for name, t in model.state_dict().items()}
    _check_tensors(path / "model.safetensors", weights, expected, action)
    model.load_state_dict(weights)


def write_json_atomically(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(data, indent=1))
    _fsync(staging)
    os.replace(staging, path)


def _folder_name(step: int) -> str:
    return f"step-{step:08d}"


def _changed_settings(saved: dict, now: dict) -> list[str]:
    """The settings that differ between two configs (``dataclasses.asdict`` of TrainConfig), the
    model's named ``model.<field>``.  A field added since the checkpoint was saved counts only when it
    is set to other than its default: a new field's default is what ran before it existed."""
    saved, now, defaults = _settings(saved), _settings(now), _defaults()
    return sorted(name for name in saved.keys() | now.keys() if saved.get(name, defaults.get(name)) != now.get(name))


def _defaults() -> dict:
    """The settings' defaults, named as ``_settings`` names them; fields without one are left out."""

    def of(cls) -> dict:
        return {
            f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        }

    return _settings({**of(TrainConfig), "model": of(ModelConfig)})


def _settings(config) -> dict:
    config = config if isinstance(config, dict) else {}
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    return {**{k: v for k, v in config.items() if k != "model"}, **{f"model.{k}": v for k, v in model.items()}}


def _read_json(path: Path, action: str = "resume from"):
    try:
        return json.loads(path.read_text())
    except OSError as failed:
        raise ValueError(f"cannot {action} {path}: {failed.strerror or failed}") from None
    except json.JSONDecodeError as bad:
        raise ValueError(f"cannot {action} {path}: not valid JSON ({bad})") from None


def _read_tensors(path: Path, action: str = "resume from") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except OSError as failed:
        raise ValueError(f"cannot {action} {path}: {failed.strerror or failed}") from None
    except SafetensorError as bad:
        raise ValueError(f"cannot {action} {path}: not a whole safetensors file ({bad})") from None


def _check_tensors(path: Path, tensors: dict, shapes: dict, action: str = "resume from") -> None:
    """Every expected tensor present with its shape, and no other."""
    for name, shape in shapes.items():
        if name not in tensors:
            raise ValueError(f"cannot {action} {path}: tensor {name!r} is missing")
        if tensors[name].shape != shape:
            raise ValueError(
                f"cannot {action} {path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                f"the model's is {tuple(shape)}"
            )
    if unknown := sorted(tensors.keys() - shapes.keys()):
        raise ValueError(f"cannot {action} {path}: unknown tensors {unknown[:3]}")


def _encode(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
