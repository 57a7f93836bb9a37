"""Checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a folder ``OUT/checkpoints/phase{P}-step{S:05d}/`` written under a temporary
name and renamed when complete, so the newest folder with a final name is always usable:

- ``trainable.safetensors``: the trainable parameters by name (handles, LoRA or full weights)
- ``rng.safetensors``: the run's torch generator state and the global torch RNG states
- ``optimizer.pt``: optimizer and grad-scaler state (plain tensors and numbers; loaded with
  ``torch.load(weights_only=True)``, never unpickling code)
- ``state.json``: phase, step, loss history, times, the Python RNG state and the run's options
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bas.core import io
from bas.core.errors import BasError

CHECKPOINT_DIR = "checkpoints"
NAME = re.compile(r"phase([12])-step(\d+)")
# options that may differ between the interrupted command and the resuming one
RESUME_FREE_OPTIONS = {"resume", "overwrite", "quiet", "checkpoint_every"}


@dataclass
class Checkpoint:
    path: Path
    phase: int
    step: int
    state: dict
    trainable: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]
    optimizer: dict


def checkpoint_root(out: Path) -> Path:
    return Path(out) / CHECKPOINT_DIR


def complete_checkpoints(out: Path) -> list[Path]:
    """Finished checkpoint folders, oldest first (temporary folders start with a dot)."""
    root = checkpoint_root(out)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), int(m.group(2)), p) for p in root.iterdir() if p.is_dir() and (m := NAME.fullmatch(p.name))]
    return [p for _, _, p in sorted(found)]


def save(out: Path, phase: int, step: int, trainable: dict[str, torch.Tensor], rng: dict[str, torch.Tensor],
         optimizer_state: dict, state: dict, keep: int = 1) -> Path:
    final = checkpoint_root(out) / f"phase{phase}-step{step:05d}"
    with io.atomic_path(final, directory=True) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        save_file({k: v.to("cpu").contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, default=str))
    for old in complete_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(out: Path) -> Checkpoint:
    found = complete_checkpoints(out)
    if not found:
        raise BasError(f"{checkpoint_root(out)} holds no complete checkpoint to resume from; run the command without --resume to start over.")
    path = found[-1]
    m = NAME.fullmatch(path.name)
    try:
        state = json.loads((path / "state.json").read_text())
        optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        trainable = load_file(str(path / "trainable.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
    except Exception as exc:  # a damaged checkpoint is a user-facing condition, not a bug
        raise BasError(f"Checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); delete that folder to resume from an older one.") from exc
    return Checkpoint(path, int(m.group(1)), int(m.group(2)), state, trainable, rng, optimizer)


def check_same_run(saved_config: dict, config: dict) -> None:
    """Refuse to resume with options that would make the result differ from an uninterrupted run."""
    def comparable(c):
        flat = {k: v for k, v in c.items() if k not in RESUME_FREE_OPTIONS and k != "options"}
        flat.update({f"options.{k}": v for k, v in c.get("options", {}).items() if k not in RESUME_FREE_OPTIONS})
        return flat

    a, b = comparable(saved_config), comparable(json.loads(json.dumps(config, default=str)))
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
        k = diff[0]
        raise BasError(
            f"The checkpoint was made with {k}={a.get(k)!r} but this command has {b.get(k)!r}; "
            "resume with the same options as the interrupted run, or use --overwrite to start over."
        )


def remove_all(out: Path) -> None:
    shutil.rmtree(checkpoint_root(out), ignore_errors=True)
