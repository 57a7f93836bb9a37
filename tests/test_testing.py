"""bas.testing, the pytest plugin for plugin authors (examples/bas-plugin-example's tests use it as an author would)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from diffusers import DiffusionPipeline

ROOT = Path(__file__).resolve().parents[1]


def test_it_is_a_pytest_plugin_by_entry_point():
    entry_points = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    assert entry_points["pytest11"] == {"bas.testing": "bas.testing"}


def test_tiny_models_load_as_their_family_pipeline(bas_tiny_model, bas_tiny_model_of):
    assert bas_tiny_model_of("sd") == bas_tiny_model  # built once per session
    assert type(DiffusionPipeline.from_pretrained(str(bas_tiny_model_of("sdxl")))).__name__ == "StableDiffusionXLPipeline"


def test_cli_runner_gives_the_exit_code_and_the_error_line_a_user_sees(bas_cli, bas_scene, tmp_path):
    assert {p.name for p in bas_scene.iterdir()} >= {"img.png"}
    result = bas_cli("generate", tmp_path / "no-run", "a photo of <asset0>")
    assert result.exit_code == 1 and result.stderr.startswith("Error: ") and "Traceback" not in result.output
    assert bas_cli("--version").stdout.startswith("bas, version ")
