"""Shared fixtures: tiny models built once per session, a drawn scene, a CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may try to download anything

import pytest
from click.testing import CliRunner

from bas.cli import cli
from bas.core.demo import draw_scene
from bas.core.tiny import save_tiny_model

SHARED_SCENES = Path(__file__).resolve().parents[1].parent / "shared" / "scenes"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_vpred_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-v", seed=1, prediction_type="v_prediction")


@pytest.fixture(scope="session")
def scene(tmp_path_factory) -> Path:
    return draw_scene(tmp_path_factory.mktemp("scene"))


@pytest.fixture
def invoke():
    runner = CliRunner()

    def _invoke(*args):
        return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)

    return _invoke


def quick_run_args(scene: Path, model: Path, out: Path, *extra) -> list:
    return ["run", "--scene", scene, "--model", model, "--out", out, "--phase1-steps", 3, "--phase2-steps", 3, "--quiet", *extra]
