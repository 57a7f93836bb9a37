"""Does a LoRA stored in bf16 train as one stored in fp32?  (issue 17: "LoRA in bf16" for FLUX's 12 GB defaults)

    python -m benchmarks.lora_dtype --out benchmarks/results/lora-dtype-<date>.json

diffusers' ``examples/dreambooth/train_dreambooth_lora_flux.py`` casts the frozen transformer to
the mixed-precision dtype and then calls ``transformer.add_adapter``; peft's
``_move_adapter_to_device_of_base_layer`` gives each new LoRA layer its base layer's dtype (a
bitsandbytes 4-bit layer's ``compute_dtype``), and the script upcasts the LoRA to fp32 only under
``--mixed_precision fp16`` (``cast_training_params``).  Under bf16 its LoRA is stored, and its
AdamW state kept, in bf16.  bas stores the LoRA in fp32 and runs its matmuls in bf16 autocast.

This script trains phase 2 of bas's FLUX extraction (the tiny FLUX of the tests, CPU, bf16
autocast, seeded: one run per setting is the figure) with the LoRA in fp32 (bas) and in bf16
(diffusers' script), and records how many LoRA entries an optimizer step ever changed and how far
the trained low-rank change ``B @ A`` of each layer lands from bas's.  Both runs start from the same
values: peft creates the adapters in their bf16 base layers' dtype, and bas upcasts them to fp32
(exact), so only the storage differs.  Adam's step is about
the learning rate whatever the gradients' scale, and the down-projections start at peft's Gaussian
init of standard deviation 1/rank, so what the tiny model shows of bf16 rounding (8 significant
bits) holds at FLUX.1's size too.  It also counts the LoRA parameters of FLUX.1-dev at rank 8 (the
transformer built on the meta device from the ``flux`` preset, bas's targets), to size what bf16
storage would save.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import click
import torch

import bas
from benchmarks.commandline import Command


class LoraWatch:
    """An observer plugin: the LoRA parameters at the start and end of phase 2; with ``cast`` set,
    stores them in that dtype before the first step (the optimizer's state follows its parameters)."""

    def __init__(self, cast: torch.dtype | None):
        self.cast = cast
        self.start: dict[str, torch.Tensor] = {}
        self.end: dict[str, torch.Tensor] = {}

    def lora(self, run) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in run.named_trainables(run.current.params).items() if "lora_" in name}

    def on_phase_start(self, run, phase):
        if phase != 2:
            return
        for name, p in self.lora(run).items():
            if self.cast is not None:
                p.data = p.data.to(self.cast)
            self.start[name] = p.detach().float().clone()

    def on_phase_end(self, run, phase):
        if phase == 2:
            self.end = {name: p.detach().float().clone() for name, p in self.lora(run).items()}

    @bas.hookimpl
    def bas_register_observers(self, register):
        register("lora-watch", lambda config: self)


def deltas(start: dict, end: dict) -> dict[str, torch.Tensor]:
    """Each adapted layer's trained low-rank change ``B @ A`` (end minus start)."""
    out = {}
    for name in end:
        if ".lora_A." in name:
            b = name.replace(".lora_A.", ".lora_B.")
            out[name.replace(".lora_A.", ".")] = end[b] @ end[name] - start[b] @ start[name]
    return out


def flux_lora_parameters(rank: int = 8) -> int:
    """LoRA parameters of FLUX.1-dev's transformer with bas's targets at ``rank`` (built on the meta device)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from benchmarks.presets import PRESETS
    from bas.plugins.flux import TRANSFORMER_TARGETS

    with init_empty_weights():
        transformer = FluxTransformer2DModel(**PRESETS["flux"].transformer)
    pattern = re.compile(TRANSFORMER_TARGETS)
    return sum(rank * (m.in_features + m.out_features) for name, m in transformer.named_modules()
               if isinstance(m, torch.nn.Linear) and pattern.fullmatch(name))


@click.command(cls=Command)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True, help="Phase-2 steps.")
@click.option("--rank", type=click.IntRange(min=1), default=8, show_default=True, help="--lora-rank (bas's default).")
def main(out, steps, rank):
    from bas.core import io
    from bas.core.api import make_config
    from bas.demo.demo import draw_scene
    from bas.core.plugins import Plugins
    from bas.demo.tiny import save_tiny_model
    from bas.core.training import extract
    from bas.plugins.flux import Flux

    io.check_output_file(out, "--out")  # before the runs, not after them
    torch.set_num_threads(1)
    results = {"model": "tiny FLUX (bas tiny-model --family flux)", "precision": "bf16 autocast, CPU", "phase2_steps": steps,
               "lora_rank": rank, "phase2_lr": 1e-4, "optimizer": "adamw", "settings": {}}
    watches = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = save_tiny_model(work / "flux", seed=0, family=Flux())
        scene = draw_scene(work / "scene")
        for name, cast in (("fp32 (bas)", None), ("bf16 (diffusers' FLUX script under bf16)", torch.bfloat16)):
            watch = watches[name] = LoraWatch(cast)
            names = ["no:report", "no:checkpoints"]
            pm = Plugins(names, extra=[("lora-watch", watch)])
            values = dict(scene=scene, out=work / "run", model=str(model), phase1_steps=0, phase2_steps=steps, lora_rank=rank,
                          precision="bf16", device="cpu", overwrite=True, quiet=True)
            extract(make_config(pm, values, names), pm)
    reference = deltas(watches["fp32 (bas)"].start, watches["fp32 (bas)"].end)
    for name, watch in watches.items():
        row = {}
        for part in ("lora_A", "lora_B"):
            keys = [k for k in watch.end if f".{part}." in k]
            changed = sum(int((watch.end[k] != watch.start[k]).sum()) for k in keys)
            total = sum(watch.end[k].numel() for k in keys)
            row[f"{part}_entries_changed"] = changed / total
        trained = deltas(watch.start, watch.end)
        errors = [float((trained[k] - reference[k]).norm() / reference[k].norm()) for k in reference if reference[k].norm() > 0]
        row["delta_relative_error_median"] = float(torch.tensor(errors).median())
        row["delta_norm_ratio_median"] = float(torch.tensor([float(trained[k].norm() / reference[k].norm())
                                                             for k in reference if reference[k].norm() > 0]).median())
        results["settings"][name] = row
        click.echo(f"{name}: {100 * row['lora_A_entries_changed']:.1f}% of lora_A and {100 * row['lora_B_entries_changed']:.1f}% of "
                   f"lora_B entries changed; B@A off the fp32 run's by a median {100 * row['delta_relative_error_median']:.1f}%", err=True)
    params = flux_lora_parameters(rank)
    results["flux_dev_transformer_lora_parameters"] = params
    results["flux_dev_lora_megabytes"] = {"fp32": params * 4 / 2**20, "bf16": params * 2 / 2**20}
    click.echo(f"FLUX.1-dev's transformer LoRA at rank {rank}: {params / 1e6:.1f}M parameters, {params * 4 / 2**20:.0f} MB in fp32, "
               f"{params * 2 / 2**20:.0f} MB in bf16 (gradients the same again)", err=True)
    io.write_text(out, json.dumps(results, indent=1) + "\n")  # whole or not at all


if __name__ == "__main__":
    main()
