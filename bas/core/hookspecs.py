"""Every hook a ``bas`` plugin can implement.  This module is the reference documentation.

A plugin is a module or object with functions decorated by :data:`bas.hookimpl`, named after the
specs below.  Built-in behaviour (the masked diffusion loss, LoRA, AdamW, the progress bar, ...)
is made of plugins exactly like these, in ``bas/plugins/``; installed packages add plugins through
the ``bas`` entry-point group and are turned on with ``--plugin NAME``.

Registration is by callback: a ``bas_register_*`` hook receives ``register(name, factory,
description="")`` and calls it once per thing it provides.  The callback records which plugin
registered which name, so clashes and unknown names are reported with their owners.  An
implementation may accept a subset of a hook's arguments, so hooks can grow without breaking
plugins.

The ``register_*`` hooks are called once per run to *resolve* the chosen components into plain
objects; the training loop then calls those objects directly, never through hook dispatch.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("bas")
hookimpl = pluggy.HookimplMarker("bas")


@hookspec
def bas_run_options():
    """Return a list of ``click.Option`` objects to add to ``bas run`` (and the Python API).

    Their values reach components through ``config.options[option.name]``; the Python API takes
    them as keyword arguments of :func:`bas.extract` with the option's default otherwise.
    ``bas run --plugin NAME --help`` lists the options a plugin adds.
    """


@hookspec
def bas_register_commands(cli):
    """Add commands to the ``bas`` command group ``cli`` (a ``click.Group``)."""


@hookspec
def bas_register_mask_sources(register):
    """Register mask sources: ``register(name, factory)``.

    ``factory(config)`` returns an object with ``load(config) -> bas.core.scene.SceneInput``: the
    input image and one soft mask (float array in [0, 1], any size) per concept.  Exactly one mask
    source is used per run: the one from a plugin named with ``--plugin``, else the default.  The
    core applies the shared mask cleanup (``--mask-threshold``, ``--fill-holes``, ...) to what
    ``load`` returns, so a source returns its masks as it found them.

    ``bas masks`` uses the same sources to write masks and a preview; there ``config`` is a
    :class:`bas.core.masks.MasksConfig`: ``image``, ``device`` and ``options`` as in a run, plus
    ``mask_model``, the checkpoint given with ``bas masks --model`` (a run's ``--model`` is the
    diffusion model).  ``bas masks`` offers the options of plugins that provide a mask source or
    nothing that training uses.
    """


@hookspec
def bas_register_weight_strategies(register):
    """Register weight strategies: ``register(name, factory)``.

    ``factory(config)`` returns a :class:`bas.core.components.WeightStrategy`: which weights
    phase 2 trains (LoRA adapters, the full UNet and text encoder, ...), its default learning
    rate, how they are saved into the output folder and how they are applied to a pipeline for
    generation.  Exactly one is used per run: the one from a plugin named with ``--plugin``,
    else the default.
    """


@hookspec
def bas_register_loss_terms(register):
    """Register loss terms: ``register(name, factory)``.

    ``factory(config)`` returns a :class:`bas.core.components.LossTerm` (or ``None`` to stay out
    of this run).  Every term of every enabled plugin is added, each times its ``weight``.  A term
    may prepare the model in ``setup(run)`` (for example install attention capture) and undo it in
    ``teardown(run)``; its ``__call__(batch)`` is called once per training step.
    """


@hookspec
def bas_register_optimizers(register):
    """Register optimizers: ``register(name, factory)``; ``--optimizer NAME`` picks one.

    ``factory(param_groups, config)`` returns a ``torch.optim.Optimizer``.
    """


@hookspec
def bas_register_samplers(register):
    """Register concept samplers: ``register(name, factory)``; the default plugin's is used
    unless a plugin named with ``--plugin`` provides one.

    ``factory(config, num_concepts)`` returns a callable ``sample(rng) -> list[int]`` giving the
    concepts (in prompt order) that one training step shows.  ``rng`` is a seeded
    ``random.Random``.  With no sampler at all, every step shows all concepts.
    """


@hookspec
def bas_register_observers(register):
    """Register step and run observers: ``register(name, factory)``.

    ``factory(config)`` returns an object (or ``None``) with any of ``on_run_start(run)``,
    ``on_phase_start(run, phase)``, ``on_step(run, step)``, ``on_phase_end(run, phase)``,
    ``on_run_end(run)``.  Logging, progress bars, checkpoints and validation images are observers.
    ``step`` is a :class:`bas.core.components.StepRecord`.  An observer with
    ``on_images(run, phase, step, images)`` receives the validation samples that the ``report``
    plugin makes, ``{prompt: [PIL images, one per seed]}`` (the ``tensorboard`` plugin logs them).
    Observers run inside the step loop: keep ``on_step`` cheap.
    """


@hookspec
def bas_register_executors(register):
    """Register batch executors: ``register(name, factory)``; ``bas batch --executor NAME`` picks one.

    ``factory(config)`` gets the batch's :class:`bas.core.batch.tasks.BatchConfig` (``out``,
    ``workers``-style executor options in ``config.options``, ``device``) and returns an object
    with these methods, which the batch calls in this order and only from its own thread:

    - ``open(num_tasks)``: get ready to run up to ``num_tasks`` scenes (start worker processes
      or join a cluster).  Raise :class:`bas.core.errors.BasError` for what a user can fix (a
      library that is not installed, an address that cannot be reached).
    - ``submit(task)``: queue one :class:`bas.core.batch.tasks.SceneTask`.  The executor runs
      :func:`bas.core.batch.tasks.run_scene` ``(task, emit)`` for it somewhere (a process, a
      cluster node), where ``emit`` carries the task's events back.  A task is submitted again
      after its worker died, when retries are left.
    - ``poll(timeout)``: wait up to ``timeout`` seconds and return the events that arrived, a
      list of :class:`bas.core.batch.tasks.Started`, :class:`~bas.core.batch.tasks.Progress` and
      :class:`~bas.core.batch.tasks.Finished`.  Every submitted task ends with exactly one
      ``Finished``: the result ``run_scene`` returned, or, when the process running it died,
      one made with :func:`bas.core.batch.tasks.crashed`.
    - ``interrupt()``: Ctrl-C: ask running tasks to stop at a step boundary and save a
      checkpoint (they then finish as ``interrupted``), and drop queued ones.
    - ``close()``: stop everything the executor started.

    The batch itself decides which scenes to skip, resume or retry; an executor only runs tasks.
    Built-ins: ``local`` (worker processes on this machine) and ``ray`` (a Ray cluster).
    """


@hookspec
def bas_batch_options():
    """Return a list of ``click.Option`` objects to add to ``bas batch`` (and :func:`bas.batch`).

    Executors take their options this way (``--workers``, ``--ray-address``); the values reach
    the executor's factory in ``config.options[option.name]``.  An option of an executor other
    than the chosen one is refused unless it has its default value.
    """
