"""The scenes of a batch: scene folders and manifests (JSONL or CSV, one scene per line).

A manifest line holds what :func:`bas.extract` takes for one scene, plus its name:

    {"name": "toys", "image": "toys/img.jpg", "masks": ["toys/mask0.png", "toys/mask1.png"],
     "init_tokens": ["bear", "ball"], "phase1_steps": 200, "plugins": ["tensorboard"]}

Keys are option names with underscores or as on the command line (``"phase1-steps"``,
``"mask"``, ``"init-token"``); ``"scene"`` names a scene folder; ``"plugins"`` adds plugins to
the batch's ``--plugin`` values for this scene.  A CSV manifest has the same keys as its header
row; a cell holding several values (masks, init tokens, plugins) separates them with ``;`` and an
empty cell leaves the option at the batch's value.  Relative paths in a manifest are relative to
the manifest's folder.  This module reads and names scenes; :mod:`.runner` checks their options.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from bas.core.errors import BasError
from bas.core.scene import IMAGE_SUFFIXES

MANIFEST_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
LIST_SEPARATOR = ";"
# the batch's own files in its output folder, which no scene may be named as
RESERVED_NAMES = {"batch.json", "index.html"}
MAX_NAME_LENGTH = 128
_BAD_NAME_CHARS = re.compile(r'[/\\<>:"|?*\x00-\x1f]')
_EXTRA_CELLS = "\0extra"  # where csv puts the cells of a row longer than the header
EXAMPLE_LINE = '{"name": "toys", "image": "toys/img.jpg", "masks": ["toys/mask0.png", "toys/mask1.png"]}'


@dataclass
class SceneSpec:
    """One scene as read: its name, where it came from (for messages) and its option values.

    ``values`` are raw: keys as written (normalised to underscores), values as JSON or CSV text
    gave them; ``base`` is the folder relative paths are relative to; ``text`` says the values
    are CSV text still to be converted.
    """

    name: str
    source: str
    values: dict[str, Any] = field(default_factory=dict)
    plugins: list[str] = field(default_factory=list)
    base: Path = Path(".")
    text: bool = False


def check_name(name: Any, source: str) -> str:
    """A scene name that is safe as a folder name inside the batch's output folder."""
    hint = 'give it a "name" of letters, digits, "-", "_" and "." (a manifest line\'s "name" key)'
    if not isinstance(name, str) or not name.strip():
        raise BasError(f"{source}: the scene name {name!r} is empty or not text; {hint}.")
    if name != name.strip():
        raise BasError(f"{source}: the scene name {name!r} starts or ends with a space; {hint}.")
    if name.startswith("."):
        raise BasError(f"{source}: the scene name {name!r} starts with '.', which marks hidden and temporary folders; {hint}.")
    bad = _BAD_NAME_CHARS.search(name)
    if bad:
        raise BasError(f"{source}: the scene name {name!r} contains {bad.group()!r}, which cannot be in a folder name; {hint}.")
    if len(name) > MAX_NAME_LENGTH:
        raise BasError(f"{source}: the scene name is {len(name)} characters long, more than {MAX_NAME_LENGTH}; {hint}.")
    if name.lower() in RESERVED_NAMES:
        raise BasError(f"{source}: the scene name {name!r} is taken by the batch's own files ({', '.join(sorted(RESERVED_NAMES))}); {hint}.")
    return name


def check_unique(specs: list[SceneSpec]) -> None:
    """Two scenes may not share a run folder (names are compared ignoring case, as some file systems do)."""
    seen: dict[str, SceneSpec] = {}
    for spec in specs:
        key = spec.name.casefold()
        if key in seen:
            other = seen[key]
            raise BasError(f"{other.source} and {spec.source} are both named '{spec.name}'" + (f" (as '{other.name}')" if other.name != spec.name else "")
                           + "; every scene needs its own name, so give one of them another \"name\" in a manifest.")
        seen[key] = spec


def normalise_key(key: str) -> str:
    return key.strip().lstrip("-").replace("-", "_")


def _is_scene_folder(path: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.glob("img.*")) or (path / "mask0.png").is_file()


def folder_scene(path: Path) -> SceneSpec:
    """A scene folder (the layout ``bas run --scene`` takes), named after the folder."""
    path = Path(path).resolve()
    if not _is_scene_folder(path):
        inner = sorted(p.name for p in path.iterdir() if p.is_dir() and _is_scene_folder(p))
        if inner:
            raise BasError(f"{path} holds scene folders ({', '.join(inner[:3])}{', ...' if len(inner) > 3 else ''}), not a scene; "
                           f"pass them one by one, such as {path}/*.")
    return SceneSpec(name=check_name(path.name, str(path)), source=str(path), values={"scene": path}, base=path.parent)


