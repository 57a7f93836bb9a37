"""The documentation: the site builds with --strict (links, anchors, generated references), the
README's relative links lead to files, and the README keeps what a newcomer needs."""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bas.core import hookspecs

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


@pytest.mark.skipif(
    not (_installed("mkdocs") and _installed("mkdocstrings_handlers.python")),
    reason="the docs extra is not installed (pip install -e '.[docs]'): mkdocs and mkdocstrings[python] build the site",
)
def test_site_builds_strictly_with_every_hook_and_public_function(tmp_path):
    site = tmp_path / "site"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # the hook reference is generated from the hook specs: every spec has its entry
    hooks = (site / "hooks" / "index.html").read_text()
    specs = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("bas_")]
    assert len(specs) >= 8
    for name in specs:
        assert f'id="bas.core.hookspecs.{name}"' in hooks, f"{name} is missing from the hook reference"
    assert ":class:" not in hooks and ":func:" not in hooks  # Sphinx roles are rewritten, not printed
    api = (site / "api" / "index.html").read_text()
    for name in ("extract", "generate", "edit", "export", "evaluate", "batch"):
        assert f'id="bas.{name}"' in api
    for fixture in ("bas_tiny_model", "bas_tiny_model_of", "bas_scene", "bas_cli", "bas_run_args"):
        assert f'id="bas.testing.{fixture}"' in api
    # the pages made from files outside docs/
    assert "Keep a Changelog" in (site / "changelog" / "index.html").read_text()
    assert "Fidelity on bas-mini" in (site / "benchmarks" / "index.html").read_text()


def test_readme_relative_links_lead_to_files():
    text = README.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    relative = [link.split("#")[0] for link in links if not re.match(r"[a-z]+:", link) and not link.startswith("#")]
    assert any(link.startswith("docs/") and link.endswith(".png") for link in relative), "the README shows a picture from docs/"
    assert any(link.startswith("docs/") and link.endswith(".md") for link in relative), "the README links the docs pages"
    missing = [link for link in relative if link and not (ROOT / link).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_readme_has_the_newcomers_commands():
    text = README.read_text()
    for command in ("bas demo", "bas run", "bas generate", "mkdocs serve"):
        assert command in text, command
    for model in ("stabilityai/stable-diffusion-2-1-base", "stabilityai/stable-diffusion-xl-base-1.0", "black-forest-labs/FLUX.1-dev"):
        assert model in text, model


def test_pages_that_bas_names_exist():
    """Messages and help texts send users to docs pages (`--vram`'s help, `bas demo`, `--plugin full`'s warning)."""
    named = {m for path in (ROOT / "bas").rglob("*.py") for m in re.findall(r"docs/[\w-]+\.md", path.read_text())}
    assert "docs/paper.md" in named and "docs/speed-memory.md" in named
    assert not [page for page in named if not (ROOT / page).is_file()]
