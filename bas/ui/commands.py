"""The page's forms as ``bas`` command lines, and those command lines parsed by the real ``bas`` parser.

An extraction started on the page *is* a ``bas run`` command line: :func:`run_args` writes it from
the form, :func:`parse_run` parses it with ``bas run``'s own click command (plugin options
included) into the :class:`~bas.core.training.RunConfig` that command would make, and the page shows
the same arguments with paths relative to the workspace.  Every path option (click ``Path`` type)
is resolved inside the workspace, so a path typed on the page cannot leave it.
"""

from __future__ import annotations

import functools
import math
import shlex
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

import click

from bas.batches.command import PLAN_OPTIONS
from bas.core.errors import BasError, command_line
from bas.ui.workspace import Workspace

_PARSE_LOCK = threading.Lock()  # RunCommand swaps the plugin options of one shared command object


def run_command() -> click.Command:
    from bas.extraction.command import run

    return run


def parse_run(args: list[str], workspace: Workspace):
    """``bas run ARGS`` as the command line would run it: ``(RunConfig, plugin names)``.

    Relative paths are taken from the workspace; a path outside it is an error.
    """
    from bas.core.api import make_config
    from bas.extraction.command import given_options

    command = run_command()
    with _PARSE_LOCK:
        try:
            ctx = command.make_context("bas run", list(args))
        except click.ClickException as exc:
            raise BasError(exc.format_message()) from None
        plugins = ctx.meta["bas.plugins"]
        params = dict(ctx.params)
        given = given_options(ctx)
        path_options = {p.name for p in command.params if isinstance(getattr(p, "type", None), click.Path)}
    for name in path_options:
        value = params.get(name)
        if isinstance(value, (list, tuple)):
            params[name] = type(value)(workspace.inside(v) for v in value)
        elif value is not None:
            params[name] = workspace.inside(value)
    names = list(params.pop("plugin_names", ()))
    for name in PLAN_OPTIONS:  # --plan and --vram plan a run on the command line; the page runs one
        params.pop(name, None)
    config = make_config(plugins, params, names, chosen=given)
    return config, list(config.plugins)  # with those the model turns on, as the run has them


def defaults(plugin_names: Iterable[str] = ("lora",), model: str | None = None) -> dict[str, Any]:
    """``bas run``'s defaults for ``model``, its own options and those of the named plugins (as the page's
    fields start): bas's, with the settings the model recommends (``bas_model_settings``) over them, so
    that a field left as it starts is the value the run takes."""
    from bas.core.api import model_plugins, model_settings, option_default, run_plugins
    from bas.core.plugins import Plugins

    names = list(plugin_names)
    plugins = run_plugins(Plugins(names), {"model": model}, names)
    values = {p.name: option_default(p) for p in run_command().params if isinstance(p, click.Option) and not getattr(p, "_from_plugin", False)}
    values.update({opt.name: option_default(opt) for _, opt in plugins.run_options()})
    values["plugins"] = []
    if model:
        values.update(model_settings(plugins, {"model": model}, ()))
        values["plugins"] = model_plugins(plugins, {"model": model}, names)  # the plugins it turns on
    return values


@functools.cache
def optional_plugins() -> tuple[str, ...]:
    """Opt-in plugins that change training (not mask sources or weight strategies, which have their own fields):
    the page's "More plugins" checkboxes, made once with the page (so found once: the command preview asks on
    every change of the form)."""
    from bas.core.plugins import TRAINING_KINDS, Plugins

    manager = Plugins(all_installed=True)
    training = {e.plugin for kind in TRAINING_KINDS if kind != "weight strategy" for e in manager.registry(kind).entries.values()}
    strategies = {e.plugin for e in manager.registry("weight strategy").entries.values()}
    return tuple(sorted(n for n, info in manager.infos.items() if not info.default and n in training and n not in strategies))


def ticked_for_weights(weights: str, ticked: Iterable[str], model: str | None) -> list[str]:
    """The "More plugins" ticks once the weights field says ``weights``: the full fine-tune unticks the plugins that
    need adapters (``LossTerm.needs_adapters``), and LoRA ticks again those of them the model recommends."""
    from bas.core.plugins import Plugins
    from bas.core.training import adapter_conflicts

    ticked = list(ticked or ())
    if weights == "full":
        conflicts = set(adapter_conflicts(Plugins(["full", *ticked]))) if ticked else set()
        return [n for n in ticked if n not in conflicts]
    offered = optional_plugins()
    return ticked + [n for n in defaults(["lora"], model=model)["plugins"] if n in offered and n not in ticked]


