"""Build-time helpers of the documentation site (mkdocs.yml names this file twice).

- As an mkdocs hook module: ``CHANGELOG.md`` and ``benchmarks/README.md`` stay where they are (the
  repository's readers and ``benchmarks/report.py`` use them there) and become the site's pages
  ``changelog.md`` and ``benchmarks.md``; ``mkdocs serve`` rebuilds when they change.
- As a griffe extension (``SphinxRoles``, for mkdocstrings): bas's docstrings use Sphinx roles
  (``:class:`bas.core.family.ModelFamily```), which Markdown would print as written. A role whose
  target is documented on the site (the public API, ``bas.testing``, ``bas.core.hookspecs``)
  becomes a cross-reference, which ``--strict`` checks; any other becomes inline code.

Only mkdocs and mkdocstrings[python] (with griffe) are needed; nothing here is imported by bas.
"""

from __future__ import annotations

import re
from pathlib import Path

from griffe import Extension
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
# page in the site -> file of the repository it is made from
OUTSIDE_PAGES = {"changelog.md": ROOT / "CHANGELOG.md", "benchmarks.md": ROOT / "benchmarks" / "README.md"}


def on_files(files, config):
    for uri, path in OUTSIDE_PAGES.items():
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_serve(server, config, builder):
    for path in OUTSIDE_PAGES.values():
        server.watch(str(path))
    return server


# the modules (and public functions) whose members the API and hook pages render
DOCUMENTED_PREFIXES = ("bas.testing.", "bas.core.hookspecs.")
DOCUMENTED = {f"bas.{name}" for name in ("extract", "generate", "edit", "export", "evaluate", "batch", "hookimpl")}
ROLE = re.compile(r":(?:py:)?(?:class|func|meth|data|attr|mod|obj|exc):`(~?)([\w.]+)`")


class SphinxRoles(Extension):
    """Rewrites Sphinx roles in docstrings as Markdown cross-references or inline code."""

    def on_package(self, *, pkg, **kwargs):
        # once the whole package is loaded, so that a bare name can be looked up in its module
        objects = [pkg]
        while objects:
            obj = objects.pop()
            if obj.is_alias:
                continue
            objects.extend(obj.members.values())
            if obj.docstring is not None:
                obj.docstring.value = ROLE.sub(lambda match, obj=obj: _reference(match, obj), obj.docstring.value)


def _reference(match, obj):
    short, target = match.group(1), match.group(2)
    module = obj if obj.is_module else obj.module
    if "." not in target and target in module.members:
        target = f"{module.path}.{target}"  # a name of the docstring's own module
    shown = target.rsplit(".", 1)[-1] if short else target
    if target in DOCUMENTED or target.startswith(DOCUMENTED_PREFIXES):
        return f"[`{shown}`][{target}]"
    return f"`{shown}`"
