"""Hints for options that people bring from diffusers' training scripts, kohya's and older bas.

A mistyped option gets click's nearest spelling, which for ``--learning_rate`` or ``--output_dir``
names an unrelated option; these hints name bas's option instead.  Keys are option names without
dashes, ``_`` written as ``-``; a value may depend on the command (``--output_dir`` is ``--out`` of
``bas run`` but ``--out-dir`` of ``bas generate``).
"""

from __future__ import annotations

import click

from bas.core.errors import BasError

SAMPLE_COMMANDS = ("generate", "edit")
HINTS: dict[str, str | dict[str, str]] = {
    "output-dir": {"run": "--out DIR (the run folder)", "masks": "--out DIR", "export": "--out DIR",
                   "generate": "--out-dir DIR", "edit": "--out-dir DIR"},
    "pretrained-model-name-or-path": "--model (a hub id or a local diffusers folder)",
    "learning-rate": "--phase1-lr (the handles alone, 5e-4) and --phase2-lr (weights and handles; 1e-4 for LoRA, 2e-6 full)",
    "lr": "--phase1-lr and --phase2-lr",
    "text-encoder-lr": "--phase2-lr (phase 2 trains the text encoder with the UNet)",
    "unet-lr": "--phase2-lr",
    "rank": "--lora-rank",
    "network-dim": "--lora-rank",
    "network-alpha": "--lora-alpha",
    "mixed-precision": "--precision auto|fp32|fp16|bf16 (diffusers' 'no' is fp32)",
    "train-batch-size": "nothing: bas trains on its one image, one example per step; --phase1-steps/--phase2-steps set the length",
    "batch-size": "nothing: bas trains on its one image, one example per step",
    "max-train-steps": "--phase1-steps and --phase2-steps (400 each, as the paper)",
    "num-train-epochs": "--phase1-steps and --phase2-steps (400 each, as the paper)",
    "res": "--resolution",
    "size": {"run": "--resolution", "generate": "--width/--height"},
    "image-size": "--resolution",
    "img-size": "--resolution",
    "use-8bit-adam": "--optimizer adamw8bit",
    "checkpointing-steps": "--checkpoint-every N",
    "checkpoints-total-limit": "nothing: bas keeps the newest checkpoint of a run until it finishes",
    "resume-from-checkpoint": "--resume (continues the run in --out from its newest checkpoint)",
    "validation-steps": ("--validate-every N to sample the validation prompts every N steps (diffusers' --validation_steps), "
                         "--validation-inference-steps for the sampling steps of each grid (bas's old --validation-steps)"),
    "validation-epochs": "--validate-every N",
    "num-inference-steps": {"run": "--validation-inference-steps", "generate": "--steps", "edit": "--steps", "export": "--preview-steps"},
    "guidance-scale": "--guidance",
    "num-images-per-prompt": "--num-images",
    "random-seed": "--seed",
    "instance-data-dir": "--scene DIR (img.jpg with mask0.png, mask1.png, ...) or --image IMG --mask M0 --mask M1",
    "train-data-dir": "--scene DIR (img.jpg with mask0.png, mask1.png, ...) or --image IMG --mask M0 --mask M1",
    "instance-prompt": "nothing: each mask gets a handle <asset0>, <asset1>, ...; --init-token WORD sets the word it starts from",
    "with-prior-preservation": "--plugin prior-preservation",
    "report-to": "--plugin tensorboard (the report in OUT/report/ is on by default)",
    "train-text-encoder": "nothing: LoRA trains the text encoder by default (--no-lora-text-encoder turns that off)",
    "lr-scheduler": "nothing: bas keeps each phase's learning rate constant, as the paper",
    "lr-warmup-steps": "nothing: bas keeps each phase's learning rate constant, as the paper",
    "enable-xformers-memory-efficient-attention": "nothing: bas uses PyTorch's fused attention wherever the attention loss does not read maps",
}


def normalize(option: str) -> str:
    return option.lstrip("-").replace("_", "-").lower()


def hint_for(option: str, command: str, known: set[str] = frozenset(), plugin_options: dict[str, str] | None = None) -> str | None:
    """What to type instead of ``option`` in ``bas COMMAND``, or None when nothing fits.

    ``known`` holds the command's option names (``--out``, ...), ``plugin_options`` maps options of
    plugins that are not turned on to the plugin that adds them.
    """
    name = normalize(option)
    if f"--{name}" in known and f"--{name}" != option:  # --gradient_checkpointing: the spelling differs
        return f"--{name}"
    hint = HINTS.get(name)
    if isinstance(hint, dict):
        hint = hint.get(command)
    if hint:
        return hint
    plugin = (plugin_options or {}).get(f"--{name}")
    if plugin:
        return f"--plugin {plugin} --{name} (the option comes with plugin '{plugin}')"
    return None


def unknown_option_message(exc: click.NoSuchOption) -> str | None:
    """One line naming bas's option for an unknown one, or None to keep click's message."""
    ctx = exc.ctx
    command = ctx.command.name if ctx and ctx.command else ""
    known = {name for p in (ctx.command.params if ctx else []) for name in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}
    plugin_options = {}
    if command in ("run", "masks"):
        from bas.core.plugins import Plugins

        try:
            plugin_options = {name: plugin for plugin, opt in Plugins(all_installed=True).run_options() for name in opt.opts}
        except BasError:  # a broken installed plugin must not hide the hint for the user's typo
            plugin_options = {}
    hint = hint_for(exc.option_name, command, known, plugin_options)
    if hint is None:
        return None
    if hint.startswith("nothing: "):
        return f"No such option: {exc.option_name}; bas has no such setting: {hint.removeprefix('nothing: ')}."
    return f"No such option: {exc.option_name}; use {hint}."