# the Extract form's fields whose starting value is the model's recommendation, where it makes one
FOLLOWS_MODEL = ("phase1_steps", "phase2_steps", "phase1_lr", "lora_rank", "seed")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def follow_model(previous: str | None, model: str | None, values: dict[str, Any], ticked: Iterable[str], weights: str) -> tuple[dict[str, Any], list[str]]:
    """The Extract form once the user names another model: each field of ``values`` (``FOLLOWS_MODEL``) still at what
    ``previous`` recommends takes what ``model`` recommends (a value the user typed stays), and the "More plugins" ticks
    lose what ``previous`` turned on and ``model`` does not, and gain what ``model`` turns on (for ``weights``: the full
    fine-tune gets none that need adapters).  So a field left as it shows is, for any model typed, the value the run takes."""
    names = ["full"] if weights == "full" else ["lora"]
    before = defaults(names, model=previous or None)
    after = defaults(names, model=model or None)
    followed = {k: (after[k] if _same(v, before[k]) else v) for k, v in values.items()}
    offered = optional_plugins()
    kept = [n for n in ticked or () if n not in before["plugins"] or n in after["plugins"]]
    return followed, kept + [n for n in after["plugins"] if n in offered and n not in kept]


def shell(words: Iterable[Any]) -> str:
    return command_line(*words)


def run_args(form: dict[str, Any], path: Callable[[str], str]) -> list[str]:
    """``bas run`` arguments for the Extract form; ``path`` writes a workspace-relative path
    (absolute to run it, relative to show it).  Options left at their defaults are left out."""
    d = defaults(["full"] if form.get("weights") == "full" else ["lora"], model=str(form.get("model") or "") or None)
    args = ["--scene", path(form["scene"]), "--out", path(form["out"])]
    if form.get("weights") == "full":
        args += ["--plugin", "full"]
    ticked = list(form.get("plugins") or ())
    for name in ticked:
        if name not in d["plugins"]:  # one the model turns on is left out, as a field left at the model's value
            args += ["--plugin", name]
    offered = optional_plugins()
    for name in d["plugins"]:
        if name not in ticked and name in offered:  # the model's plugin, unticked: off (one the page has no box for stays on)
            args += ["--plugin", f"no:{name}"]
    args += ["--model", str(form["model"])]
    for word in form.get("init_tokens") or ():
        args += ["--init-token", word]
    for name in ("phase1_steps", "phase2_steps", "phase1_lr", "phase2_lr", "seed", "resolution", "precision", "device", "lora_rank", "checkpoint_every"):
        value = form.get(name)
        if value is None or value == "" or (name == "lora_rank" and form.get("weights") == "full"):
            continue
        if isinstance(d.get(name), int) and not isinstance(d.get(name), bool) or name in ("resolution", "seed"):
            value = int(value)
        if value != d.get(name):
            args += [f"--{name.replace('_', '-')}", format_number(value)]
    if form.get("background"):
        args.append("--background")
    if form.get("overwrite"):
        args.append("--overwrite")
    if form.get("resume"):
        args.append("--resume")
    extra = form.get("extra") or ""
    try:
        args += shlex.split(extra)
    except ValueError as exc:
        raise BasError(f"More options cannot be split into words ({exc}); close the quotes in '{extra}'.") from None
    return args


def config_args(saved: dict[str, Any]) -> list[str]:
    """``bas run`` arguments that make the configuration ``saved`` (a ``RunConfig.to_json()``, as a
    checkpoint keeps it) again: how the page resumes a run that was started on the command line.  A value
    is left out where the command would take it anyway: bas's default, or the model's recommended one."""
    from bas.core.api import model_settings, option_default
    from bas.core.plugins import Plugins

    names = list(saved.get("plugins") or [])
    plugins = Plugins(names)
    values = {**{k: v for k, v in saved.items() if k not in ("options", "plugins", "model_settings")}, **(saved.get("options") or {})}
    recommended = model_settings(plugins, values, ())
    options = [p for p in run_command().params if isinstance(p, click.Option) and p.name != "plugin_names" and not getattr(p, "_from_plugin", False)]
    options += [opt for _, opt in plugins.run_options()]
    args = [word for name in names for word in ("--plugin", name)]
    for opt in options:
        value = values.get(opt.name)
        default = recommended[opt.name] if opt.name in recommended else option_default(opt)
        if opt.name in ("resume", "overwrite") or value is None or _same(value, default):
            continue
        if opt.is_flag or opt.is_bool_flag:
            if opt.secondary_opts and not value:
                args.append(opt.secondary_opts[0])
            elif value:
                args.append(opt.opts[0])
        elif opt.multiple:
            for item in value:
                args += [opt.opts[0], str(item)]
        else:
            args += [opt.opts[0], str(value)]
    return args


