"""Many scenes: `bas batch` with 1 and 2 local workers and on a local Ray, against a loop of `bas run`.

    python benchmarks/batch.py                      # 8 scenes, 10 + 10 steps each; writes benchmarks/results/batch-cpu-<date>.json
    python benchmarks/batch.py --scenes 4 --steps 3 --config loop --config local-2 --out /tmp/b.json

Every configuration extracts the same scenes with the tiny test model (`bas tiny-model`), each in
a fresh output folder, as the commands a user types (subprocesses, one torch thread each):

- ``loop``: ``bas run --scene S --out DIR/S`` for each scene, one after the other, as a shell loop;
- ``local-1``, ``local-2``: ``bas batch SCENES --out DIR --workers N``;
- ``ray-1``, ``ray-2``: ``ray start --head --num-cpus N`` (timed on its own: a cluster is started
  once, not per batch), ``bas batch SCENES --executor ray --ray-address auto``, ``ray stop``.

Per configuration: the wall time of the command(s), scenes per minute, the sum of the runs' own
times (``run.json`` ``times.total_s``: loading, training, saving inside ``extract``) and the
overhead per scene, ``(wall x concurrency - sum of run times) / scenes``: starting processes,
imports, scheduling, the summary, workers idle at the end.  Concurrency is 1 for ``loop`` and
N for the others.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(ROOT))

from benchmarks.commandline import Command  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = {"loop": 1, "local-1": 1, "local-2": 2, "ray-1": 1, "ray-2": 2}


def env() -> dict:
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    return e


def bas(*args) -> list[str]:
    return [sys.executable, "-m", "bas.cli", *map(str, args)]


def run_checked(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def prepare(work: Path, scenes: int) -> tuple[Path, list[Path]]:
    sys.path.insert(0, str(ROOT))
    from bas.demo.demo import draw_scene
    from bas.demo.tiny import save_tiny_model

    model = save_tiny_model(work / "tiny", seed=0)
    first = draw_scene(work / "scenes" / "scene0")
    folders = [first] + [Path(shutil.copytree(first, work / "scenes" / f"scene{i}")) for i in range(1, scenes)]
    return model, folders


def run_times(out: Path, names: list[str]) -> list[float]:
    return [json.loads((out / n / "run.json").read_text())["times"]["total_s"] for n in names]


def measure(config: str, model: Path, scenes: list[Path], out: Path, steps: int) -> dict:
    options = ["--model", model, "--phase1-steps", steps, "--phase2-steps", steps, "--quiet"]
    names = [s.name for s in scenes]
    concurrency = CONFIGS[config]
    startup = None
    if config == "loop":
        t0 = time.perf_counter()
        for scene in scenes:
            run_checked(bas("run", "--scene", scene, "--out", out / scene.name, *options), f"bas run {scene.name}")
        wall = time.perf_counter() - t0
    elif config.startswith("local"):
        t0 = time.perf_counter()
        run_checked(bas("batch", *scenes, "--out", out, "--workers", concurrency, *options), config)
        wall = time.perf_counter() - t0
    else:
        ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
        t0 = time.perf_counter()
        run_checked([ray, "start", "--head", f"--num-cpus={concurrency}", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats"], "ray start")
        startup = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            run_checked(bas("batch", *scenes, "--out", out, "--executor", "ray", "--ray-address", "auto", *options), config)
            wall = time.perf_counter() - t0
        finally:
            subprocess.run([ray, "stop", "--force"], env=env(), capture_output=True)
    times = run_times(out, names)
    return {
        "concurrency": concurrency,
        "wall_s": round(wall, 2),
        "scenes_per_min": round(len(scenes) / wall * 60, 2),
        "run_s_sum": round(sum(times), 2),
        "run_s_median": round(statistics.median(times), 2),
        "overhead_per_scene_s": round((wall * concurrency - sum(times)) / len(scenes), 2),
        "cluster_start_s": round(startup, 2) if startup is not None else None,
    }


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Per configuration, the median over repeats, and throughput relative to the loop."""
    table = {}
    for name, rows in runs.items():
        med = {k: statistics.median(r[k] for r in rows) for k in ("wall_s", "scenes_per_min", "run_s_sum", "overhead_per_scene_s")}
        starts = [r["cluster_start_s"] for r in rows if r["cluster_start_s"] is not None]
        med["cluster_start_s"] = statistics.median(starts) if starts else None
        med["concurrency"] = rows[0]["concurrency"]
        table[name] = med
    if "loop" in table:
        for row in table.values():
            row["throughput_vs_loop"] = round(row["scenes_per_min"] / table["loop"]["scenes_per_min"], 2)
    return table


def markdown(result: dict) -> str:
    lines = ["| configuration | scenes/min | vs loop | wall | runs' own time (sum) | overhead per scene | cluster start |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in result["summary"].items():
        start = f"{r['cluster_start_s']:.1f} s" if r.get("cluster_start_s") is not None else ""
        lines.append(f"| {name} | {r['scenes_per_min']:.2f} | {r.get('throughput_vs_loop', float('nan')):.2f}x | {r['wall_s']:.0f} s | "
                     f"{r['run_s_sum']:.0f} s | {r['overhead_per_scene_s']:.1f} s | {start} |")
    return "\n".join(lines)


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True).stdout.strip()
        return rev + (" (+ uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


@click.command(cls=Command, help=__doc__.splitlines()[0], context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--scenes", type=click.IntRange(min=1), default=8, show_default=True, help="Scenes every configuration extracts.")
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True, help="Steps per phase of every scene.")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True, help="Runs of every configuration, interleaved.")
@click.option("--config", "configs", multiple=True, type=click.Choice(list(CONFIGS)), help="Configurations to run (repeatable) [default: all].")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Results file [default: benchmarks/results/batch-cpu-<date>.json].")
def main(scenes, steps, repeats, configs, out) -> None:
    from bas.core import io

    configs = list(configs) or list(CONFIGS)
    date = time.strftime("%Y-%m-%d")
    out_file = io.check_output_file(out or RESULTS / f"batch-cpu-{date}.json", "--out")  # before the runs, not after them
    load_before = os.getloadavg()
    revision = git_revision()  # before the runs: the code they measured
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="bas-batch-bench-") as tmp:
        work = Path(tmp)
        model, folders = prepare(work, scenes)
        for repeat in range(repeats):
            for config in configs:
                print(f"[{repeat + 1}/{repeats}] {config} ...", file=sys.stderr, flush=True)
                row = measure(config, model, folders, work / f"{config}-{repeat}", steps)
                print(f"    {row}", file=sys.stderr, flush=True)
                runs[config].append(row)
    result = {
        "benchmark": "batch",
        "date": date,
        "command": "python benchmarks/batch.py " + shlex.join(sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_average_before": [round(x, 2) for x in load_before], "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "settings": {"scenes": scenes, "steps_per_phase": steps, "threads_per_scene": 1, "repeats": repeats, "model": "tiny (bas tiny-model)"},
        "git": revision,
        "runs": runs,
        "summary": summarise(runs),
    }
    io.write_json(out_file, result)  # whole or not at all
    print(markdown(result))
    print(f"Wrote {out_file}", file=sys.stderr)


if __name__ == "__main__":
    main()
