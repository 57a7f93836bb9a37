"""A finished run folder as generation, editing and export read it: run.json, its family, its prompts.

Training writes run folders and imports nothing from here but the prompt wording; generation,
editing and export import this module and never the training loop, so core modules import in
one direction.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from bas.core import checks, io
from bas.core.errors import BasError
from bas.core.family import ModelFamily, get_family, model_of_run
from bas.core.handles import HANDLE_KEY, check_handle_names
from bas.core.model import family_of
from bas.core.plugins import Plugins, available_plugin_names, parse_plugin_names

PROMPT_PREFIX = "a photo of "
MAX_RUN_JSON = 64 * 2**20  # a run.json holds options and loss histories: a few MB at most
MAX_HANDLES_FILE = 16 * 2**20  # 8 handles of 4096 floats take 128 KB
RUN_FIELDS = {"model": str, "handles": list, "files": list, "resolution": int}


WEIGHTS_SUFFIX = ".safetensors"


def damaged_weights(path: Path, why: str) -> BasError:
    return BasError(f"{path} {why}; the run folder is damaged: restore it from a copy or re-run `bas run`.")


def weight_names(path: Path) -> list[str]:
    """The tensor names of one of a run's safetensors files, from its header alone (no tensor is read):
    a file safetensors cannot read (garbage, truncated, not safetensors) or that holds no tensor is
    refused with one line naming it."""
    try:
        with safe_open(str(path), "pt") as f:
            names = list(f.keys())
    except Exception as exc:  # safetensors reports a damaged header or a short file with its own errors (SafetensorError)
        raise damaged_weights(path, f"cannot be read as safetensors ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not names:
        raise damaged_weights(path, "holds no weights (no tensor)")
    return names


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one of a run's safetensors files (its handles, its LoRA): every command reads a run's
    weights through here (or :func:`weight_names`), so a damaged file is one line naming it, never a traceback."""
    weight_names(path)
    try:
        return load_file(str(path))
    except Exception as exc:
        raise damaged_weights(path, f"cannot be read as safetensors ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc


def run_weight_files(out: Path, info: dict) -> list[Path]:
    """The safetensors files of a run: those run.json lists (handles, LoRA, embeddings) and those in the
    folders it lists (a full fine-tune's ``pipeline/``)."""
    found = []
    for name in info["files"]:
        path = io.inside(out, name.rstrip("/"), f"{out}/run.json")
        if path.is_dir():
            found += sorted(p for p in path.rglob(f"*{WEIGHTS_SUFFIX}") if p.is_file())
        elif name.endswith(WEIGHTS_SUFFIX):
            found.append(path)
    return found


def check_plugin_names(path: Path, info: dict) -> None:
    """``plugin_names`` is a list of plugin names (``--plugin`` values), each of an installed plugin."""
    names = info.get("plugin_names")
    if names is None:
        return
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise BasError(f"{path} has no valid 'plugin_names' (a list of plugin names); the folder is damaged, re-run `bas run`.")
    wanted, blocked = parse_plugin_names(names)
    installed = set(available_plugin_names())
    missing = [n for n in wanted + blocked if n not in installed]
    if missing:
        raise BasError(f"{path.parent} was made with the plugin '{missing[0]}' (its run.json names it), which is not installed; "
                       f"install the package that provides '{missing[0]}' (`bas plugins` lists those installed), then run the command again.")


def all_handles_prompt(handles: list[str]) -> str:
    """The prompt naming every handle, as training phrases it: image variations of the whole scene."""
    return PROMPT_PREFIX + " and ".join(handles)


def read_run(out: Path) -> dict:
    """The ``run.json`` of a finished run, after checking that the folder's files agree with it.

    Refused with one line: one of bas's own entries beside a run (``.NAME.bas-partial``, its lock,
    ``.NAME.bas-old``), named with its run; a folder that is not a finished run (an interrupted one is named as
    such), a damaged ``run.json``, handle names that are not ``<assetN>``, a handles file that does
    not hold exactly the handles ``run.json`` lists, listed files that are missing or leave the
    folder, and files that differ from the sizes and hashes ``run.json`` recorded (a mixed folder); a ``family``
    that is not a name, ``plugin_names`` that are not a list of names or name a plugin not installed, and a
    weights file (handles, LoRA, pipeline) that safetensors cannot read or that holds no tensor, whatever
    run.json's checksums say (runs before bas 0.2 have none).
    An interrupted swap of a newer run into ``out`` is finished (or undone) first.
    """
    from bas.core import checkpoint, runfolder

    out = Path(out)
    runfolder.check_not_own_entry(out)  # a staging folder may hold a complete run.json: not the run to read
    runfolder.settle(out)
    path = io.inside(out, "run.json", str(out))  # a link that leaves the folder is refused, as for every file read from it
    if not path.is_file():
        if checkpoint.complete_checkpoints(out):
            raise BasError(f"{out} holds an interrupted run, not a finished one; continue it with `bas run ... --resume` (the same options as before).")
        if not out.exists():
            raise BasError(f"{out} does not exist; pass the --out folder of a completed `bas run`.")
        raise BasError(f"{out} is not a finished bas run (it has no run.json); pass the --out folder of a completed `bas run`.")
    if path.stat().st_size > MAX_RUN_JSON:
        raise BasError(f"{path} is {path.stat().st_size:,} bytes, far more than a run.json holds; the folder is damaged, re-run `bas run`.")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise BasError(f"{path} is not valid JSON ({exc}); the folder is damaged, re-run `bas run`.") from exc
    if not isinstance(info, dict):
        raise BasError(f"{path} does not hold a run's record; the folder is damaged, re-run `bas run`.")
    for key, kind in RUN_FIELDS.items():
        if not isinstance(info.get(key), kind) or isinstance(info.get(key), bool):
            raise BasError(f"{path} has no valid '{key}'; the folder is damaged, re-run `bas run`.")
    handles = info["handles"]
    if not handles or handles != [f"<asset{i}>" for i in range(len(handles))]:
        raise BasError(f"{path} lists the handles {handles!r}, not <asset0>, <asset1>, ... in order; the folder is damaged, re-run `bas run`.")
    if info.get("background") not in (None, *handles):
        raise BasError(f"{path} names a background handle {info['background']!r} that is not among its handles; re-run `bas run`.")
    if info.get("weights") is not None and not isinstance(info["weights"], str):
        raise BasError(f"{path} has no valid 'weights'; the folder is damaged, re-run `bas run`.")
    if info.get("family") is not None and not isinstance(info["family"], str):
        raise BasError(f"{path} has no valid 'family' (a family name such as \"sd\"); the folder is damaged, re-run `bas run`.")
    check_plugin_names(path, info)
    if not isinstance(info.get("config", {}), dict) or not isinstance(info.get("config", {}).get("options", {}), dict):
        raise BasError(f"{path} has no valid 'config'; the folder is damaged, re-run `bas run`.")
    checks.check_side(f"{path}'s resolution", info["resolution"])
    for name in info["files"]:
        if not isinstance(name, str) or not io.inside(out, name.rstrip("/"), str(path)).exists():
            raise BasError(f"{out} is incomplete: {name}, which its run.json lists, is missing; restore the folder or re-run `bas run`.")
    if info.get("weights") and not info.get("weight_files", True):
        raise BasError(f"{path} says the run trained {info['weights']} weights but lists no file of them; re-run `bas run`.")
    if "checksums" in info:
        sealed = info.get("sealed_folders", [name for name in info["files"] if name.endswith("/")])  # earlier runs: pipeline/
        if not isinstance(sealed, list):
            raise BasError(f"{path} has no valid 'sealed_folders'; the folder is damaged, re-run `bas run`.")
        runfolder.verify(out, info["checksums"], out, sealed)
    handles_file = io.inside(out, "handles.safetensors", str(path))
    if handles_file.is_file() and handles_file.stat().st_size > MAX_HANDLES_FILE:
        raise BasError(f"{handles_file} is {handles_file.stat().st_size:,} bytes, far more than a few handles take; the folder is damaged, re-run `bas run`.")
    saved = read_weights(handles_file)
    for weights in run_weight_files(out, info):  # headers only: garbage in a LoRA or pipeline file is one line here, not a loader's traceback
        weight_names(weights)
    saved_handles = check_handle_names(saved)  # one row per handle and text encoder (bas.core.handles)
    if saved_handles != handles:
        raise BasError(f"{out} is mixed: handles.safetensors holds {', '.join(saved_handles) or 'nothing'} but run.json lists {', '.join(handles)}; "
                       "re-run `bas run` into a new folder.")
    encoders: dict[str | None, set] = {}
    for key, row in saved.items():
        encoders.setdefault(HANDLE_KEY.fullmatch(key).group(1), set()).add(tuple(row.shape))
    if any(len(dims) != 1 or len(next(iter(dims))) != 1 for dims in encoders.values()) or len(saved) != len(handles) * len(encoders) \
            or not all(torch.isfinite(t.float()).all() for t in saved.values()):
        raise BasError(f"{out / 'handles.safetensors'} does not hold one finite vector per handle and text encoder; the folder is damaged, re-run `bas run`.")
    return info


def slug(text: str, length: int = 40) -> str:
    """A file-name-safe version of a prompt: no separators, no dots, nothing that escapes a folder."""
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return s[:length].strip("-") or "image"


@dataclass
class SavedConfig:
    """A finished run's options, as a weight strategy's factory gets them when its weights are loaded
    again (for generation or export) rather than trained: ``out`` and ``options`` as in a run's config."""

    out: Path
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, out: Path, info: dict) -> "SavedConfig":
        return cls(Path(out), dict(info.get("config", {}).get("options", {})))


def run_plugins(info: dict) -> Plugins:
    """The plugins the run was made with (installed ones named with --plugin included)."""
    return Plugins(info.get("plugin_names") or [])


def run_family(info: dict, plugins=None, out: Path | None = None) -> ModelFamily:
    """The run's model family: the one run.json names, or for runs made before families were
    recorded, the family of its base model (``out``: the run, which a message about that model names)."""
    plugins = plugins or run_plugins(info)
    if info.get("family"):  # what the run was trained as, whatever its model's files say now
        return get_family(plugins, info["family"])
    with run_model(out):
        return family_of(info["model"], None, plugins)


def run_model(out: Path | None):
    """Around loading a run's base model: a model that cannot be loaded is named as the one the run's
    run.json names (no command that reads a run takes --model)."""
    return model_of_run(Path(out)) if out is not None else contextlib.nullcontext()
