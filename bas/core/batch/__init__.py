"""The contract of batch executors (``bas_register_executors``): :mod:`.tasks` is what an executor runs
per scene and the events it sends back.  The ``bas batch`` verb that drives executors is :mod:`bas.batches`."""
