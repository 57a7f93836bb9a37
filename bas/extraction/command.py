"""``bas run`` and ``bas masks``: the schedule's commands, whose options grow with the plugins named on
the command line (:class:`RunCommand`, which ``bas eval`` and ``bas batch`` build on too).  The
command line is assembled in :mod:`bas.cli`; ``bas ui`` parses a run's command line with :data:`run`."""

from __future__ import annotations

from pathlib import Path

import click

from bas.core.errors import BasError, command_line
from bas.core.model import PRECISIONS
from bas.core.plugins import Plugins

PLUGIN_FLAGS = ("--plugin", "-p")


def prescan_plugins(args: list[str]) -> list[str]:
    """The ``--plugin``/``-p`` values in raw arguments, before click parses them."""
    names = []
    it = iter(args)
    for arg in it:
        if arg in PLUGIN_FLAGS:
            names.append(next(it, ""))
        elif arg.startswith("--plugin="):
            names.append(arg.split("=", 1)[1])
        elif arg.startswith("-p") and len(arg) > 2 and not arg.startswith("--"):
            names.append(arg[2:])
    return names


def prescan_model(args: list[str]) -> dict:
    """``--model`` and ``--no-model-defaults`` in raw arguments, before click parses them (the last one wins)."""
    values: dict = {}
    it = iter(args)
    for arg in it:
        if arg == "--model":
            values["model"] = next(it, None)
        elif arg.startswith("--model="):
            values["model"] = arg.split("=", 1)[1]
        elif arg in ("--model-defaults", "--no-model-defaults"):
            values["model_defaults"] = arg == "--model-defaults"
    return values


class RunCommand(click.Command):
    """``bas run``: the plugins named on the command line add their options before parsing, and so do
    those the model recommends (``bas_model_settings``), which the run turns on."""

    takes_model = True  # a command without --model (bas masks, bas eval) turns on only the plugins named

    def plugin_options(self, plugins: Plugins) -> list:
        return plugins.run_options()

    def manager(self, args: list[str]) -> Plugins:
        from bas.core.api import run_plugins

        names = prescan_plugins(args)
        return run_plugins(Plugins(names), prescan_model(args), names) if self.takes_model else Plugins(names)

    def parse_args(self, ctx, args):
        base = [p for p in self.params if not getattr(p, "_from_plugin", False)]
        try:
            plugins = self.manager(args)
            added = self.plugin_options(plugins)
        except BasError as exc:
            raise click.ClickException(str(exc)) from None
        seen = {name: "bas" for p in base for name in p.opts}
        for plugin, opt in added:
            for name in opt.opts:
                if name in seen:
                    raise click.ClickException(
                        f"Option {name} is added by both {seen[name]} and plugin '{plugin}'; turn one of them off with --plugin no:{plugin}."
                    )
                seen[name] = f"plugin '{plugin}'"
            opt._from_plugin = True
        self.params = base + [opt for _, opt in added]
        ctx.meta["bas.plugins"] = plugins
        return super().parse_args(ctx, args)


class MasksCommand(RunCommand):
    """``bas masks``: as ``bas run``, but only the options of mask sources and mask cleanup."""

    takes_model = False

    def plugin_options(self, plugins: Plugins) -> list:
        return plugins.mask_options()


def given_options(ctx: click.Context) -> set[str]:
    """The options of a parsed ``bas run`` the user gave (not left at their defaults): the model's recommended
    settings fill the others, and ``--vram`` chooses only among those."""
    return {name for name in ctx.params if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT}


@click.command(cls=RunCommand)
@click.option("--image", type=click.Path(path_type=Path), help="The input image (any size; centre-cropped and resized).")
@click.option("--out", type=click.Path(path_type=Path), help="Output folder (required, except with --plan).")
@click.option(
    "--model",
    default=None,
    help="Hub id or local folder of a diffusers pipeline (Stable Diffusion 1.x/2.x, SDXL, or a family a plugin adds) "
    "[default: the family's: stabilityai/stable-diffusion-2-1-base, with --family sdxl stabilityai/stable-diffusion-xl-base-1.0, "
    "with --family flux black-forest-labs/FLUX.1-dev].",
)
@click.option(
    "--family", default=None, help="Model family: sd, sdxl, flux, or one a plugin adds [default: detected from --model's model_index.json]."
)
@click.option(
    "--plugin", "-p", "plugin_names", multiple=True, help="Turn on a plugin (repeatable); no:NAME turns a default one off. See `bas plugins`."
)
@click.option("--phase1-steps", type=int, default=400, show_default=True, help="Steps of phase 1 (handles only).")
@click.option("--phase2-steps", type=int, default=400, show_default=True, help="Steps of phase 2 (weights + handles).")
@click.option("--phase1-lr", type=float, default=5e-4, show_default=True, help="Learning rate of phase 1.")
@click.option("--phase2-lr", type=float, default=None, help="Learning rate of phase 2 [default: the weight strategy's, 1e-4 for LoRA, 2e-6 full].")
@click.option(
    "--phase2-handle-lr",
    type=float,
    default=2e-6,
    show_default=True,
    help="Learning rate of the handles in phase 2 (the reference code's), apart from the weights'.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resolution", type=int, default=None, help="Training resolution in pixels [default: the model's, 512 for SD 2.1 base].")
