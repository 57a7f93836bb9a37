"""Fixtures for testing bas plugins: a pytest plugin, on wherever bas is installed.

bas registers this module under pytest's ``pytest11`` entry point as ``bas.testing``, so a plugin
package's tests use its fixtures without a ``conftest.py``; ``pytest -p no:bas.testing`` turns it
off. Everything runs offline on a CPU in seconds:

- ``bas_tiny_model``: a tiny random Stable Diffusion pipeline (a diffusers folder), built once per
  test session; ``bas_tiny_model_of("sdxl")`` (or ``"flux"``, or a family a plugin adds) gives
  the tiny model of another family. They show plumbing, not image quality.
- ``bas_scene``: a scene folder (``img.png`` and two masks) that ``bas run --scene`` takes.
- ``bas_cli``: runs ``bas ARGS...`` in-process as the console script would and returns a
  :class:`CliResult` (exit code, stdout, stderr), so a test asserts what a user would see.
- ``bas_run_args``: the arguments of a quick ``bas run`` (a few steps) on the tiny model and
  scene, to which a test adds its own (``--plugin my-plugin``).

Importing this module imports neither torch nor diffusers; the fixtures do, when used.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a plugin's tests must not download anything by accident


@dataclass
class CliResult:
    """What ``bas ARGS...`` did: its exit code, and what it wrote to stdout and stderr."""

    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_bas(*args) -> CliResult:
    """``bas ARGS...`` as the console script runs it (click's standalone mode: ``Error:`` lines, exit
    codes), in this process, with stdout and stderr captured."""
    from bas.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def bas_tiny_model_of(tmp_path_factory) -> Callable[..., Path]:
    """``bas_tiny_model_of(family, plugins=())``: the tiny model of the family named as ``--family``
    names it (with ``plugins`` on, for a family a plugin adds), built on first use and reused."""
    built: dict[tuple, Path] = {}

    def tiny(family: str = "sd", plugins: tuple[str, ...] = ()) -> Path:
        key = (family, tuple(plugins))
        if key not in built:
            from bas.core.family import get_family
            from bas.core.plugins import Plugins
            from bas.demo.tiny import save_tiny_model

            chosen = get_family(Plugins(list(plugins)), family)
            built[key] = save_tiny_model(tmp_path_factory.mktemp("bas-models") / f"tiny-{family}", seed=0, family=chosen)
        return built[key]

    return tiny


@pytest.fixture(scope="session")
def bas_tiny_model(bas_tiny_model_of) -> Path:
    """A tiny random Stable Diffusion pipeline folder (SD 2.x's layout), built once per session."""
    return bas_tiny_model_of("sd")


@pytest.fixture(scope="session")
def bas_scene(tmp_path_factory) -> Path:
    """A scene folder (``img.png``, ``mask0.png``, ``mask1.png``: a ball and a box) for ``--scene``."""
    from bas.demo.demo import draw_scene

    return draw_scene(tmp_path_factory.mktemp("bas-scene"))


@pytest.fixture
def bas_cli() -> Callable[..., CliResult]:
    """``bas_cli(*args)``: runs ``bas ARGS...`` in-process and returns a :class:`CliResult`."""
    return run_bas


@pytest.fixture
def bas_run_args(bas_tiny_model, bas_scene, tmp_path) -> list[str]:
    """``run --scene SCENE --model TINY --out TMP/run`` with 2 + 2 steps, quietly; add options to it."""
    return [
        "run",
        "--scene",
        str(bas_scene),
        "--model",
        str(bas_tiny_model),
        "--out",
        str(tmp_path / "run"),
        "--phase1-steps",
        "2",
        "--phase2-steps",
        "2",
        "--quiet",
    ]