def _same(a: Any, b: Any) -> bool:
    def norm(v):
        return [str(x) for x in v] if isinstance(v, (list, tuple)) else (str(v) if isinstance(v, Path) else v)
    return norm(a) == norm(b)


def format_number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def command_defaults(name: str) -> dict[str, Any]:
    from bas.generation.command import generate

    command = {"generate": generate}[name]
    return {p.name: p.default for p in command.params if isinstance(p, click.Option)}


def sampling_choices(family=None, info: dict | None = None) -> dict[str, Any]:
    """What the Generate tab offers for the run ``info`` of ``family`` (by default the default family's):
    the samplers the family takes, and the default sampler, guidance and steps ``bas generate`` takes for
    that run (:func:`bas.generation.generate.run_sampling_defaults`: FLUX.1-schnell 4 steps, guidance 0)."""
    from bas.core.family import default_family
    from bas.generation.generate import family_schedulers, run_sampling_defaults
    from bas.core.plugins import Plugins

    family = family or default_family(Plugins())
    scheduler, guidance, steps = run_sampling_defaults(family, info or {}, None, None, None)
    return {"schedulers": family_schedulers(family), "scheduler": scheduler, "guidance": guidance, "steps": steps}


def generate_args(run: str, prompts: list[str], options: dict[str, Any], family=None, info: dict | None = None) -> list[str]:
    """``bas generate`` arguments equivalent to :func:`bas.generate` with ``options`` (defaults left out:
    the sampler, guidance and steps ``bas generate`` takes for the run ``info`` of ``family``, by
    default the default family's)."""
    d = command_defaults("generate")
    d.update({k: v for k, v in sampling_choices(family, info).items() if k != "schedulers"})
    args = [run, *prompts, "--seeds", ",".join(str(s) for s in options["seeds"])]
    for name in ("negative_prompt", "steps", "guidance", "lora_scale", "scheduler", "width", "height", "device"):
        value = options.get(name)
        if value not in (None, "") and value != d.get(name):
            args += [f"--{name.replace('_', '-')}", format_number(value)]
    return args


def export_args(run: str, fmt: str, dest: str, options: dict[str, Any]) -> list[str]:
    args = [run, "--format", fmt, "--out", dest]
    if options.get("name"):
        args += ["--name", options["name"]]
    if fmt != "diffusers" and options.get("rank") not in (None, 32):
        args += ["--rank", str(options["rank"])]
    if not options.get("preview", True):
        args.append("--no-preview")
    if options.get("overwrite"):
        args.append("--overwrite")
    return args


def masks_args(image: str, prompts: list[tuple[str, str]], out: str, sam_model: str | None, cleanup: dict[str, Any]) -> list[str] | None:
    """``bas masks --plugin sam-masks`` arguments for SAM prompts ``(option, text)`` in concept order,
    or None when the command line cannot keep that order (it takes every --point before every --box)."""
    kinds = [option for option, _ in prompts]
    if not prompts or kinds != sorted(kinds, key=lambda k: k != "--point"):
        return None
    args = ["--plugin", "sam-masks", "--image", image]
    for option, text in prompts:
        args += [option, text]
    if sam_model:
        args += ["--model", sam_model]
    args += cleanup_args(cleanup)
    return args + ["--out", out]


def cleanup_args(cleanup: dict[str, Any]) -> list[str]:
    args = []
    if cleanup.get("mask_threshold") is not None:
        args += ["--mask-threshold", format_number(float(cleanup["mask_threshold"]))]
    if cleanup.get("fill_holes"):
        args.append("--fill-holes")
    for name in ("mask_dilate", "mask_erode", "mask_feather"):
        if cleanup.get(name):
            args += [f"--{name.replace('_', '-')}", format_number(float(cleanup[name]))]
    return args


def absolute(workspace: Workspace) -> Callable[[str], str]:
    return lambda p: str(workspace.inside(p))


def relative(p: str) -> str:
    return str(Path(p).as_posix())
