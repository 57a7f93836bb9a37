"""The Python API of the schedule: ``bas.extract`` does what ``bas run`` does (``bas.generate`` is the verb
:func:`bas.generation.generate.generate`)."""

from __future__ import annotations

import dataclasses
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Iterable

import click

from bas.core.errors import BasError, PluginError
from bas.core.plugins import Plugins, available_plugin_names, option_default, parse_plugin_names  # noqa: F401 (option_default: re-exported)
from bas.core.training import Run, RunConfig
from bas.core.training import extract as _extract

CORE_FIELDS = {f.name for f in dataclasses.fields(RunConfig)} - {"options", "plugins", "model_settings"}
# what a model cannot recommend: the run's inputs, its folder and the model itself
NOT_RECOMMENDED = {"out", "image", "model", "family", "resume", "overwrite", "model_defaults"}


def model_settings(plugins: Plugins, values: dict[str, Any], chosen: Iterable[str]) -> dict[str, Any]:
    """The settings the model in ``values`` recommends (``bas_model_settings``) for the options not in
    ``chosen``: none with ``model_defaults=False``, and none for an option of a plugin that is not on.
    Each is converted as its option's value would be; one that cannot be is the plugin's error."""
    if values.get("model") is None or values.get("model_defaults") is False:
        return {}
    model = str(values["model"])
    plugin, settings = plugins.model_settings(model)
    plugin_options = {opt.name: opt for _, opt in plugins.run_options()}
    hints = typing.get_type_hints(RunConfig)
    chosen = set(chosen)
    out = {}
    for name, value in settings.items():
        if name in chosen or (name not in plugin_options and name not in CORE_FIELDS - NOT_RECOMMENDED):
            continue
        try:
            out[name] = _converted(value, plugin_options.get(name), hints.get(name))
        except (TypeError, ValueError, click.BadParameter) as exc:
            raise PluginError(
                f"Plugin '{plugin}' recommends {name}={value!r} for {model}, which bas cannot use ({exc}); "
                "update the plugin, or pass --no-model-defaults."
            ) from None
    return out


def model_plugins(plugins: Plugins, values: dict[str, Any], plugin_names: Iterable[str]) -> list[str]:
    """The plugins the model in ``values`` recommends (``"plugins"`` in its ``bas_model_settings``) that a run
    turns on besides ``plugin_names`` (the user's ``--plugin`` values): none with ``model_defaults=False``,
    none the user named or turned off (``--plugin no:NAME``), and none that cannot run with the weight
    strategy the user chose (a loss term that needs adapters, under ``--plugin full``: :func:`make_config`
    warns that it is left off).  A name no installed plugin has is the recommending plugin's error."""
    return _model_plugins(plugins, values, plugin_names)[0]


def _model_plugins(plugins: Plugins, values: dict[str, Any], plugin_names: Iterable[str]) -> tuple[list[str], list[str], Plugins]:
    """(:func:`model_plugins`, those left off because the chosen weight strategy cannot run them, a manager with
    every recommended plugin on: ``plugins`` itself where it has them)."""
    if values.get("model") is None or values.get("model_defaults") is False:
        return [], [], plugins
    model = str(values["model"])
    plugin, settings = plugins.model_settings(model)
    wanted = settings.get("plugins") or []
    if isinstance(wanted, str) or not isinstance(wanted, (list, tuple)) or not all(isinstance(n, str) and n for n in wanted):
        raise PluginError(
            f"Plugin '{plugin}' recommends plugins={wanted!r} for {model}; recommend a list of plugin names, or pass --no-model-defaults."
        )
    named, blocked = parse_plugin_names(plugin_names)
    wanted = [n for n in dict.fromkeys(wanted) if n not in named and n not in blocked]
    if not wanted:
        return [], [], plugins
    unknown = [n for n in wanted if n not in available_plugin_names() + [name for name, _ in plugins.extra]]
    if unknown:
        raise PluginError(
            f"Plugin '{plugin}' recommends plugin {', '.join(unknown)} for {model}, which is not installed; install it, or pass --no-model-defaults."
        )
    from bas.core.training import adapter_conflicts

    with_all = (
        plugins if all(n in plugins.infos for n in wanted) else Plugins([*plugins.names, *wanted], extra=plugins.extra, tolerant=plugins.tolerant)
    )
    conflicts = set(adapter_conflicts(with_all))
    return [n for n in wanted if n not in conflicts], [n for n in wanted if n in conflicts], with_all


