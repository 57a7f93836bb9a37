"""Render benchmarks/results/*.json as the results section of benchmarks/README.md.

    python benchmarks/report.py            # rewrite the section between the markers
    python benchmarks/report.py --print    # print it instead
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(ROOT))

from benchmarks.commandline import Command, json_kind  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
README = ROOT / "benchmarks" / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
GB = 1e9


def _f(value, digits=2, suffix=""):
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def config_label(name: str, config: dict) -> str:
    settings = config["settings"]
    if name == "bas":
        precision = settings["precision"] if settings["precision"] == config.get("precision") else f"{settings['precision']}: {config.get('precision')}"
        flags = [settings["strategy"], precision, settings["optimizer"]]
        flags += ["grad-ckpt"] if settings["gradient_checkpointing"] else []
        flags += ["prior"] if settings["prior_preservation"] else ["no prior"]
        return f"**bas** ({', '.join(flags)})"
    return name.replace("ablation:", "bas, ablation ")


def row_table(row: dict) -> list[str]:
    lines = [
        "| configuration | phase 1 s/step | phase 2 s/step | 400+400 steps | whole extraction | peak memory | TFLOP/s phase 1 / 2 | time vs bas | CPU time vs bas | memory vs bas |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    comparisons = dict(row.get("ablations", {}))
    if row.get("speedup_vs_reference"):
        comparisons["reference-style"] = row["speedup_vs_reference"]
    for name, c in row["configs"].items():
        label = config_label(name, c)
        if "error" in c:
            lines.append(f"| {label} | failed: {c['error']} | | | | | | | | |")
            continue
        p1, p2 = c["phases"]["phase1"], c["phases"]["phase2"]
        memory = f"{c['peak_memory_bytes'] / GB:.2f} GB" + (" RSS" if c["memory_kind"] == "peak_rss" else "")
        cmp = comparisons.get(name.replace("ablation:", ""), {}) if name != "bas" else dict.fromkeys(("training", "training_cpu_time", "peak_memory"), 1.0)
        lines.append(
            f"| {label} | {_f(p1['s_per_step'], 3)} | {_f(p2['s_per_step'], 3)} | {_f(c['projected_training_s'], 0, ' s')} | "
            f"{_f(c['projected_extraction_s'], 0, ' s')} | {memory} | {_f(p1['tflops'], 3)} / {_f(p2['tflops'], 3)} | "
            f"{_f(cmp.get('training'), 2, 'x')} | {_f(cmp.get('training_cpu_time'), 2, 'x')} | {_f(cmp.get('peak_memory'), 2, 'x')} |"
        )
    return lines


def render(rows: list[dict]) -> str:
    out = []
    for row in sorted(rows, key=lambda r: (r["device"], ARCH_ORDER.index(r["arch"]), r["date"], r["command"])):
        speed = row.get("speedup_vs_reference") or {}
        out.append(f"### {row['arch']} at {row['resolution']} px, {row['device_name']}, {row['date']}")
        out.append("")
        out.append("```bash")
        out.append(row["command"])
        out.append("```")
        out.append("")
        if speed and "error" not in speed:
            out.append(
                f"Headline: bas is **{speed['extraction']:.2f}x** faster than reference-style for the whole extraction "
                f"({speed['training']:.2f}x for the 400+400 steps alone; {speed['training_cpu_time']:.2f}x by CPU time); "
                f"peak memory {row['configs']['bas']['peak_memory_bytes'] / GB:.2f} GB against "
                f"{row['configs']['reference-style']['peak_memory_bytes'] / GB:.2f} GB ({speed['peak_memory']:.2f}x)."
            )
            out.append("")
        for name, target in row.get("targets", {}).items():
            out.append(f"Target `{name}`: {target['value']:.2f}, {'met' if target['met'] else '**not met**'}.")
            out.append("")
        out.extend(row_table(row))
        out.append("")
        out.append(
            f"{row['warmup_steps']} warm-up + {row['timed_steps']} timed steps per phase, {row['repeats']} interleaved repeat(s), "
            f"torch {row['torch']}, threads {row['threads'] or 'default'}, git {row['git']['commit']}{' (+ uncommitted changes)' if row['git']['dirty'] else ''}."
        )
        out.append("")
    return "\n".join(out).rstrip() + "\n"


ROW_KEYS = ("command", "date", "device", "device_name", "arch", "resolution", "configs", "warmup_steps", "timed_steps", "repeats", "torch",
            "threads", "git")
ARCH_ORDER = ["tiny", "small", "sd15", "sd21", "sdxl-small", "sdxl", "flux-small", "flux"]


def file_rows(path: Path) -> list[dict]:
    """The speed rows of one results file (a fidelity result, in the same folder, has none), each checked to render; a
    damaged file is one clear error."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"{path} is not a readable results file ({exc}); run its benchmark again, or move it out of "
                                   f"{path.parent}.") from None
    rows = data.get("rows", []) if isinstance(data, dict) else None
    problem = None if isinstance(rows, list) else "it is not an object with a list of rows"
    for i, row in enumerate(rows or []):
        if problem:
            break
        missing = [k for k in ROW_KEYS if k not in row] if isinstance(row, dict) else None
        if missing is None:
            problem = f"row {i + 1} is {json_kind(row)}, not an object"
        elif missing:
            problem = f"row {i + 1} has no {', '.join(missing)}"
        elif row["arch"] not in ARCH_ORDER:
            problem = f"row {i + 1}'s arch {row['arch']!r} is not one of {', '.join(ARCH_ORDER)}"
        else:
            try:
                render([row])
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
                problem = f"row {i + 1} does not render: {type(exc).__name__}: {exc}"
    if problem:
        raise click.ClickException(f"{path} is not a results file of benchmarks/extract.py ({problem}); run its command again, or move it "
                                   f"out of {path.parent}.")
    return rows


def all_rows(directory: Path = RESULTS_DIR) -> list[dict]:
    """The speed rows of every results file (fidelity results, in the same folder, have none)."""
    return [row for path in sorted(directory.glob("*.json")) for row in file_rows(path)]


def rewritten(readme: str, text: str) -> str:
    """``readme`` with ``text`` between its markers, or one clear error where they are not there once each, in order."""
    if readme.count(START) != 1 or readme.count(END) != 1 or readme.index(START) > readme.index(END):
        raise click.ClickException(f"{README} does not hold the markers {START} and {END} once each, in that order, around its results "
                                   f"section; put them back (git diff {README.name} shows where they were).")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{text}{END}{tail}"


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--print", "show", is_flag=True, help="Print the results section instead of rewriting it in benchmarks/README.md.")
def main(show):
    """Render benchmarks/results/*.json as the results section of benchmarks/README.md (rewritten between its markers)."""
    from bas.core import io

    text = render(all_rows(RESULTS_DIR))
    if show:
        click.echo(text)
        return
    try:
        readme = README.read_text()
    except OSError as exc:
        raise click.ClickException(f"{README} cannot be read ({exc.strerror or exc}); run this from a checkout of the repository.") from None
    io.write_text(README, rewritten(readme, text))  # whole or not at all
    click.echo(f"Wrote the results section of {README}", err=True)


if __name__ == "__main__":
    main()
