"""Benchmark extraction: seconds per step, peak memory, TFLOP/s, and the speed-up over the reference code's way.

    python benchmarks/extract.py --arch small --compare reference-style --threads 1

Every configuration (the bas settings given, ``reference-style``, each ``--ablation``) runs the
real ``bas`` training loop in its own process, ``--repeats`` times, interleaved and in reversed
order every other time, so that a slow spell of a shared machine hits all of them alike.  The result is appended to
``benchmarks/results/<device>-<date>.json`` (or ``--out``); ``python benchmarks/report.py``
renders those files as the tables in benchmarks/README.md.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(ROOT))

from benchmarks.commandline import Command  # noqa: E402
from benchmarks.harness import ABLATIONS, PAPER_STEPS, REFERENCE_STYLE, Variant  # noqa: E402
from benchmarks.presets import PRESETS, materialize  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
GB = 1e9


def device_slug() -> str:
    """``cpu``, or the GPU's name in lower case with dashes (``nvidia-h100-80gb-hbm3``)."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def git_revision() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def run_worker(spec: dict, work: Path) -> dict:
    """Measure one configuration in a fresh process; a failure (out of memory, ...) is recorded, not raised."""
    work.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = work / "spec.json", work / "result.json"
    spec_path.write_text(json.dumps(dict(spec, workdir=str(work))))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.harness", str(spec_path), str(result_path)], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not result_path.exists():
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        raised = [line for line in lines if re.match(r"[\w.]+(Error|Exception)\b", line)]
        error = (raised or lines or [f"exit status {proc.returncode}"])[-1]
        return {"settings": spec["variant"], "error": error, "stderr_tail": lines[-20:]}
    return json.loads(result_path.read_text())


def merge_repeats(results: list[dict]) -> dict:
    """One record from interleaved repeats: step times pooled, memory the maximum, overhead the median."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    merged = dict(ok[0], repeats=len(ok))
    phases = {}
    for name, paper in zip(("phase1", "phase2"), PAPER_STEPS):
        runs = [r["phases"][name] for r in ok]
        warmup = runs[0]["warmup_steps"]
        timed = [s for p in runs for s in p["step_seconds"][warmup:]]
        median = statistics.median(timed)
        cpu_median = statistics.median(s for p in runs for s in p["step_cpu_seconds"][warmup:])
        flops = runs[0]["flops_per_step"]
        phases[name] = dict(
            runs[0],
            s_per_step=median,
            cpu_s_per_step=cpu_median,
            s_per_step_per_repeat=[p["s_per_step"] for p in runs],
            step_seconds=[p["step_seconds"] for p in runs],
            step_cpu_seconds=[p["step_cpu_seconds"] for p in runs],
            timed_steps=len(timed),
            projected_s=statistics.median(sum(p["step_seconds"][:warmup]) for p in runs) + (paper - warmup) * median,
            peak_memory_bytes=max(p["peak_memory_bytes"] for p in runs),
            tflops=flops / median / 1e12 if flops else None,
        )
    merged["phases"] = phases
    merged["overhead_s"] = statistics.median(r["overhead_s"] for r in ok)
    merged["projected_training_s"] = sum(p["projected_s"] for p in phases.values())
    merged["projected_extraction_s"] = merged["overhead_s"] + merged["projected_training_s"]
    merged["peak_memory_bytes"] = max(p["peak_memory_bytes"] for p in phases.values())
    merged["process_peak_rss_bytes"] = max(r["process_peak_rss_bytes"] for r in ok)
    if len(ok) < len(results):
        merged["failed_repeats"] = [r["error"] for r in results if "error" in r]
    return merged


def ratio(numerator, denominator):
    return numerator / denominator if numerator and denominator else None


def ratios(base: dict, other: dict) -> dict:
    """How many times slower (and bigger) ``other`` is than ``base``."""
    if "error" in base or "error" in other:
        return {"error": other.get("error") or base.get("error")}
    return {
        "extraction": ratio(other["projected_extraction_s"], base["projected_extraction_s"]),
        "training": ratio(other["projected_training_s"], base["projected_training_s"]),
        "phase1_step": ratio(other["phases"]["phase1"]["s_per_step"], base["phases"]["phase1"]["s_per_step"]),
        "phase2_step": ratio(other["phases"]["phase2"]["s_per_step"], base["phases"]["phase2"]["s_per_step"]),
        "phase1_step_cpu_time": ratio(other["phases"]["phase1"]["cpu_s_per_step"], base["phases"]["phase1"]["cpu_s_per_step"]),
        "phase2_step_cpu_time": ratio(other["phases"]["phase2"]["cpu_s_per_step"], base["phases"]["phase2"]["cpu_s_per_step"]),
        "training_cpu_time": ratio(*(sum(c["phases"][p]["cpu_s_per_step"] * n for p, n in zip(("phase1", "phase2"), PAPER_STEPS)) for c in (other, base))),
        "peak_memory": ratio(other["peak_memory_bytes"], base["peak_memory_bytes"]),
    }


def targets(arch: str, device: str, variant: Variant, configs: dict, speedup: float | None, resolution: int | None = None) -> dict:
    """The issue's targets that this measurement can speak to, each with its figure and whether it holds."""
    bas = configs["bas"]
    out = {}
    if "error" in bas:
        return out
    if arch == "small" and device == "cpu" and speedup is not None:
        out["cpu_small_speedup_at_least_2x"] = {"value": speedup, "met": speedup >= 2}
    if arch == "sd21" and device != "cpu":
        peak = bas["peak_memory_bytes"] / GB
        if variant.strategy == "lora":
            out["peak_memory_at_most_8gb"] = {"value": peak, "met": peak <= 8}
            if speedup is not None:
                out["speedup_at_least_5x"] = {"value": speedup, "met": speedup >= 5}
            if "h100" in device:
                out["h100_extraction_under_60s"] = {"value": bas["projected_extraction_s"], "met": bas["projected_extraction_s"] < 60}
        elif variant.optimizer == "adamw8bit" and variant.gradient_checkpointing:
            out["full_8bit_checkpointing_at_most_12gb"] = {"value": peak, "met": peak <= 12}
    if arch == "sdxl" and device != "cpu" and variant.strategy == "lora":  # issue 11: SDXL at 1024 px on a 12 GB card
        peak = bas["peak_memory_bytes"] / GB
        out["sdxl_lora_peak_memory_at_most_11gb"] = {"value": peak, "met": peak <= 11}
    if arch == "flux" and device != "cpu" and resolution == 512:  # issue 17: FLUX at 512 px on a 12 GB card
        peak = bas["peak_memory_bytes"] / GB
        out["flux_peak_memory_at_most_12gb"] = {"value": peak, "met": peak <= 12}
    return out


