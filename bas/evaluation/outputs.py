"""What ``bas eval`` writes: ``eval.json`` (everything), ``eval.csv`` (a row per image) and ``index.html``
(the table of means with 95% intervals, a row per run, and the images sorted by each score).

Each file is written atomically into the staging folder that :mod:`bas.evaluation.evaluate` then renames
into place.  The page needs no network: images are linked by relative paths.
"""

from __future__ import annotations

import csv
import datetime
import html
import io as _io
import math
import os
from pathlib import Path
from urllib.parse import quote
from typing import Sequence

from bas.core.version import __version__
from bas.core import io

CSV_FIELDS = ("run", "image", "prompt", "class_prompt", "seed", "concepts", "template")


def relative(path: Path, staging: Path, final: Path) -> str:
    """``path`` as the finished output folder will see it (staging is renamed to ``final``)."""
    path = Path(path).resolve()
    staging = staging.resolve()
    if staging == path or staging in path.parents:
        return path.relative_to(staging).as_posix()
    return Path(os.path.relpath(path, final.resolve())).as_posix()


def input_links(run, staging: Path, final: Path) -> list[tuple[str, str]]:
    """(label, relative path) of the run's input image and masks, for the page."""
    from bas.core.run_inputs import IMAGE_NAME, INPUTS_DIR, mask_name

    folder = Path(run.path) / INPUTS_DIR
    files = [("input", folder / IMAGE_NAME)] + [(f"{h} mask", folder / mask_name(i)) for i, h in enumerate(run.handles)]
    return [(label, relative(f, staging, final)) for label, f in files if f.is_file()]


def result_json(config, runs, chosen, samples, results, summary, notes, template_name, templates, *, final: Path, staging: Path) -> dict:
    images = []
    for run in runs:
        for i, s in enumerate(samples[run.name]):
            r = results[(run.name, i)]
            images.append({
                "run": run.name, "image": relative(s.path, staging, final), "prompt": s.prompt,
                "class_prompt": run.class_prompt(s.prompt) if run.class_words else None, "seed": s.seed,
                "concepts": [run.handles[k] for k in s.concepts], "template": s.template, "scores": r["scores"], "details": r["details"],
            })
    return {
        "bas_version": __version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "settings": {
            "templates": template_name, "template_list": list(templates), "prompts_file": str(config.prompts) if config.prompts else None,
            "num_images": config.num_images, "seed": config.seed, "batch_size": config.batch_size, "steps": config.steps, "guidance": config.guidance, "scheduler": config.scheduler,
            "images": str(config.images) if config.images else None, "class_words": list(config.class_words) or None,
            "device": config.device, "precision": config.precision, "options": config.options,
            "interval": "95% percentile bootstrap of the mean, resampling prompts with all their images (10000 resamples)",
        },
        "evaluators": {c.name: {"plugin": c.plugin, "metrics": {m.name: {"description": m.description, "higher_is_better": m.higher_is_better}
                                                                for m in c.evaluator.metrics},
                                "used": getattr(c.evaluator, "record", dict)()} for c in chosen},
        "runs": {r.name: {"path": str(r.path), "model": r.info.get("model"), "handles": r.handles, "class_words": r.class_words,
                          "images": len(samples[r.name]), "sampling": r.sampling, "inputs": input_links(r, staging, final)} for r in runs},
        "notes": list(notes),
        "summary": summary,
        "images": images,
    }


def metric_list(data: dict) -> list[tuple[str, dict]]:
    return [(name, m) for ev in data["evaluators"].values() for name, m in ev["metrics"].items()]


def csv_text(data: dict) -> str:
    metrics = [name for name, _ in metric_list(data)]
    buffer = _io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(list(CSV_FIELDS) + metrics)
    for img in data["images"]:
        row = [img["run"], img["image"], img["prompt"], img["class_prompt"] or "", "" if img["seed"] is None else img["seed"],
               " ".join(img["concepts"]), img["template"] or ""]
        row += [repr(img["scores"][m]) if m in img["scores"] else "" for m in metrics]
        writer.writerow(row)
    return buffer.getvalue()