def _line_spec(raw: dict, source: str, base: Path, text: bool) -> SceneSpec:
    values: dict[str, Any] = {}
    written: dict[str, str] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not key.strip():
            raise BasError(f"{source}: a key is empty; every key names an option such as \"image\" or \"phase1_steps\".")
        norm = normalise_key(key)
        if norm in written:
            raise BasError(f"{source}: \"{written[norm]}\" and \"{key}\" are the same option; give it once.")
        written[norm] = key
        if text and value.strip() == "":
            continue  # an empty CSV cell: the batch's value
        values[norm] = value.strip() if text else value
    plugins = values.pop("plugins", values.pop("plugin", []))
    if text:
        plugins = [p.strip() for p in plugins.split(LIST_SEPARATOR) if p.strip()] if plugins else []
    elif isinstance(plugins, str):
        plugins = [plugins]
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise BasError(f"{source}: \"plugins\" must be a list of plugin names such as [\"sam-masks\"], not {plugins!r}.")
    name = values.pop("name", None)
    if name is None:
        if values.get("scene"):
            name = Path(str(values["scene"])).name
        elif values.get("image"):
            name = Path(str(values["image"])).stem
        else:
            raise BasError(f"{source}: the line has no \"name\", \"image\" or \"scene\"; give each scene at least an image and a name, such as {EXAMPLE_LINE}.")
    if not isinstance(name, str):
        name = str(name) if isinstance(name, int) and not isinstance(name, bool) else name
    return SceneSpec(name=check_name(name, source), source=source, values=values, plugins=plugins, base=base, text=text)


def read_jsonl(path: Path) -> list[SceneSpec]:
    specs = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        source = f"{path} line {number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BasError(f"{source} is not valid JSON ({exc.msg} at column {exc.colno}); each line must be one JSON object such as {EXAMPLE_LINE}.") from None
        if not isinstance(raw, dict):
            raise BasError(f"{source} is a JSON {type(raw).__name__}, not an object; each line must be one JSON object such as {EXAMPLE_LINE}.")
        specs.append(_line_spec(raw, source, path.parent, text=False))
    return specs


def read_csv(path: Path) -> list[SceneSpec]:
    text = _read_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""), restkey=_EXTRA_CELLS)
    header = reader.fieldnames or []
    if not header or not any(normalise_key(h) in ("image", "scene", "name") for h in header if h):
        raise BasError(f"{path} line 1 must be a header naming the columns, such as name,image,masks,init_tokens "
                       "(masks and other lists separated by ';').")
    specs = []
    try:
        for row in reader:
            source = f"{path} line {reader.line_num}"
            if _EXTRA_CELLS in row:
                raise BasError(f"{source} has {len(header) + len(row[_EXTRA_CELLS])} cells but the header names {len(header)} columns; "
                               "quote cells that hold a comma.")
            if all(not (v or "").strip() for v in row.values()):
                continue
            specs.append(_line_spec({k: v or "" for k, v in row.items()}, source, path.parent, text=True))
    except csv.Error as exc:
        raise BasError(f"{path} line {reader.line_num} is not valid CSV ({exc}); quote cells that hold a comma or a quote.") from None
    return specs


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BasError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save the manifest as UTF-8.") from None


def read_scenes(items: Iterable[str | Path | dict]) -> list[SceneSpec]:
    """Scene specs from scene folders, manifest files and (from Python) dicts shaped like manifest lines."""
    specs: list[SceneSpec] = []
    for index, item in enumerate(items):
        if isinstance(item, dict):
            specs.append(_line_spec(item, f"scene {index + 1} of the list", Path.cwd(), text=False))
            continue
        path = Path(item)
        if path.is_dir():
            specs.append(folder_scene(path))
        elif path.is_file():
            kind = MANIFEST_SUFFIXES.get(path.suffix.lower())
            if kind is None:
                raise BasError(f"{path} is neither a scene folder nor a manifest; pass a folder holding img.jpg and mask0.png, ... "
                               f"or a manifest ending in {', '.join(MANIFEST_SUFFIXES)}.")
            found = (read_jsonl if kind == "jsonl" else read_csv)(path.resolve())
            if not found:
                raise BasError(f"{path} lists no scene; add one line per scene, such as {EXAMPLE_LINE}.")
            specs.extend(found)
        else:
            raise BasError(f"{path} does not exist; pass scene folders or manifests (.jsonl, .csv).")
    if not specs:
        raise BasError("No scenes were given; pass scene folders or manifests (.jsonl, .csv), such as: bas batch scenes/* --out runs.")
    check_unique(specs)
    return specs