def load_results(path: Path) -> dict:
    """The results file ``path`` (``{"rows": [...]}``; a new one where nothing is there yet), or one clear error: a path that
    cannot be one, or a file this script did not write, is refused before anything is measured."""
    from bas.core import io

    io.check_output_file(path, "--out")
    if not os.path.lexists(path):
        return {"rows": []}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"--out {path} is not a readable results file ({exc}); give a new path, or the file benchmarks/extract.py "
                                   f"wrote there.") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("command"), str) for r in rows):
        raise click.ClickException(f"--out {path} is not a results file of benchmarks/extract.py (no list of rows, each with its command); "
                                   f"give a new path, or the file it wrote there.")
    return data


def save_row(path: Path, row: dict) -> None:
    """Add the row to the results file, replacing an earlier row of the same command."""
    from bas.core import io

    data = load_results(path)  # read again: another measurement may have added its row meanwhile
    data["rows"] = [r for r in data["rows"] if r["command"] != row["command"]] + [row]
    io.write_json(path, data)


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--arch", type=click.Choice(sorted(PRESETS)), default="tiny", show_default=True, help="Architecture preset (random weights, real shapes).")
@click.option("--strategy", type=click.Choice(["lora", "full"]), default="lora", show_default=True, help="Phase 2 weights of the bas configuration.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto", show_default=True, help="auto: what `bas run` picks for the device.")
@click.option("--optimizer", type=click.Choice(["adamw", "adamw8bit", "adamw-fused"]), default="adamw", show_default=True)
@click.option("--grad-checkpointing", is_flag=True, help="Gradient checkpointing in the bas configuration.")
@click.option("--quantize", type=click.Choice(["none", "nf4", "int8"]), default=None,
              help="Quantised base weights in the bas configuration [default: what `bas run` picks: nf4 for flux on CUDA].")
