"""Masks from COCO annotations (--annotations FILE --image-id ID), and `bas coco-select` to find the paper's evaluation images."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from bas import hookimpl
from bas.core.errors import BasError
from bas.core.scene import MAX_CONCEPTS, SceneInput, centre_square, load_image

DEFAULT_MIN_AREA = 0.15  # the paper's evaluation rule: segments covering at least 15% of the square crop


# (list, field, kind) of the numbers bas and pycocotools compute with; a string there would raise deep inside
NUMBER_FIELDS = (("images", "id", int), ("images", "width", int), ("images", "height", int),
                 ("annotations", "image_id", int), ("annotations", "category_id", int), ("annotations", "area", float),
                 ("annotations", "iscrowd", int), ("categories", "id", int))


def _is_number(value, kind) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return value == int(value) if kind is int and math.isfinite(value) else math.isfinite(value)


def load_coco(path: Path):
    """A ``pycocotools.coco.COCO`` index of an annotation file, after checking it is COCO JSON."""
    from pycocotools.coco import COCO

    path = Path(path)
    if not path.is_file():
        raise BasError(f"Annotation file {path} does not exist; pass a COCO instances_*.json with --annotations.")
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BasError(f"{path} is not a COCO annotation file (not JSON: {exc}); pass a COCO instances_*.json with --annotations.") from exc
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data, dict) or not isinstance(data.get(key), list)]
    if missing:
        raise BasError(f"{path} is not a COCO annotation file (no '{missing[0]}' list); pass a COCO instances_*.json with --annotations.")
    for key, fields in (("images", ("id", "width", "height")), ("annotations", ("id", "image_id", "category_id", "segmentation")), ("categories", ("id", "name"))):
        bad = next((item for item in data[key] if not isinstance(item, dict) or any(f not in item for f in fields)), None)
        if bad is not None:
            raise BasError(f"{path} is not a COCO annotation file (an entry of '{key}' lacks one of {', '.join(fields)}); pass a COCO instances_*.json with --annotations.")
    for key, field, kind in NUMBER_FIELDS:
        bad = next((item for item in data[key] if field in item and not _is_number(item[field], kind)), None)
        if bad is not None:
            raise BasError(f"{path} is not a valid COCO annotation file: the '{field}' of {key} entry {bad.get('id', '?')!r} is {bad[field]!r}, "
                           f"not a {'whole ' if kind is int else ''}number; fix that entry or pass another --annotations file.")
    for image in data["images"]:  # masks are drawn at the image's size: a size of 0 is the entry's fault, not its polygons'
        bad = next((f for f in ("width", "height") if isinstance(image[f], (int, float)) and image[f] < 1), None)
        if bad is not None:
            raise BasError(f"{path} gives image {image['id']} the {bad} {image[bad]!r}; an image's width and height are its size in pixels, "
                           "whole numbers above 0: fix that entry of 'images'.")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def instance_mask(coco, ann: dict) -> np.ndarray:
    """The binary (uint8) mask of one annotation, from polygons or RLE (compressed or not)."""
    try:
        with warnings.catch_warnings():  # pycocotools' numpy 2 copy-keyword notice is not the user's concern
            warnings.simplefilter("ignore", DeprecationWarning)
            return coco.annToMask(ann)
    except Exception as exc:  # pycocotools raises TypeError, ValueError, IndexError, ... on bad segmentations
        raise BasError(f"Annotation {ann['id']} (image {ann['image_id']}) has a segmentation that is neither polygons nor RLE ({type(exc).__name__}: {exc}); fix or drop that annotation.") from exc


def crop_coverage(mask: np.ndarray) -> float:
    """The fraction of the square centre crop (the part training keeps) that ``mask`` covers."""
    h, w = mask.shape
    left, top, side = centre_square(w, h)
    return float(mask[top : top + side, left : left + side].astype(bool).mean())


def is_thing(category: dict) -> bool:
    """COCO "things" (objects) as opposed to "stuff" (sky, grass): ids 1-90, or the panoptic flag."""
    return bool(category.get("isthing", 1 <= int(category["id"]) <= 90))


def _instances(coco, image_id: int, include_crowd: bool) -> list[dict]:
    return [a for a in coco.imgToAnns.get(image_id, []) if include_crowd or not a.get("iscrowd", 0)]


class CocoMasks:
    """The instances of one COCO image, each a concept, largest first (or in --category order)."""

    def __init__(self, config):
        options = config.options
        self.annotations = options.get("annotations")
        self.image_id = options.get("image_id")
        self.categories = list(options.get("categories") or ())
        self.min_area = options.get("min_area", DEFAULT_MIN_AREA)
        self.include_crowd = bool(options.get("include_crowd"))

    def load(self, config) -> SceneInput:
        if self.annotations is None or self.image_id is None:
            raise BasError("coco-masks needs --annotations FILE (a COCO instances_*.json) and --image-id ID; `bas coco-select --annotations FILE` lists suitable ids.")
        if not 0.0 <= self.min_area < 1.0:
            raise BasError(f"--min-area is a fraction of the square crop in [0, 1), not {self.min_area}.")
        path = Path(self.annotations)
        coco = load_coco(path)
        info = coco.imgs.get(self.image_id)
        if info is None:
            examples = ", ".join(str(i) for i in sorted(coco.imgs)[:5])
            raise BasError(f"Image id {self.image_id} is not in {path}; pass one of its {len(coco.imgs)} image ids (such as {examples}) or list suitable ones with `bas coco-select`.")
        if config.image is None:
            raise BasError(f"No input image; pass --image with image {self.image_id}'s file ({info.get('file_name', 'see its file_name in the annotations')}).")
        image = load_image(Path(config.image))
        w, h = image.size
        if abs(w / h - info["width"] / info["height"]) > 0.01:
            raise BasError(f"{config.image} is {w}x{h} but image {self.image_id} in {path} is {info['width']}x{info['height']}; pass that image's file ({info.get('file_name', '?')}).")

        anns = _instances(coco, self.image_id, self.include_crowd)
        names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
        order = {}
        if self.categories:
            ids_by_name = {name: cid for cid, name in names.items()}
            present = sorted({names.get(a["category_id"], "?") for a in anns})
            for rank, name in enumerate(self.categories):
                if name not in ids_by_name:
                    raise BasError(f"Category '{name}' is not in {path}; use one of its category names, such as {', '.join(sorted(ids_by_name)[:8])}.")
                if not any(a["category_id"] == ids_by_name[name] for a in anns):
                    raise BasError(f"Image {self.image_id} has no '{name}' instance; its categories are: {', '.join(present) or 'none'}.")
                order[ids_by_name[name]] = rank
            anns = [a for a in anns if a["category_id"] in order]
        if not anns:
            raise BasError(f"Image {self.image_id} has no annotated instance in {path}; pick another image, for example with `bas coco-select`.")

        found = []
        for ann in anns:
            mask = instance_mask(coco, ann)
            found.append((ann, mask, crop_coverage(mask)))
        kept = [f for f in found if f[2] >= self.min_area and f[2] > 0]
        if not kept:
            ann, _, coverage = max(found, key=lambda f: f[2])
            raise BasError(
                f"No instance of image {self.image_id} covers at least {self.min_area:.0%} of the square crop "
                f"(the largest, a {names.get(ann['category_id'], '?')}, covers {coverage:.1%}); lower --min-area or pick another image."
            )
        kept.sort(key=lambda f: (order.get(f[0]["category_id"], 0), -f[2]))
        if len(kept) > MAX_CONCEPTS:
            raise BasError(
                f"Image {self.image_id} has {len(kept)} instances covering at least {self.min_area:.0%} of the square crop but at most "
                f"{MAX_CONCEPTS} concepts are supported; raise --min-area or name the wanted ones with --category."
            )
        dropped = dropped_message(self.image_id, self.min_area, [(names.get(a["category_id"], "?"), c) for a, _, c in found if c < self.min_area or c == 0])
        if dropped:
            warnings.warn(dropped, stacklevel=1)
        return SceneInput(
            image=image,
            masks=[mask.astype(np.float32) for _, mask, _ in kept],
            mask_names=[f"COCO annotation {a['id']} ({names.get(a['category_id'], '?')}, {c:.0%} of the crop)" for a, _, c in kept],
        )


def dropped_message(image_id: int, min_area: float, dropped: list[tuple[str, float]]) -> str | None:
    """One line saying which instances ``--min-area`` (or the square crop) left out, and how to keep them."""
    small = sorted((c, name) for name, c in dropped if c > 0)[::-1]
    outside = [name for name, c in dropped if c == 0]
    parts = []
    if small:
        listed = ", ".join(f"{name} {c:.1%}" for c, name in small[:6]) + (f", and {len(small) - 6} more" if len(small) > 6 else "")
        parts.append(f"left out {len(small)} instance{'s' if len(small) > 1 else ''} of image {image_id} covering less than "
                     f"{min_area:.0%} of the square crop ({listed}); pass --min-area 0 to keep them")
    if outside:
        parts.append(f"{len(outside)} more ({', '.join(sorted(set(outside)))}) lie{'s' if len(outside) == 1 else ''} outside the square crop")
    return ("coco-masks " + "; ".join(parts) + ".") if parts else None


@dataclass
class Selected:
    image_id: int
    file_name: str
    segments: list[tuple[str, float]]  # (category name, fraction of the square crop), largest first


def select_images(coco, min_fraction: float = DEFAULT_MIN_AREA, min_segments: int = 2, include_crowd: bool = False) -> list[Selected]:
    """Images with at least ``min_segments`` "thing" segments, each covering at least
    ``min_fraction`` of the square centre crop: the rule of the paper's COCO evaluation set."""
    categories = {c["id"]: c for c in coco.dataset["categories"]}
    selected = []
    for image_id in sorted(coco.imgs):
        info = coco.imgs[image_id]
        side = min(info["width"], info["height"])
        candidates = [
            a for a in _instances(coco, image_id, include_crowd)
            if a["category_id"] in categories and is_thing(categories[a["category_id"]])
            # the crop holds at most the whole area; 0.9 leaves room for rasterisation vs. polygon area
            and a.get("area", side * side) >= 0.9 * min_fraction * side * side
        ]
        if len(candidates) < min_segments:
            continue
        segments = []
        for ann in candidates:
            coverage = crop_coverage(instance_mask(coco, ann))
            if coverage >= min_fraction:
                segments.append((categories[ann["category_id"]]["name"], coverage))
        if len(segments) >= min_segments:
            selected.append(Selected(image_id, info.get("file_name", ""), sorted(segments, key=lambda s: -s[1])))
    return selected


