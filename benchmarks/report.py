"""Render benchmarks/results/*.json as the results section of benchmarks/README.md.

    python benchmarks/report.py            # rewrite the section between the markers
    python benchmarks/report.py --print    # print it instead
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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
    order = ["tiny", "small", "sd15", "sd21", "sdxl-small", "sdxl", "flux-small", "flux"]
    for row in sorted(rows, key=lambda r: (r["device"], order.index(r["arch"]), r["date"], r["command"])):
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


def all_rows(directory: Path = RESULTS_DIR) -> list[dict]:
    """The speed rows of every results file (fidelity results, in the same folder, have none)."""
    return [row for path in sorted(directory.glob("*.json")) for row in json.loads(path.read_text()).get("rows", [])]


def main(argv: list[str]) -> None:
    text = render(all_rows())
    if "--print" in argv:
        print(text)
        return
    readme = README.read_text()
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{text}{END}{tail}")


if __name__ == "__main__":
    main(sys.argv[1:])
