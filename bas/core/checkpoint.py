"""Checkpoints: everything needed to continue a run exactly where it stopped.

A run works in its staging folder beside ``--out`` (:mod:`bas.core.runfolder`), so checkpoints
live there: ``.OUT.bas-partial/checkpoints/phase{P}-step{S:05d}/``.  Every function here takes
either the ``--out`` path or the staging folder itself.  A checkpoint folder is written under a
temporary name and renamed when complete, so the newest folder with a final name is always usable:

- ``trainable.safetensors``: the trainable parameters by name (handles, LoRA or full weights)
- ``rng.safetensors``: the run's torch generator state and the global torch RNG states
- ``optimizer.pt``: optimizer and grad-scaler state (plain tensors and numbers; loaded with
  ``torch.load(weights_only=True)``, never unpickling code)
- ``state.json``: phase, step, loss history, times, the Python RNG state and the run's options

Beside them, ``checkpoints/inputs.json`` records what a resumed run must match: the options (paths
resolved, so the same file given by another path matches) and a hash of the input image and masks
as they were loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bas.core import io, runfolder
from bas.core.errors import BasError

CHECKPOINT_DIR = runfolder.CHECKPOINTS
INPUTS_FILE = "inputs.json"
STATE_FILE = "state.json"
NAME = re.compile(r"phase([12])-step(\d+)")
# options that may differ between the interrupted command and the resuming one
# model_defaults and model_settings say where values came from; the values themselves are compared
RESUME_FREE_OPTIONS = {"resume", "overwrite", "quiet", "checkpoint_every", "model_defaults", "model_settings"}


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
    """The checkpoints of the run for ``--out`` ``out`` (or of the staging folder ``out``)."""
    folder = Path(out) if runfolder.is_staging(out) else runfolder.staging_path(out)
    return folder / CHECKPOINT_DIR


def complete_checkpoints(out: Path) -> list[Path]:
    """Finished checkpoint folders of the interrupted run for ``--out`` ``out``, oldest first
    (an empty list: nothing to resume).  Temporary folders start with a dot."""
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
        (tmp / STATE_FILE).write_text(json.dumps(state, default=str))
    for old in complete_checkpoints(out)[:-keep]:
        io.discard(old)  # renamed first: a crash half-way leaves a dot-name, never a damaged final one
    return final


def check_no_links(out: Path) -> None:
    """Refuse an interrupted run's staging folder that holds a link (or is one): bas never writes one,
    and resuming would read its checkpoint through it and write the rest of the run where it leads
    (the same rule as for every run, scene, model and export folder)."""
    staging = checkpoint_root(out).parent
    links = io.links_under(staging) if os.path.lexists(staging) else []
    if links:
        where = "is a link" if links[0] == staging else f"holds the link {links[0].relative_to(staging).as_posix()}"
        raise BasError(f"The interrupted run's folder {staging} {where}, which bas never writes (a link can lead to any file); "
                       "start over with --overwrite instead of --resume.")


def _newest(out: Path) -> tuple[list[Path], Path, int, int]:
    check_no_links(out)
    found = complete_checkpoints(out)
    if not found:
        raise BasError(f"{checkpoint_root(out)} holds no complete checkpoint to resume from; run the command without --resume to start over.")
    m = NAME.fullmatch(found[-1].name)
    return found, found[-1], int(m.group(1)), int(m.group(2))


def _unreadable(found: list[Path], path: Path, problem: str) -> BasError:
    older = "delete that folder to resume from an older one" if len(found) > 1 else "start over with --overwrite instead of --resume"
    return BasError(f"Checkpoint {path} cannot be read ({problem}); {older}.")


def _problem(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def latest_state(out: Path) -> dict:
    """The ``state.json`` of the newest complete checkpoint of the interrupted run for ``out``
    (phase, step, loss history, times and the run's options as ``config``), checked as
    :func:`load_latest` checks it, without loading any tensor: what a caller shows, or resumes
    with.  No checkpoint, or a damaged one, is one line."""
    found, path, phase, step = _newest(out)
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        problem = _state_damage(state, phase, step)
    except (OSError, ValueError) as exc:
        problem = _problem(exc)
    if problem:
        raise _unreadable(found, path, problem)
    return state


def load_latest(out: Path) -> Checkpoint:
    found, path, phase, step = _newest(out)
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        trainable = load_file(str(path / "trainable.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
        problem = _damage(state, optimizer, rng, phase, step)
    except Exception as exc:  # a damaged checkpoint is a user-facing condition, not a bug
        problem = _problem(exc)
    if problem:
        raise _unreadable(found, path, problem)
    return Checkpoint(path, phase, step, state, trainable, rng, optimizer)


def _state_damage(state, phase: int, step: int) -> str | None:
    """What is wrong with a checkpoint's loaded ``state.json``, or ``None``."""
    if not isinstance(state, dict):
        return f"{STATE_FILE} is not an object"
    kinds = {"phase": int, "step": int, "history": dict, "times": dict, "python_rng": list, "config": dict}
    for key, kind in kinds.items():
        if not isinstance(state.get(key), kind):
            return f"{STATE_FILE} has no valid '{key}'"
    if (state["phase"], state["step"]) != (phase, step):
        return f"{STATE_FILE} is of phase {state['phase']} step {state['step']}, not of the folder's"
    history = state["history"]  # the run goes on appending to it, and run.json and its report show it
    for name in ("phase1", "phase2"):
        steps = history.get(name)
        if not isinstance(steps, list) or not all(isinstance(s, dict) and _number(s.get("step")) and all(map(_number, s.values())) for s in steps):
            return f"{STATE_FILE} has no valid 'history' of {name} (a list of each step's losses)"
    if not all(_number(v) for v in state["times"].values()):
        return f"{STATE_FILE} has no valid 'times'"
    return None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _damage(state, optimizer, rng, phase: int, step: int) -> str | None:
    """What is wrong with a checkpoint's parts that loaded, or ``None``."""
    problem = _state_damage(state, phase, step)
    if problem:
        return problem
    if not isinstance(optimizer, dict) or not {"optimizer", "scaler"} <= set(optimizer):
        return "optimizer.pt holds no optimizer and scaler state"
    if "generator" not in rng or "torch_cpu" not in rng:
        return "rng.safetensors holds no generator state"
    return None


def write_inputs(out: Path, record: dict) -> None:
    """What a resumed run must match (see the module's description)."""
    io.write_json(checkpoint_root(out) / INPUTS_FILE, record)


def read_inputs(out: Path) -> dict | None:
    path = checkpoint_root(out) / INPUTS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BasError(f"{path} cannot be read ({exc}); start over with --overwrite instead of --resume.") from exc
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise BasError(f"{path} is damaged; start over with --overwrite instead of --resume.")
    return data


def check_same_run(saved_config: dict, config: dict, defaults: dict | None = None) -> None:
    """Refuse to resume with options that would make the result differ from an uninterrupted run.

    ``out`` is not compared: the checkpoint was found from it, whichever path named the folder.
    ``defaults``: bas's own value of every option (:func:`bas.core.training.bas_defaults`), so that a message can say
    where a value came from.
    """
    def comparable(c):
        flat = {k: v for k, v in c.items() if k not in RESUME_FREE_OPTIONS and k not in ("options", "out")}
        flat.update({f"options.{k}": v for k, v in c.get("options", {}).items() if k not in RESUME_FREE_OPTIONS})
        return flat

    a, b = comparable(saved_config), comparable(json.loads(json.dumps(config, default=str)))
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
        recommended = config.get("model_settings") or {}
        k = diff[0]
        if "plugins" in diff:  # a plugin brings options of its own: the plugins are the difference to name
            k = "plugins"
            then, now = a.get("plugins") or [], b.get("plugins") or []
            models = set(recommended.get("plugins") or ()) | set((saved_config.get("model_settings") or {}).get("plugins") or ())
            if {n.removeprefix("no:") for n in set(then) ^ set(now)} <= models:
                raise BasError(
                    f"The checkpoint was made with plugins {then}, but this command runs {now}: {config.get('model')}'s recommended "
                    "plugins differ; resume with the interrupted run's plugins (--plugin NAME turns one on, --plugin no:NAME off), "
                    "or use --overwrite to start over."
                )
        if k != "plugins" and k.removeprefix("options.") in recommended:  # the user gave no value: the model's settings did
            raise BasError(
                f"The checkpoint was made with {k}={a.get(k)!r}, but this command takes {b.get(k)!r} from {config.get('model')}'s "
                "recommended settings; resume with --no-model-defaults (or with the interrupted run's options)."
            )
        name = k.removeprefix("options.")
        if k != "plugins" and name in (saved_config.get("model_settings") or {}):  # the checkpoint's value was the model's recommendation
            made = f"The checkpoint was made with {name}={a.get(k)!r} from {saved_config.get('model')}'s recommended settings"
            default = (defaults or {}).get(k, object())
            if b.get(k) == default and config.get("model_defaults") is False:
                raise BasError(f"{made}, but this command has bas's default {b.get(k)!r} because --no-model-defaults leaves those settings "
                               "out; resume without --no-model-defaults, as the interrupted run was started.")
            if b.get(k) == default:
                raise BasError(f"{made}, but this command has bas's default {b.get(k)!r}; resume with {name}={a.get(k)!r}, "
                               "or use --overwrite to start over.")
            raise BasError(f"{made}, but this command gives {b.get(k)!r}; resume with the interrupted run's {name}={a.get(k)!r}, "
                           "or use --overwrite to start over with yours.")
        raise BasError(
            f"The checkpoint was made with {k}={a.get(k)!r} but this command has {b.get(k)!r}; "
            "resume with the same options as the interrupted run, or use --overwrite to start over."
        )


def check_same_inputs(saved: str | None, current: str) -> None:
    if saved is not None and saved != current:
        raise BasError("The input image or masks differ from those the interrupted run was trained on; "
                       "resume with the same inputs, or use --overwrite to start over with these.")


def remove_all(out: Path) -> None:
    shutil.rmtree(checkpoint_root(out), ignore_errors=True)
