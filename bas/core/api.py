"""The Python API of the schedule: ``bas.extract`` does what ``bas run`` does (``bas.generate`` is the verb
:func:`bas.generation.generate.generate`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable


from bas.core.errors import BasError
from bas.core.plugins import Plugins, option_default  # noqa: F401 (option_default: re-exported)
from bas.core.training import Run, RunConfig
from bas.core.training import extract as _extract

CORE_FIELDS = {f.name for f in dataclasses.fields(RunConfig)} - {"options", "plugins"}


def make_config(plugins: Plugins, values: dict[str, Any], plugin_names: Iterable[str]) -> RunConfig:
    """A :class:`RunConfig` from option values; plugin options take their defaults when absent."""
    options = {opt.name: option_default(opt) for _, opt in plugins.run_options()}
    unknown = set(values) - CORE_FIELDS - set(options)
    if unknown:
        raise BasError(f"Unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(CORE_FIELDS | set(options)))}.")
    core = {k: v for k, v in values.items() if k in CORE_FIELDS and v is not None}
    options.update({k: v for k, v in values.items() if k in options})
    if "init_tokens" in core:
        core["init_tokens"] = list(core["init_tokens"])
    return RunConfig(plugins=list(plugin_names), options=options, **core)


def extract(image=None, masks=(), out="bas-out", *, plugins: Iterable[str] = (), **options) -> Run:
    """Extract one handle per mask from ``image`` and write the output folder ``out``.

    ``options`` are the ``bas run`` options with underscores (``phase1_steps=100``,
    ``model="stabilityai/stable-diffusion-2-1-base"``, ``lora_rank=8``, ...).  Returns the finished
    run; ``run.out`` is the folder and ``run.info`` what ``run.json`` holds.
    """
    plugins = list(plugins)
    manager = Plugins(plugins)
    values = dict(options, out=Path(out), image=Path(image) if image else None)
    if masks:
        values["masks"] = [Path(m) for m in masks]
    return _extract(make_config(manager, values, plugins), manager)
