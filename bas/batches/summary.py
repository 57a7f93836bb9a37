"""The batch's own files in its output folder: ``batch.json`` (per scene: status, error, times,
files, device) and ``index.html``, a gallery of every scene that renders with no network (the
input with its masks, the run report's attention maps, validation grids and loss curves, the
status and error).  ``batch.json`` is rewritten whenever a scene starts or ends, the gallery at
most every few seconds meanwhile and at the end; each under a temporary name and renamed, so a
reader sees the old or the new one."""

from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path
from urllib.parse import quote

from bas.core import io
from bas.core.errors import BasError

SUMMARY = "batch.json"
GALLERY = "index.html"
BATCH_DIR = ".batch"  # the gallery's pictures and the lock; hidden, so `runs/*` globs only runs and the summary
PREVIEW_DIR = f"{BATCH_DIR}/previews"
REPORT_DIR = "report"  # where a run keeps its report (the report plugin's folder)
_VALIDATION = re.compile(r"validation-phase(\d)-step(\d+)\.png")
STATUS_COLOURS = {"done": "#2e7d32", "skipped": "#558b2f", "failed": "#c62828", "other-options": "#ef6c00", "damaged": "#ad1457",
                  "interrupted": "#6a1b9a", "not-started": "#616161", "running": "#1565c0", "retrying": "#1565c0", "pending": "#616161"}
STATUS_MEANING = {
    "done": "finished in this invocation",
    "skipped": "finished earlier with the same options; left as it was",
    "failed": "stopped with the error shown; run the batch again to retry it",
    "other-options": "holds a finished run made with other options; --overwrite runs it again",
    "damaged": "holds a finished run whose files do not agree with its run.json; restore them, or --overwrite runs it again",
    "interrupted": "stopped with a checkpoint; run the batch again to resume it",
    "not-started": "the batch stopped before this scene began",
}


SUMMARY_START = '{\n  "bas_version": '  # how every batch.json write_summary writes begins (its first key)
GALLERY_START = '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n<title>bas batch: '  # and every index.html


def _begins(path: Path, start: str) -> bool:
    """``path`` is a plain file (not a link) that begins with ``start``: written by a batch, whatever followed."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            return f.read(len(start.encode())) == start.encode()
    except OSError:
        return False


def _summary_problem(path: Path) -> str | None:
    """``None`` when ``path`` is a batch's summary, else why not, in a few words."""
    if path.is_symlink():
        return "it is a link"
    if not path.is_file():
        return "it is not a file"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"it cannot be read as JSON: {exc}"
    if not isinstance(data, dict) or not isinstance(data.get("scenes"), list):
        return "it holds no list of scenes"
    return None


def check_own_files(out: Path) -> None:
    """The batch writes ``batch.json`` and ``index.html`` into ``--out``, replacing an earlier batch's:
    never a file of the user's that has one of those names.  An earlier batch's damaged ``batch.json``
    is refused with how to recover (delete it: the batch rebuilds it from the scenes' runs, as it
    does for a folder of runs with none); an ``index.html`` a batch wrote is replaced, also without
    its ``batch.json``."""
    out = Path(out)
    summary, gallery = out / SUMMARY, out / GALLERY
    if os.path.lexists(summary):
        problem = _summary_problem(summary)
        if problem is None:
            return  # an earlier batch's: index.html is its gallery
        unreadable = problem.startswith("it cannot be read")  # beside .batch/ (the batch's pictures): a batch's, cut short
        if summary.is_file() and not summary.is_symlink() and (_begins(summary, SUMMARY_START) or (unreadable and (out / BATCH_DIR).is_dir())):
            raise BasError(f"--out {out} holds a damaged {SUMMARY} of an earlier bas batch ({problem}); delete it and run the batch again, "
                           f"which rebuilds {SUMMARY} from the scenes' runs.")
        raise BasError(f"--out {out} holds {SUMMARY}, which is not an earlier bas batch's ({problem}), and the batch writes its own {SUMMARY} "
                       f"there; choose another --out (or, if a bas batch wrote it, delete it: the batch rebuilds it from the scenes' runs).")
    if os.path.lexists(gallery) and not _begins(gallery, GALLERY_START):
        raise BasError(f"--out {out} holds {GALLERY}, which is not an earlier bas batch's, and the batch writes its own {GALLERY} there; "
                       f"choose another --out, or move {GALLERY} away.")


def read_previous(out: Path) -> dict[str, dict]:
    """The scene records of the output folder's last summary, by name ({} when there is none)."""
    try:
        data = json.loads((Path(out) / SUMMARY).read_text())
        return {s["name"]: s for s in data.get("scenes", []) if isinstance(s, dict) and "name" in s}
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return {}


def write_summary(out: Path, data: dict, gallery: bool = True) -> None:
    out = Path(out)
    io.write_json(out / SUMMARY, data)
    if gallery:
        write_gallery(out, data)


def _report_pictures(out: Path, name: str) -> dict[str, list[Path]]:
    report = out / name / REPORT_DIR
    if not report.is_dir():
        return {}
    newest: dict[str, tuple[int, Path]] = {}
    for path in report.glob("validation-phase*-step*.png"):
        m = _VALIDATION.fullmatch(path.name)
        if m and int(m.group(2)) >= newest.get(m.group(1), (-1, None))[0]:
            newest[m.group(1)] = (int(m.group(2)), path)
    return {
        "attention": sorted(report.glob("attention-phase*.png")),
        "validation": [newest[p][1] for p in sorted(newest)],
        "loss": sorted(report.glob("loss-phase*.png")),
    }


