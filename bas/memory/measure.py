"""Measuring what a plan predicts: the peak of live tensor bytes during a real run's steps on the CPU.

Independent of the plan's own counting: the run is a real :class:`bas.core.training.Run` with real
weights, and the bytes are the CPU allocator's, as ``torch.profiler`` records every allocation and
free (``profile_memory=True``), added to the bytes of every tensor alive in the process when the
step starts (found by the garbage collector, each storage once, less those alive before the run).  Used by the tests (tiny models)
and by ``benchmarks/memory_plan.py``, which on a GPU compares with ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import gc

import torch

from bas.core.plugins import Plugins
from bas.core.training import Run, RunConfig


def live_storages() -> dict[int, torch.UntypedStorage]:
    """The storages of every CPU tensor the garbage collector can reach, by their address."""
    found = {}
    for obj in gc.get_objects():
        try:
            if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                found[storage.data_ptr()] = storage
        except Exception:  # tensors without storage (sparse, wrapper subclasses)
            continue
    return found


def live_tensor_bytes(unrelated: dict[int, torch.UntypedStorage] | None = None) -> int:
    """The bytes of the live CPU storages, less those in ``unrelated`` (alive before the run began: held
    there, they cannot have been freed and their addresses reused)."""
    return sum(s.nbytes() for ptr, s in live_storages().items() if not unrelated or ptr not in unrelated)


def profiled_peak(step) -> int:
    """The peak of the bytes the CPU allocator holds while ``step()`` runs, above what it held before."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # every allocation (+bytes) and free (-bytes), in order; prof.events() folds some into their operators
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    now = peak = 0
    for event in events:
        now += event.nbytes()
        peak = max(peak, now)
    return peak


def measure_run(config: RunConfig, plugins: Plugins) -> dict[str, int]:
    """The measured peak of live tensor bytes in a step of each phase of a real run (the phase's second
    step, which holds the optimizer's state as every later one does): on the CPU by the profiler, on
    CUDA ``torch.cuda.max_memory_allocated``."""
    gc.collect()
    unrelated = live_storages()  # the process's other tensors (a test session's, a caller's) are not the run's
    run = Run(config, plugins)
    run.load()
    for term in run.resolved.loss_terms:
        term.setup(run)
    run.release_vae()
    run.components.denoiser.train()
    peaks = {}
    phases = [(1, lambda: [{"params": run.handle_params, "lr": config.phase1_lr}])]
    if config.phase2_steps:
        phases.append((2, lambda: [{"params": g["params"], "lr": g["lr"]} for g in run.phase2_groups()]))
    for phase, groups in phases:
        groups = groups()
        params = [p for g in groups for p in g["params"]]
        terms = [t for t in run.resolved.loss_terms if phase in t.phases]
        optimizer = run.resolved.optimizer_factory(groups, config)
        scaler = torch.amp.GradScaler(run.device.type, enabled=run.precision == "fp16")

        def step(number, phase=phase, terms=terms, optimizer=optimizer, scaler=scaler, params=params):
            batch, values, loss = run.forward_step(phase, number, terms)
            del batch, values
            run.update(loss, optimizer, scaler, params)

        step(1)
        gc.collect()
        if run.device.type == "cuda":  # the allocator's own count, as the plan predicts it
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(run.device)
            step(2)
            torch.cuda.synchronize()
            peaks[f"phase{phase}"] = torch.cuda.max_memory_allocated(run.device)
        else:
            before = live_tensor_bytes(unrelated)
            peaks[f"phase{phase}"] = before + profiled_peak(lambda: step(2))
    for term in run.resolved.loss_terms:
        term.teardown(run)
    return peaks
