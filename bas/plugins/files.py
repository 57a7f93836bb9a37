"""Masks from PNG files: --mask per concept, or --scene DIR with img.* and mask0.png, mask1.png, ..."""

from __future__ import annotations

from pathlib import Path

import click

from bas import hookimpl
from bas.core.errors import BasError
from bas.core.scene import SceneInput, find_scene_files, load_image, load_mask


class FileMasks:
    def __init__(self, config):
        self.masks = [Path(m) for m in config.options.get("masks") or ()]
        self.scene = config.options.get("scene")

    def load(self, config) -> SceneInput:
        image_path = Path(config.image) if config.image else None
        masks = self.masks
        if self.scene:
            scene_image, scene_masks = find_scene_files(Path(self.scene))
            image_path = image_path or scene_image
            masks = masks or scene_masks
        if image_path is None:
            raise BasError("No input image; pass --image IMG (or --scene DIR).")
        if not masks:
            raise BasError("No masks; pass one --mask PNG per concept (or --scene DIR).")
        image = load_image(image_path)
        return SceneInput(image=image, masks=[load_mask(m) for m in masks], mask_names=[str(m) for m in masks])


@hookimpl
def bas_run_options():
    return [
        click.Option(["--mask", "masks"], multiple=True, default=(), type=click.Path(path_type=Path), help="Mask PNG of one concept (repeat per concept, in handle order)."),
        click.Option(["--scene"], type=click.Path(path_type=Path), default=None, help="Folder with img.* and mask0.png, mask1.png, ... (the reference layout)."),
    ]


@hookimpl
def bas_register_mask_sources(register):
    register("files", FileMasks, description="mask PNGs given with --mask or --scene")