def _href(out: Path, path: Path) -> str:
    return quote(path.relative_to(out).as_posix())


def _scene_card(out: Path, scene: dict) -> str:
    e = html.escape
    name, status = scene["name"], scene.get("status", "?")
    colour = STATUS_COLOURS.get(status, "#616161")
    facts = []
    if scene.get("seconds"):
        facts.append(f"{scene['seconds']:.1f} s")
    if scene.get("device"):
        facts.append(scene["device"] + (f", {scene['gpu']}" if scene.get("gpu") else ""))
    if scene.get("host"):
        facts.append(f"on {scene['host']}")
    if scene.get("attempt", 1) > 1:
        facts.append(f"attempt {scene['attempt']}")
    if scene.get("replaced"):
        facts.append(f"run again, as {scene['replaced']}")
    if scene.get("resumed_at"):
        facts.append(f"resumed at phase {scene['resumed_at']['phase']} step {scene['resumed_at']['step']}")
    parts = [f'<section class="scene" id="{e(name)}">',
             f'<h2>{e(name)} <span class="status" style="background:{colour}" title="{e(STATUS_MEANING.get(status, ""))}">{e(status)}</span></h2>',
             f'<p class="facts">{e(" · ".join(facts))}<br><span class="source">{e(str(scene.get("source", "")))}</span></p>']
    if scene.get("error"):
        parts.append(f'<p class="error">{e(scene["error"])}</p>')
    if scene.get("traceback"):
        parts.append(f"<details><summary>traceback</summary><pre>{e(scene['traceback'])}</pre></details>")
    if scene.get("warnings"):
        parts.append("<details><summary>warnings</summary><ul>" + "".join(f"<li>{e(w)}</li>" for w in scene["warnings"]) + "</ul></details>")
    figures = []
    preview = out / PREVIEW_DIR / f"{name}.png"
    if preview.is_file():
        figures.append((preview, "input and masks"))
    pictures = _report_pictures(out, name)
    figures += [(p, f"attention, {p.stem.split('-')[-1]}") for p in pictures.get("attention", [])]
    for p in pictures.get("validation", []):
        m = _VALIDATION.fullmatch(p.name)
        figures.append((p, f"samples, phase {m.group(1)} step {int(m.group(2))}"))
    if figures:
        parts.append('<div class="figures">' + "".join(
            f'<figure><a href="{_href(out, p)}"><img src="{_href(out, p)}" alt="{e(caption)}" loading="lazy"></a><figcaption>{e(caption)}</figcaption></figure>'
            for p, caption in figures) + "</div>")
    if pictures.get("loss"):
        parts.append("<details><summary>loss curves</summary>" + "".join(
            f'<img src="{_href(out, p)}" alt="loss, {e(p.stem)}" loading="lazy">' for p in pictures["loss"]) + "</details>")
    links = []
    if (out / name / "run.json").is_file():
        links.append(f'<a href="{_href(out, out / name / "run.json")}">run.json</a>')
    if (out / name / REPORT_DIR / "index.html").is_file():
        links.append(f'<a href="{_href(out, out / name / REPORT_DIR / "index.html")}">report</a>')
    if (out / name).is_dir():
        links.append(f'<a href="{quote(name)}/">folder</a>')
    if links:
        parts.append(f'<p class="links">{" · ".join(links)}</p>')
    parts.append("</section>")
    return "\n".join(parts)


def write_gallery(out: Path, data: dict) -> None:
    """``index.html``: the counts, the scenes that need attention, then a card per scene."""
    e = html.escape
    out = Path(out)
    scenes = data.get("scenes", [])
    counts = ", ".join(f"{n} {status}" for status, n in data.get("counts", {}).items())
    attention = [s for s in scenes if s.get("status") not in ("done", "skipped")]
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>bas batch: {e(out.name)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:90em}h2{margin:.2em 0}.scene{border-top:1px solid #ccc;padding:1em 0}"
        ".status{color:#fff;border-radius:.3em;padding:.1em .5em;font-size:70%;vertical-align:middle}.facts{color:#444;margin:.2em 0}"
        ".source{font-size:85%;color:#777}.error{color:#b71c1c;font-family:monospace;white-space:pre-wrap}"
        ".figures{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0}figure img{height:14em;max-width:44em;object-fit:contain;border:1px solid #ddd;image-rendering:auto}"
        "figcaption{font-size:85%;color:#555}details img{max-width:100%}pre{white-space:pre-wrap;font-size:80%}</style></head><body>",
        f"<h1>bas batch: {e(out.name)}</h1>",
        f"<p>{len(scenes)} scenes: {e(counts)}. Executor {e(str(data.get('executor')))}; started {e(str(data.get('started')))}"
        + (f", finished {e(str(data['finished']))} ({data.get('seconds', 0):.0f} s)" if data.get("finished") else ", still running")
        + f'. <a href="{SUMMARY}">{SUMMARY}</a></p>',
    ]
    if attention:
        parts.append("<p>Need attention: " + ", ".join(f'<a href="#{e(s["name"])}">{e(s["name"])}</a> ({e(s.get("status", "?"))})' for s in attention) + "</p>")
    parts += [_scene_card(out, s) for s in scenes]
    parts.append("</body></html>")
    with io.atomic_path(out / GALLERY) as tmp:
        tmp.write_text("\n".join(parts) + "\n", encoding="utf-8")
