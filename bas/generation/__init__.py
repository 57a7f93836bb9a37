"""Generating images with a finished run (``bas generate``, :func:`bas.generate`): :mod:`.generate` loads
the run's pipeline and samples; :mod:`.sampling` is a plain guided loop on model parts for where a
diffusers pipeline does not fit (local editing, validation images)."""