@click.command("coco-select")
@click.option("--annotations", required=True, type=click.Path(path_type=Path), help="A COCO instances_*.json.")
@click.option("--min-fraction", type=float, default=DEFAULT_MIN_AREA, show_default=True, help="Each segment must cover at least this fraction of the square centre crop.")
@click.option("--min-segments", type=int, default=2, show_default=True, help="At least this many such thing segments per image.")
@click.option("--sample", type=int, default=None, help="Print a random subset of this many (the paper used 50) [default: all].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --sample.")
@click.option("--include-crowd", is_flag=True, help="Count crowd regions (iscrowd=1) as segments too.")
@click.option("--format", "fmt", type=click.Choice(["text", "jsonl"]), default="text", show_default=True,
              help="text: a line per image for reading; jsonl: a `bas batch` manifest, a scene per image (needs --images).")
@click.option("--images", type=click.Path(path_type=Path), default=None, help="The folder holding the annotation file's images (such as val2017/), for --format jsonl.")
def coco_select(annotations, min_fraction, min_segments, sample, seed, include_crowd, fmt, images):
    """List the images of a COCO annotation file that meet the paper's evaluation rule.

    At least --min-segments "thing" segments, each covering at least --min-fraction of the square
    centre crop.  One line per image: id, file name, then each segment's category and coverage.
    Feed an id to `bas masks --plugin coco-masks --image-id ID ...`, or write a manifest for
    `bas batch` with --format jsonl --images DIR > scenes.jsonl.
    """
    if fmt == "jsonl" and images is None:
        raise BasError("--format jsonl writes a line per scene naming its image file; pass the folder of the COCO images with --images DIR (such as val2017/).")
    if images is not None and not Path(images).is_dir():
        raise BasError(f"--images {images} is not a folder; pass the folder that holds the annotation file's images (such as val2017/).")
    if not 0.0 < min_fraction < 1.0:
        raise BasError(f"--min-fraction must be between 0 and 1, not {min_fraction}.")
    if min_segments < 1:
        raise BasError(f"--min-segments must be 1 or more, not {min_segments}.")
    coco = load_coco(annotations)
    selected = select_images(coco, min_fraction, min_segments, include_crowd)
    total = len(selected)
    if sample is not None and sample < total:
        selected = sorted(random.Random(seed).sample(selected, sample), key=lambda s: s.image_id)
    for s in selected:
        if fmt == "jsonl":
            click.echo(json.dumps(manifest_line(s, Path(annotations), Path(images), min_fraction, include_crowd)))
        else:
            click.echo(f"{s.image_id}\t{s.file_name}\t" + ", ".join(f"{name} {cov:.0%}" for name, cov in s.segments))
    missing = [s.file_name for s in selected if images is not None and not (Path(images) / s.file_name).is_file()]
    if missing:
        click.echo(f"Warning: {len(missing)} of the {len(selected)} images are not in {images} (such as {missing[0]}); those scenes will fail.", err=True)
    click.echo(
        f"{total} of {len(coco.imgs)} images have at least {min_segments} thing segments covering {min_fraction:.0%} of the square crop each"
        + (f"; printed {len(selected)} of them (--sample {sample}, --seed {seed})." if len(selected) < total else "."),
        err=True,
    )