@click.option("--prior-preservation/--no-prior-preservation", default=True, show_default=True, help="One class image per step in the bas configuration (reference-style always has it).")
@click.option("--steps", type=int, default=10, show_default=True, help="Timed steps per phase (after the warm-up, before the one step whose FLOPs are counted).")
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed steps at the start of each phase.")
@click.option("--repeats", type=int, default=1, show_default=True, help="Measure every configuration this many times, interleaved.")
@click.option("--compare", type=click.Choice(["reference-style"]), default=None, help="Also measure the reference code's way of training.")
@click.option("--ablation", "ablations", multiple=True, type=click.Choice(sorted(ABLATIONS)), help="Also measure bas with one setting changed (repeatable).")
@click.option("--plugin", "-p", "plugin_names", multiple=True, help="Passed to every configuration as `bas run --plugin` (NAME or no:NAME, repeatable).")
@click.option("--resolution", type=int, default=None, help="Training resolution [default: the preset's: 128 tiny, 256 small, sdxl-small and flux-small, 512 sd15/sd21/flux, 1024 sdxl].")
@click.option("--threads", type=int, default=None, help="CPU threads per measurement [default: torch's].  1 gives stable figures on a shared machine.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--num-class-images", type=int, default=4, show_default=True, help="Pre-made class images for prior preservation.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Where preset models are saved [default: ~/.cache/bas-benchmarks].")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Results file [default: benchmarks/results/<device>-<date>.json].")
def main(arch, strategy, precision, optimizer, grad_checkpointing, quantize, prior_preservation, steps, warmup, repeats, compare, ablations,
         plugin_names, resolution, threads, device, num_class_images, seed, cache_dir, out):
    """Measure extraction speed and memory at an architecture preset."""
    from bas.core import io
    from benchmarks.presets import default_cache_dir

    if steps < 1 or warmup < 0 or repeats < 1:
        raise click.UsageError("--steps and --repeats must be at least 1 and --warmup at least 0.")
    command = "python benchmarks/extract.py " + shlex.join(sys.argv[1:])
    slug = device_slug() if device == "auto" else ("cpu" if device == "cpu" else device_slug())
    today = datetime.date.today().isoformat()
    out = Path(out or RESULTS_DIR / f"{slug}-{today}.json")
    load_results(out)  # a path it could only fail to write, or a file it could not merge into, after the measurements: refused now
    io.check_output_folder(Path(cache_dir or default_cache_dir()), "--cache-dir")

    variant = Variant(strategy=strategy, precision=precision, optimizer=optimizer, gradient_checkpointing=grad_checkpointing,
                      prior_preservation=prior_preservation, quantize=quantize)
    configs = {"bas": variant}
    if compare == "reference-style":
        configs["reference-style"] = REFERENCE_STYLE
    for name in ablations:
        changed = replace(variant, **ABLATIONS[name])
        if changed == variant:
            click.echo(f"ablation {name} is the bas configuration itself; skipped", err=True)
            continue
        configs[f"ablation:{name}"] = changed

    click.echo(f"building the {arch} preset ...", err=True)
    model = materialize(arch, cache_dir)
    preset = PRESETS[arch]
    base_spec = dict(model=str(model), resolution=resolution or preset.resolution, warmup=warmup, timed=steps, seed=seed,
                     device=device, num_class_images=num_class_images, threads=threads, plugins=list(plugin_names))
    measured: dict[str, list[dict]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory(prefix="bas-bench-") as tmp:
        items = list(enumerate(configs.items()))
        for r in range(repeats):
            # A B C, C B A, ...: a machine that slows down or speeds up hits every configuration alike
            for i, (name, v) in items[::-1] if r % 2 else items:
                click.echo(f"[{r + 1}/{repeats}] {name} ...", err=True)
                result = run_worker(dict(base_spec, variant=asdict(v)), Path(tmp) / f"{r}-{i}")
                if "error" in result:
                    click.echo(f"  failed: {result['error']}", err=True)
                else:
                    click.echo(f"  {result['phases']['phase1']['s_per_step']:.3f} / {result['phases']['phase2']['s_per_step']:.3f} s per step, "
                               f"peak {result['peak_memory_bytes'] / GB:.2f} GB", err=True)
                measured[name].append(result)
    results = {name: merge_repeats(rs) for name, rs in measured.items()}
    bas = results["bas"]
    reference = results.get("reference-style")
    speedup = ratios(bas, reference) if reference else None
    info = bas if "error" not in bas else next((r for r in results.values() if "error" not in r), bas)
    row = {
        "command": command,
        "date": today,
        "device": slug,
        "device_name": info.get("device_name"),
        "torch": info.get("torch"),
        "git": git_revision(),
        "arch": arch,
        "arch_description": preset.description,
        "resolution": base_spec["resolution"],
        "threads": threads,
        "plugin_names": list(plugin_names),
        "warmup_steps": warmup,
        "timed_steps": steps,
        "repeats": repeats,
        "paper_steps": list(PAPER_STEPS),
        "configs": results,
        "speedup_vs_reference": speedup,
        "ablations": {name.split(":", 1)[1]: ratios(bas, res) for name, res in results.items() if name.startswith("ablation:")},
        "targets": targets(arch, slug, variant, results, speedup["extraction"] if speedup and "error" not in speedup else None,
                           base_spec["resolution"]),
    }
    save_row(out, row)
    if speedup and "error" not in speedup:
        click.echo(f"bas is {speedup['extraction']:.2f}x faster than reference-style for the 400+400 extraction "
                   f"({bas['projected_extraction_s']:.1f} s vs {reference['projected_extraction_s']:.1f} s), "
                   f"peak memory {bas['peak_memory_bytes'] / GB:.2f} GB vs {reference['peak_memory_bytes'] / GB:.2f} GB", err=True)
    click.echo(f"wrote {out}", err=True)


if __name__ == "__main__":
    main()