def fmt(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
.ci { color: #777; font-size: 0.85em; }
.gallery { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; width: 160px; font-size: 0.75em; }
td.inputs { white-space: nowrap; }
img.input { width: 40px; height: 40px; object-fit: contain; margin-right: 2px; background: #eee; }
figure img { width: 160px; height: 160px; object-fit: contain; background: #eee; image-rendering: pixelated; }
figcaption { overflow-wrap: anywhere; }
.notes li { color: #555; }
"""


def index_html(data: dict) -> str:
    metrics = metric_list(data)
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>bas eval</title><style>{PAGE_STYLE}</style></head><body>",
             "<h1>bas eval</h1>",
             f"<p>{len(data['images'])} images of {len(data['runs'])} run(s); templates: {esc(str(data['settings']['templates']))}; "
             f"{data['settings']['num_images']} image(s) per prompt. Cells: mean over the run's images, and its 95% bootstrap interval "
             f"(resampling prompts). Written {esc(data['date'])} by bas {esc(data['bas_version'])}.</p>",
             "<table><tr><th>run</th><th>input</th><th>model</th><th>images</th>"]
    for name, m in metrics:
        arrow = "↑" if m["higher_is_better"] else "↓"
        parts.append(f"<th title='{esc(m['description'])}'>{esc(name)} {arrow}</th>")
    parts.append("</tr>")
    for run, info in data["runs"].items():
        thumbs = "".join(f"<img class='input' src='{esc(quote(src))}' alt='{esc(alt)}' title='{esc(alt)}'>" for alt, src in info.get("inputs", []))
        parts.append(f"<tr><td>{esc(run)}</td><td class='inputs'>{thumbs}</td><td>{esc(str(info['model']))}</td><td class='num'>{info['images']}</td>")
        for name, _ in metrics:
            s = data["summary"].get(run, {}).get(name)
            cell = f"{fmt(s['mean'])}<br><span class='ci'>[{fmt(s['low'])}, {fmt(s['high'])}] n={s['n']}</span>" if s else "–"
            parts.append(f"<td class='num'>{cell}</td>")
        parts.append("</tr>")
    parts.append("</table>")
    parts.append("<ul class='notes'>" + "".join(f"<li>{esc(n)}</li>" for n in data["notes"]) + "</ul>" if data["notes"] else "")
    parts.append("<h2>Metrics</h2><ul>" + "".join(f"<li><b>{esc(n)}</b> ({'higher' if m['higher_is_better'] else 'lower'} is better): "
                                                  f"{esc(m['description'])}</li>" for n, m in metrics) + "</ul>")
    for name, m in metrics:
        scored = [img for img in data["images"] if name in img["scores"]]
        scored.sort(key=lambda img: img["scores"][name], reverse=m["higher_is_better"])
        parts.append(f"<h2 id='{esc(name)}'>{esc(name)}: best first ({len(scored)} images)</h2><div class='gallery'>")
        for img in scored:
            seed = "" if img["seed"] is None else f" · seed {img['seed']}"
            url = esc(quote(img["image"]))
            parts.append(f"<figure><a href='{url}'><img loading='lazy' src='{url}' alt='{esc(img['prompt'])}'></a>"
                         f"<figcaption><b>{img['scores'][name]:.3f}</b> · {esc(img['run'])}{seed}<br>{esc(img['prompt'])}</figcaption></figure>")
        parts.append("</div>")
    parts.append("</body></html>\n")
    return "".join(parts)


def write_outputs(folder: Path, data: dict) -> list[Path]:
    """``eval.csv``, ``index.html`` and, last, ``eval.json`` (which marks a finished evaluation)."""
    folder = Path(folder)
    with io.atomic_path(folder / "eval.csv") as tmp:
        tmp.write_text(csv_text(data), encoding="utf-8")
    with io.atomic_path(folder / "index.html") as tmp:
        tmp.write_text(index_html(data), encoding="utf-8")
    io.write_json(folder / "eval.json", data)
    return [folder / "eval.csv", folder / "index.html", folder / "eval.json"]


def summary_lines(data: dict, names: Sequence[str] | None = None) -> list[str]:
    """The table as plain text lines, for the terminal."""
    metrics = metric_list(data)
    lines = []
    for run in names or data["runs"]:
        cells = []
        for name, _m in metrics:
            s = data["summary"].get(run, {}).get(name)
            if s:
                cells.append(f"{name} {fmt(s['mean'])} [{fmt(s['low'])}, {fmt(s['high'])}]")
        lines.append(f"{run}: " + ("; ".join(cells) or "no score"))
    return lines