def run_plugins(plugins: Plugins, values: dict[str, Any], plugin_names: Iterable[str]) -> Plugins:
    """The plugin manager a run with these ``values`` uses: ``plugins`` (made from the user's ``plugin_names``),
    or one made again with the plugins the model recommends on too (:func:`model_plugins`)."""
    added, left_off, with_all = _model_plugins(plugins, values, plugin_names)
    if all(n in plugins.infos for n in added):
        return plugins
    if not left_off:
        return with_all  # made with exactly those
    return Plugins([*plugins.names, *added], extra=plugins.extra, tolerant=plugins.tolerant)


def _converted(value: Any, option: Any, hint: Any) -> Any:
    """``value`` as the option's click type (a plugin's option) or the RunConfig field's type would have it."""
    if option is not None:
        return value if value is None else option.type.convert(value, option, None)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is bool and not isinstance(value, bool) or hint in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise TypeError(f"not a {hint.__name__}")
    if hint is int and value != int(value):
        raise ValueError("not a whole number")
    if hint is str and not isinstance(value, str):
        raise TypeError("not a string")
    return hint(value) if hint in (int, float) else value


def describe_model_settings(config: RunConfig) -> str | None:
    """One line saying which of the model's recommended settings a run took, or None."""
    if not config.model_settings:
        return None
    from bas.core.checks import option_name
    from bas.core.errors import command_line

    words = [w for k, v in config.model_settings.items() if k != "plugins" for w in (option_name(k), v)]
    words += [w for name in config.model_settings.get("plugins", ()) for w in ("--plugin", name)]
    return (
        f"Using {config.model}'s recommended settings for the options you left out: {command_line(*words)} "
        "(give an option to choose its value, or --no-model-defaults for bas's own defaults)."
    )


def make_config(plugins: Plugins, values: dict[str, Any], plugin_names: Iterable[str], chosen: Iterable[str] | None = None) -> RunConfig:
    """A :class:`RunConfig` from option values; plugin options take their defaults when absent.

    ``chosen`` names the options the user gave (``bas run``: those on the command line); the model's
    recommended settings (:func:`model_settings`) fill the others.  Without it, every value in
    ``values`` that is not None counts as given (:func:`bas.extract`'s keywords, a batch's options).
    """
    options = {opt.name: option_default(opt) for _, opt in plugins.run_options()}
    unknown = set(values) - CORE_FIELDS - set(options)
    if unknown:
        raise BasError(f"Unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(CORE_FIELDS | set(options)))}.")
    if chosen is None:
        chosen = {k for k, v in values.items() if v is not None}
    added, left_off, _ = _model_plugins(plugins, values, plugin_names)
    if left_off:
        names = " and ".join(f"--plugin {n}" for n in left_off)
        warnings.warn(
            f"{values['model']} recommends {names}, which cannot run with the weight strategy you chose (it needs adapters); "
            "the run goes without it.",
            stacklevel=2,
        )
    missing = [n for n in added if n not in plugins.infos]
    if missing:  # a caller's mistake, not the user's: the run would go without them
        raise PluginError(
            f"The plugin manager lacks {', '.join(missing)}, which {values['model']} recommends; make it with bas.core.api.run_plugins."
        )
    recommended = model_settings(plugins, values, chosen)
    values = {**values, **recommended}
    core = {k: v for k, v in values.items() if k in CORE_FIELDS and v is not None}
    options.update({k: v for k, v in values.items() if k in options})
    if "init_tokens" in core:
        core["init_tokens"] = list(core["init_tokens"])
    if added:
        recommended = {"plugins": added, **recommended}
    config = RunConfig(plugins=[*plugin_names, *added], options=options, model_settings=recommended, **core)
    if recommended:  # a recommended value out of range is the plugin's error, not the user's
        from bas.core.checks import option_name

        try:
            config.check()
        except BasError as exc:
            if any(option_name(k) in str(exc) for k in recommended):
                raise PluginError(
                    f"The settings recommended for {config.model} (bas_model_settings) do not pass bas's checks: {exc} "
                    "Update the plugin that recommends them, or pass --no-model-defaults."
                ) from None
            raise
    return config


def extract(image=None, masks=(), out="bas-out", *, plugins: Iterable[str] = (), **options) -> Run:
    """Extract one handle per mask from ``image`` and write the output folder ``out``.

    ``options`` are the ``bas run`` options with underscores (``phase1_steps=100``,
    ``model="stabilityai/stable-diffusion-2-1-base"``, ``lora_rank=8``, ...).  Returns the finished
    run; ``run.out`` is the folder and ``run.info`` what ``run.json`` holds.
    """
    plugins = list(plugins)
    values = dict(options, out=Path(out), image=Path(image) if image else None)
    if masks:
        values["masks"] = [Path(m) for m in masks]
    manager = run_plugins(Plugins(plugins), values, plugins)
    return _extract(make_config(manager, values, plugins), manager)
