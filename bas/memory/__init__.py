"""Memory plans: what a run holds on its device, phase by phase, before any weight loads.

``bas run --plan`` builds the run's modules from their config files only, on fake tensors (shapes,
dtypes and devices without storage), runs the run's own training step on them and counts the bytes
of the live storages at every operation (:mod:`bas.memory.tracking`); ``--vram N`` picks the
settings that make a run fit (:mod:`bas.memory.vram`).  bas's core does not import this package.
"""
