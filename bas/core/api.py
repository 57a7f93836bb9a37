"""The Python API: ``bas.extract`` and ``bas.generate`` do what ``bas run`` and ``bas generate`` do."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable

import click

from bas.core.errors import BasError
from bas.core.generation import generate_images
from bas.core.plugins import Plugins
from bas.core.training import Run, RunConfig
from bas.core.training import extract as _extract

CORE_FIELDS = {f.name for f in dataclasses.fields(RunConfig)} - {"options", "plugins"}


def option_default(opt: click.Option) -> Any:
    """The value click would give an option that is not on the command line."""
    value = opt.get_default(click.Context(click.Command("bas")), call=True)
    if value is None or type(value).__name__ == "Sentinel":  # click 8.2+ marks "no default" with a sentinel
        return () if opt.multiple else (False if opt.is_flag else None)
    return opt.type_cast_value(click.Context(click.Command("bas")), value)


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


def generate(out, prompts, **options) -> list[Path]:
    """Generate images from a finished run; ``prompts`` is one prompt or a list.  Returns PNG paths."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return generate_images(Path(out), prompts, **options)