@click.option("--init-token", "init_tokens", multiple=True, help="A word to start each handle from, one per mask in order [default: 'object'].")
@click.option("--background", is_flag=True, help="Add a handle for the background: everything outside all masks (after the masks' handles).")
@click.option(
    "--model-defaults/--no-model-defaults",
    default=True,
    show_default=True,
    help="Where you give no value, use the settings recommended for --model (bas-mini: phase-1 rate 2e-3, 200 + 200 steps, attention-loss "
    "weight 0.1), as run.json's model_settings records; --no-model-defaults keeps bas's own defaults (the paper's).",
)
@click.option(
    "--optimizer",
    default=None,
    help="adamw or adamw8bit (bitsandbytes, CUDA), or one a plugin adds [default: adamw; on CUDA the family may pick adamw8bit, see run.json's family_defaults].",
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="auto",
    show_default=True,
    help="auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU.",
)
@click.option(
    "--gradient-checkpointing/--no-gradient-checkpointing",
    default=None,
    help="Recompute activations in the backward pass: less memory, ~30% slower [default: off; on CUDA on for sdxl and flux].",
)
@click.option(
    "--quantize",
    type=click.Choice(["none", "nf4", "int8"]),
    default=None,
    help="Load the frozen base weights quantised (bitsandbytes, CUDA, LoRA only): nf4 (4-bit) or int8 [default: none; on CUDA nf4 for flux].",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--flip-p", type=float, default=0.5, show_default=True, help="Probability of a horizontal flip of image and masks per step.")
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True, help="Gradient norm clip (0: off).")
@click.option("--overwrite", is_flag=True, help="Replace a finished or interrupted run already in --out.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out from its newest checkpoint (same options).")
@click.option(
    "--plan",
    "plan_only",
    is_flag=True,
    help="Print the run's memory plan per phase on --device (cuda need not be present) from the model's configs alone, and exit.",
)
@click.option("--json", "as_json", is_flag=True, help="With --plan: the plan as JSON.")
@click.option(
    "--vram",
    type=float,
    default=None,
    help="GB of GPU memory to fit: choose gradient checkpointing, 8-bit AdamW, quantised weights, a smaller LoRA rank, in that "
    "order, where you chose none (docs/speed-memory.md).",
)
@click.pass_context
def run(ctx, plugin_names, plan_only, as_json, vram, **values):
    """Extract one handle per mask from an image: phase 1 (handles), then phase 2 (weights + handles)."""
    from bas.core.api import describe_model_settings, make_config
    from bas.core.training import extract

    plugins = ctx.meta["bas.plugins"]
    if as_json and not plan_only:
        raise BasError("--json prints a memory plan; add --plan.")
    if values["out"] is None:
        if not plan_only:
            raise BasError("Missing option '--out'; name the folder the run writes (only --plan needs none).")
        values["out"] = Path("bas-plan")  # nothing is written
    given = given_options(ctx)
    config = make_config(plugins, values, plugin_names, chosen=given)
    said = describe_model_settings(config)
    if said:
        click.echo(said, err=True)
    if vram is not None or plan_only:
        from bas.memory.plan import format_plan, make_plan
        from bas.memory.vram import describe, fit

        choice = None
        if vram is not None:
            choice = fit(config, plugins, vram, given)
            config = choice.config
            click.echo(describe(choice, vram), err=as_json)
        if plan_only:
            plan = choice.plan if choice else make_plan(config, plugins)
            if as_json:
                import json

                click.echo(json.dumps(plan.to_json(), indent=2))
            else:
                click.echo(format_plan(plan))
            return
    result = extract(config, plugins)
    info = result.info
    click.echo(f"Wrote {config.out}: " + ", ".join(info["files"] + ["run.json"]))
    background = f" ({info['background']} is the background)" if info.get("background") else ""
    click.echo(
        f"Handles: {' '.join(info['handles'])}{background}. Try: "
        + command_line("bas", "generate", config.out, f"a photo of {info['handles'][0]} at the beach")
    )


@click.command(cls=MasksCommand)
@click.option("--image", type=click.Path(path_type=Path), help="The input image.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for mask0.png, mask1.png, ..., img.png and preview.png.")
@click.option("--plugin", "-p", "plugin_names", multiple=True, help="The mask source: sam-masks, coco-masks or an installed one [default: files].")
@click.option(
    "--model",
    "mask_model",
    default=None,
    help="The mask source's model: for sam-masks the SAM checkpoint, hub id or local folder [default: facebook/sam-vit-base].",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N, for a source that runs a model.")
@click.option("--overwrite", is_flag=True, help="Replace masks already in --out.")
@click.pass_context
def masks(ctx, plugin_names, **values):
    """Make a scene's masks and a preview: bas masks --plugin sam-masks --image IMG --point X,Y --out DIR.

    Writes mask0.png, mask1.png, ... (one per concept, in handle order), img.png and preview.png
    (each mask tinted and labelled with its handle) into --out, which `bas run --scene` then takes.
    `bas masks --plugin NAME --help` lists a mask source's options.
    """
    from bas.core.masks import make_masks, make_masks_config

    plugins = ctx.meta["bas.plugins"]
    written = make_masks(make_masks_config(plugins, values, plugin_names), plugins)
    click.echo(f"Wrote {values['out']}: " + ", ".join(p.name for p in written))
    click.echo(f"Check {values['out'] / 'preview.png'}, then: " + command_line("bas", "run", "--scene", values["out"], "--out", "RUN"))
