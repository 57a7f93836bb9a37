"""The model card (README.md) and one textual-inversion file per handle (embeddings/) in every finished run.

Written before run.json, in the layout of the run's family (:func:`bas.exports.export.write_run_exports`);
``--plugin no:model-card`` leaves them out."""

from __future__ import annotations

from pathlib import Path

from bas.core.hookspecs import hookimpl


@hookimpl
def bas_write_run_files(run, out, info):
    from bas.exports.export import write_run_exports

    return write_run_exports(out, info, shown_as=Path(run.config.out), family=run.family)