def manifest_line(selected: Selected, annotations: Path, images: Path, min_fraction: float, include_crowd: bool) -> dict:
    """A `bas batch` manifest line for one selected image: its instances become the concepts
    through this mask source, with the selection's own coverage rule, and each handle starts from
    its instance's category name (largest first, the order coco-masks gives the masks; `bas eval`
    takes these words as the concepts' class words).  Paths are absolute, so the manifest works
    from any folder."""
    line = {"name": f"coco-{selected.image_id}", "image": str((images / selected.file_name).resolve()), "plugins": ["coco-masks"],
            "annotations": str(annotations.resolve()), "image_id": selected.image_id, "min_area": min_fraction,
            "init_tokens": [name for name, _ in selected.segments]}
    if include_crowd:
        line["include_crowd"] = True
    return line


@hookimpl
def bas_run_options():
    return [
        click.Option(["--annotations"], type=click.Path(path_type=Path), default=None, help="COCO annotation file (instances_*.json)."),
        click.Option(["--image-id"], type=int, default=None, help="The id of the --image in the annotation file."),
        click.Option(["--category", "categories"], multiple=True, default=(), help="Keep only instances of this category name (repeatable; sets the concept order)."),
        click.Option(["--min-area"], type=float, default=DEFAULT_MIN_AREA, show_default=True, help="Drop instances covering less than this fraction of the square crop."),
        click.Option(["--include-crowd"], is_flag=True, help="Keep crowd regions (iscrowd=1) as concepts too."),
    ]


@hookimpl
def bas_register_mask_sources(register):
    register("coco-masks", CocoMasks, description="instances of one image in a COCO annotation file")


@hookimpl
def bas_register_commands(cli):
    cli.add_command(coco_select)
