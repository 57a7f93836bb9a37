"""Many scenes in one command: ``bas batch`` and :func:`bas.batch`.

- :mod:`.scenes` reads scene folders and manifests (JSONL, CSV) into one spec per scene;
- :mod:`bas.core.batch.tasks` (in core: the executor plugins' contract) is what an executor runs
  per scene (:func:`~bas.core.batch.tasks.run_scene`) and the events it sends back;
- :mod:`.runner` decides per scene whether to run, resume, retry or skip it, hands the work to
  an executor (a plugin: ``local``, ``ray``, ...) and follows it;
- :mod:`.summary` writes ``batch.json`` and the ``index.html`` gallery;
- :mod:`.command` is the ``bas batch`` command.

Nothing here knows a particular executor, mask source or weight strategy.
"""
