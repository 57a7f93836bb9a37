"""``bas eval`` and :func:`bas.evaluate`: :mod:`.evaluate` runs the evaluation, :mod:`.outputs` writes
eval.json, eval.csv and index.html, :mod:`.stats` the intervals and tests, :mod:`.command` the
command.  What evaluator plugins implement is in core: :mod:`bas.core.evaluation`."""
