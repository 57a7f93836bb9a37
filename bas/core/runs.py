"""A finished run folder as generation, editing and export read it: run.json, its family, its prompts.

Training writes run folders and imports nothing from here but the prompt wording; generation,
editing and export import this module and never the training loop, so core modules import in
one direction.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bas.core.errors import BasError
from bas.core.family import ModelFamily
from bas.core.model import family_of
from bas.core.plugins import Plugins

PROMPT_PREFIX = "a photo of "


def all_handles_prompt(handles: list[str]) -> str:
    """The prompt naming every handle, as training phrases it: image variations of the whole scene."""
    return PROMPT_PREFIX + " and ".join(handles)


def read_run(out: Path) -> dict:
    out = Path(out)
    path = out / "run.json"
    if not path.is_file():
        raise BasError(f"{out} is not a finished bas run (it has no run.json); pass the --out folder of a completed `bas run`.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BasError(f"{path} is not valid JSON ({exc}); re-run `bas run` to rewrite it.") from exc


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


def run_family(info: dict, plugins=None) -> ModelFamily:
    """The run's model family: the one run.json names, or for runs made before families were
    recorded, the family of its base model."""
    return family_of(info["model"], info.get("family"), plugins or run_plugins(info))
