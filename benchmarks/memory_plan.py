"""The memory plan against measurement, and the README's table of predicted peaks.

``--check``: a real run's peak per phase against its plan.  On a GPU the measurement is
``torch.cuda.max_memory_allocated`` around the second step of each phase (real-shape models with
random weights from ``benchmarks/presets.py``); on the CPU, the profiler's live tensor bytes
(:mod:`bas.memory.measure`).  Every row of the README table is checked on the first lent GPU with::

    python benchmarks/memory_plan.py --check --arch sd15 --device cuda [--strategy full] [--quantize nf4] ...

``--dry-run`` checks the same path on the CPU with the tiny test model (the script is known to work
without a GPU).  ``--table`` prints the README's "predicted" table: per model, resolution and weight
strategy, the plan at bas's CUDA defaults and the cheapest settings ``--vram`` picks for 8, 12 and 16 GB.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402

from bas.core.api import make_config, run_plugins  # noqa: E402
from bas.core.errors import BasError  # noqa: E402
from bas.core.plugins import Plugins  # noqa: E402
from bas.memory.plan import make_plan  # noqa: E402
from bas.core.training import QUANTIZE  # noqa: E402
from bas.memory.vram import GIB, fit  # noqa: E402
from benchmarks.commandline import Command  # noqa: E402
from benchmarks.presets import PRESETS  # noqa: E402

TABLE = [  # (row, hub id whose configs ship with bas, resolution)
    ("SD 1.5", "stable-diffusion-v1-5/stable-diffusion-v1-5", 512),
    ("SD 2.1 base", "stabilityai/stable-diffusion-2-1-base", 512),
    ("SDXL base", "stabilityai/stable-diffusion-xl-base-1.0", 1024),
    ("FLUX.1-dev", "black-forest-labs/FLUX.1-dev", 512),
    ("FLUX.1-dev", "black-forest-labs/FLUX.1-dev", 1024),
]
BUDGETS = (8, 12, 16)


def config(model: str, strategy: str, device: str, resolution: int | None = None, **values):
    names = ["full"] if strategy == "full" else []
    values = {k: v for k, v in {"out": Path("unused"), "model": model, "device": device, "resolution": resolution, **values}.items() if v is not None}
    plugins = run_plugins(Plugins(names), values, names)  # with the plugins the model turns on, as bas run has them
    return make_config(plugins, values, names), plugins


def check(args) -> int:
    from bas.core.model import resolve_device
    from bas.memory.measure import measure_run

    if not args.dry_run:
        resolve_device(args.device)  # the measurement runs there: one Error line before the preset is built
    if args.optimizer is not None:  # the same, for an optimizer no plugin registers
        Plugins(["full"] if args.strategy == "full" else []).registry("optimizer").get(args.optimizer, "--optimizer")
    if args.dry_run:
        from bas.demo.demo import draw_scene
        from bas.demo.tiny import save_tiny_model

        tmp = Path(tempfile.mkdtemp(prefix="bas-memory-plan-"))
        model, scene, device = save_tiny_model(tmp / "tiny"), draw_scene(tmp / "scene"), "cpu"
    else:
        from benchmarks.presets import materialize

        model, device = materialize(args.arch), args.device
        from bas.demo.demo import draw_scene

        scene = draw_scene(Path(tempfile.mkdtemp(prefix="bas-memory-scene-")))
    extra = {
        k: v
        for k, v in (("quantize", args.quantize), ("optimizer", args.optimizer), ("gradient_checkpointing", args.gradient_checkpointing))
        if v is not None
    }
    cfg, plugins = config(str(model), args.strategy, device, args.resolution, scene=scene, **extra)
    t0 = time.perf_counter()
    plan = make_plan(cfg, plugins)
    planned = time.perf_counter() - t0
    cfg, plugins = config(str(model), args.strategy, device, args.resolution, scene=scene, **extra)
    measured = measure_run(cfg, plugins)
    worst = 0.0
    print(f"{args.arch if not args.dry_run else 'tiny (dry run)'} {args.strategy} on {device}: plan in {planned:.1f} s")
    for phase, peak in measured.items():
        predicted = plan.phases[phase]["peak"]
        error = predicted / peak - 1
        worst = max(worst, abs(error))
        print(f"  {phase}: predicted {predicted / GIB:.3f} GB, measured {peak / GIB:.3f} GB ({error:+.1%})")
    return 0 if worst <= args.tolerance else 1


def cell(model, strategy, resolution, budget=None) -> str:
    cfg, plugins = config(model, strategy, "cuda", resolution)
    try:
        if budget is None:
            return f"{make_plan(cfg, plugins).peak / GIB:.1f}"
        choice = fit(cfg, plugins, budget)
    except BasError as exc:
        return "refused" if "trains LoRA only" in str(exc) else "does not fit"
    return f"{choice.plan.peak / GIB:.1f} ({', '.join(f.lstrip('-') for f in choice.chose) or 'none needed'})"


def table(only: str | None = None) -> None:
    print("| model | px | weights | bas's CUDA defaults | fits 8 GB | fits 12 GB | fits 16 GB |")
    print("|---|---|---|---|---|---|---|")
    for row, model, resolution in TABLE:
        if only and only.lower() not in row.lower():
            continue
        for strategy in ("lora", "full"):
            t0 = time.perf_counter()
            cells = [cell(model, strategy, resolution)] + [cell(model, strategy, resolution, b) for b in BUDGETS]
            print(f"| {row} | {resolution} | {strategy} | " + " | ".join(cells) + " |", flush=True)
            print(f"<!-- {time.perf_counter() - t0:.0f} s -->", file=sys.stderr, flush=True)


@click.command(cls=Command, help=__doc__.splitlines()[0], context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--check", is_flag=True, help="Compare a real run's peak per phase with its plan.")
@click.option("--table", is_flag=True, help="Print the README's table of predicted peaks.")
@click.option("--dry-run", is_flag=True, help="With --check: the tiny test model on the CPU.")
@click.option("--arch", type=click.Choice(sorted(PRESETS)), default="sd15", show_default=True, help="With --check: a benchmarks/presets.py preset.")
@click.option("--strategy", type=click.Choice(("lora", "full")), default="lora", show_default=True)
@click.option("--device", default="cuda", show_default=True, help="With --check: where the run is measured (cuda, cuda:N or cpu).")
@click.option("--resolution", type=int, default=None)
@click.option("--quantize", type=click.Choice(QUANTIZE), default=None)
@click.option("--optimizer", default=None, help="adamw or adamw8bit (bitsandbytes, CUDA), or one a plugin adds.")
@click.option("--gradient-checkpointing", is_flag=True, default=None)
@click.option("--tolerance", type=float, default=0.10, show_default=True)
@click.option("--only", default=None, help="With --table: only the rows whose model name contains this.")
def main(**options) -> None:
    args = SimpleNamespace(**options)
    if args.check == args.table:
        raise click.UsageError("give one of --check and --table.")
    if args.table:
        table(args.only)
        return
    sys.exit(check(args))


if __name__ == "__main__":
    main()
