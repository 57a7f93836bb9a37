"""Run a batch: check every scene's options, decide per scene, hand the work to an executor,
follow it, and write the summary.

Per scene, from what its run folder ``<out>/<name>`` holds:

- a finished run (``run.json``) made with the same options: skipped, its files untouched;
- a finished run made with other options: reported (``other-options``), or run again with
  ``overwrite``;
- a finished run whose files do not agree with its ``run.json`` (:func:`bas.core.runs.read_run`):
  reported (``damaged``), or run again with ``overwrite``;
- an interrupted run (``checkpoint.complete_checkpoints``): resumed from its newest checkpoint
  (with ``overwrite``: started over);
- anything else (nothing, a failed attempt): run.

A scene whose process dies is submitted again up to ``retries`` times (resuming from its
checkpoint); a scene that fails with an error is recorded and the others go on.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import difflib
import json
import os
import socket
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import click

from bas.core.version import __version__
from bas.core import checkpoint, io
from bas.core.api import describe_model_settings, make_config, model_plugins, option_default, run_plugins
from bas.batches import summary as summary_io
from bas.batches.progress import BatchProgress
from bas.batches.scenes import LIST_SEPARATOR, SceneSpec, normalise_key, read_scenes
from bas.core.batch.tasks import BatchConfig, Finished, Progress, SceneTask, Started
from bas.core.errors import BasError
from bas.core.plugins import Plugins
from bas.core.training import Interrupted, RunConfig

# options a finished run may differ in from the same scene requested again, and still be the same run
IGNORED_OPTIONS = {"out", "resume", "overwrite", "quiet", "checkpoint_every", "model_defaults", "model_settings"}  # the values are compared
# RunConfig fields that the batch sets itself, never a manifest line
BATCH_FIELDS = {"out", "resume", "overwrite", "options", "plugins", "model_settings"}
CORE_ALIASES = {"init_token": "init_tokens"}
POLL_S = 0.5
GALLERY_EVERY_S = 10.0  # index.html is rewritten at most this often while scenes run (and at the end)
FINAL_STATUSES = ("done", "skipped", "failed", "other-options", "damaged", "interrupted", "not-started")
OK_STATUSES = ("done", "skipped")


@dataclass
class SceneState:
    spec: SceneSpec
    out: Path
    record: dict[str, Any]
    task: SceneTask | None = None  # None: nothing to run (skipped, other options)
    started: bool = False
    model_settings: str | None = None  # the line saying which of its model's recommended settings the scene takes


@dataclass
class OptionTable:
    """The options a scene may set: RunConfig's fields and its plugins' ``bas run`` options."""

    core: dict[str, Any]  # field name -> type hint
    plugin: dict[str, click.Option]
    aliases: dict[str, str] = field(default_factory=dict)  # --mask -> masks, init_token -> init_tokens

    @classmethod
    def of(cls, plugins: Plugins) -> "OptionTable":
        hints = typing.get_type_hints(RunConfig)
        core = {f.name: hints[f.name] for f in dataclasses.fields(RunConfig) if f.name not in BATCH_FIELDS}
        options = {opt.name: opt for _, opt in plugins.run_options()}
        aliases = dict(CORE_ALIASES)
        for opt in options.values():
            for spelling in opt.opts:
                aliases.setdefault(normalise_key(spelling), opt.name)
        return cls(core, options, aliases)

    def known(self) -> list[str]:
        return sorted(set(self.core) | set(self.plugin))

    def resolve(self, key: str, source: str) -> str:
        name = self.aliases.get(key, key)
        if name in self.core or name in self.plugin:
            return name
        if key in BATCH_FIELDS:
            raise BasError(f"{source}: \"{key}\" is set by the batch, not per scene; remove it from the line.")
        close = difflib.get_close_matches(key, self.known(), n=1)
        hint = f"did you mean \"{close[0]}\"?" if close else f"known options: {', '.join(self.known())}"
        raise BasError(f"{source}: unknown option \"{key}\"; {hint} (a plugin's options need the plugin in \"plugins\" or --plugin)")


def _base_type(hint) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is list:
        return list
    if args and origin is not None:
        return _base_type(args[0])
    return hint


TRUE, FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}


def convert_core(kind, value: Any, text: bool) -> Any:
    """A core option's value from JSON (typed) or CSV (text), checked against its type."""
    kind = _base_type(kind)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if text and value.lower() in TRUE | FALSE:
            return value.lower() in TRUE
        raise ValueError("must be true or false")
    if kind in (int, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or isinstance(value, int)):
            return kind(value)
        try:
            if text:
                return kind(value)
        except ValueError:
            pass
        raise ValueError("must be a whole number" if kind is int else "must be a number")
    if kind is list:
        if text:
            return [v.strip() for v in value.split(LIST_SEPARATOR) if v.strip()]
        if isinstance(value, str):
            return [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ValueError("must be a list of words")
    if isinstance(value, str):
        return value
    raise ValueError("must be text")


def _absolute(value: Any, base: Path) -> Any:
    if value is None or value == "":
        return value
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def convert_values(values: dict[str, Any], table: OptionTable, base: Path, source: str, text: bool) -> dict[str, Any]:
    """Option values with their names resolved, types checked and relative paths made absolute
    (relative to ``base``: the manifest's folder, or the current folder for the command line)."""
    ctx = click.Context(click.Command("bas"))
    converted: dict[str, Any] = {}
    for key, value in values.items():
        name = table.resolve(key, source)
        try:
            if name in table.core:
                value = convert_core(table.core[name], value, text) if value is not None else None
                if name == "image":
                    value = _absolute(value, base)
                elif name == "model" and isinstance(value, str) and not Path(value).is_absolute() and (base / value).exists():
                    value = str((base / value).resolve())  # a local folder; a hub id stays as it is
            else:
                opt = table.plugin[name]
                if opt.multiple:
                    if text:
                        value = [v.strip() for v in value.split(LIST_SEPARATOR) if v.strip()]
                    elif isinstance(value, (str, int, float)):
                        value = [value]
                value = opt.type_cast_value(ctx, value)
                if isinstance(opt.type, click.Path):
                    value = tuple(_absolute(v, base) for v in value) if opt.multiple else _absolute(value, base)
        except click.BadParameter as exc:
            raise BasError(f"{source}: \"{key}\": {exc.message.rstrip('.')}.") from None
        except (ValueError, TypeError) as exc:
            raise BasError(f"{source}: \"{key}\" {str(exc).rstrip('.')} (got {value!r}).") from None
        converted[name] = value
    return converted


def read_finished(run_out: Path) -> tuple[dict | None, str | None]:
    """The run.json of the finished run in ``run_out`` once its files agree with it (the checks of
    :func:`bas.core.runs.read_run`, checksums included), and ``None``; or ``None`` and what is wrong
    with the run (read_run's line without its fix)."""
    from bas.core.runs import read_run

    try:
        return read_run(run_out), None
    except (BasError, OSError) as exc:
        what = str(exc).rstrip(".")
        return None, what.rsplit("; ", 1)[0] if isinstance(exc, BasError) and "; " in what else what


def option_differences(done: dict, wanted: dict) -> list[tuple[str, Any, Any]]:
    """``(option, in the finished run, requested)`` for every option that would change the run."""
    def flat(config: dict) -> dict:
        config = json.loads(json.dumps(config, default=str))
        out = {k: v for k, v in config.items() if k not in IGNORED_OPTIONS and k != "options"}
        out.update({k: v for k, v in (config.get("options") or {}).items() if k not in IGNORED_OPTIONS})
        return out

    a, b = flat(done), flat(wanted)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


RECORD_ORDER = ("name", "source", "out", "status", "error", "attempt", "started", "finished", "seconds", "device", "gpu", "host", "pid",
                "resumed", "resumed_at", "files", "preview", "run_times", "warnings", "traceback")


def ordered(record: dict) -> dict:
    """A scene's record with its keys in reading order (the rest after them)."""
    return {**{k: record[k] for k in RECORD_ORDER if k in record}, **{k: v for k, v in record.items() if k not in RECORD_ORDER}}


def _iso(t: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else None


class BatchLock:
    """``<out>/.batch/lock``: one ``bas batch`` at a time per output folder (created exclusively;
    a lock left by a process of this machine that no longer runs is taken over)."""

    def __init__(self, out: Path):
        self.path = out / summary_io.BATCH_DIR / "lock"
        self.held = False

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _iso(time.time())}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    owner = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    owner = {}
                if owner.get("host") == me["host"] and isinstance(owner.get("pid"), int) and not _alive(owner["pid"]):
                    self.path.unlink(missing_ok=True)
                    continue
                raise BasError(f"{self.path.parent.parent} is being written by another bas batch (pid {owner.get('pid', '?')} on "
                               f"{owner.get('host', '?')}, since {owner.get('started', '?')}); wait for it to end, or delete {self.path} "
                               "if that process is gone.") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise BasError(f"Cannot create {self.path}; check that the folder is writable.")

    def __exit__(self, *exc):
        if self.held:
            self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def split_options(manager: Plugins, executor: str, options: dict[str, Any]) -> tuple[Any, dict, dict, dict]:
    """The chosen executor's registry entry, the executor options, the run options and the
    executor options that concern this executor (for the summary)."""
    batch_options = {opt.name: (plugin, opt) for plugin, opt in manager.batch_options()}
    executor_values = {name: option_default(opt) for name, (_, opt) in batch_options.items()}
    run_values = {}
    for key, value in options.items():
        if key in batch_options:
            executor_values[key] = value
        else:
            run_values[key] = value
    registry = manager.registry("executor")
    entry = registry.get(executor, "--executor")
    owners = {e.plugin: e.name for e in registry.entries.values()}
    for name, (plugin, opt) in batch_options.items():
        if plugin in owners and plugin != entry.plugin and executor_values[name] != option_default(opt):
            raise BasError(f"{opt.opts[0]} belongs to the '{owners[plugin]}' executor, but this batch runs on '{executor}'; "
                           f"drop {opt.opts[0]} or pass --executor {owners[plugin]}.")
    shown = {name: value for name, value in executor_values.items() if batch_options[name][0] == entry.plugin or batch_options[name][0] not in owners}
    return entry, executor_values, run_values, shown


class Batch:
    """One invocation of a batch: the scenes' states and the summary, written as they change."""

    def __init__(self, scenes: Iterable, out: Path, executor: str, plugin_names: list[str], overwrite: bool, retries: int,
                 quiet: bool, options: dict[str, Any]):
        if retries < 0:
            raise BasError(f"--retries must be 0 or more, not {retries}.")
        self.out = Path(out).expanduser().resolve()
        if self.out.exists() and not self.out.is_dir():
            raise BasError(f"--out {self.out} is a file; pass a folder for the batch's runs.")
        io.check_output_folder(self.out, "--out")  # below a file: refused before any scene runs
        summary_io.check_own_files(self.out)
        self.plugin_names = list(plugin_names)
        model = {k: options[k] for k in ("model", "model_defaults") if k in options}
        own = Plugins(self.plugin_names)
        self.manager = run_plugins(own, model, self.plugin_names)  # with the plugins --model recommends: their options are the batch's
        self.entry, self.executor_values, run_values, self.shown_options = split_options(self.manager, executor, options)
        self.executor_name, self.overwrite, self.retries, self.quiet = executor, overwrite, retries, quiet
        # each scene's model decides which plugins it turns on (plan), so the managers are keyed by every name they have on
        self.managers: dict[tuple[str, ...], Plugins] = {tuple(self.plugin_names): own, tuple(self.manager.names): self.manager}
        self.base_values = convert_values(run_values, OptionTable.of(self.manager), Path.cwd(), "the batch's options", text=False)
        make_config(self.manager, dict(self.base_values, out=self.out), self.plugin_names).check()  # option errors before any scene
        specs = read_scenes(scenes)
        self.previous = summary_io.read_previous(self.out)
        self.states = [self.plan(spec) for spec in specs]
        self.started_at = time.time()
        self.finished_at: float | None = None
        self.interrupted = False
        self.gallery_written = -GALLERY_EVERY_S

    # -- planning -------------------------------------------------------------------------------
    def scene_manager(self, names: list[str], source: str) -> Plugins:
        key = tuple(names)
        if key not in self.managers:
            try:
                self.managers[key] = Plugins(names)
            except BasError as exc:
                raise BasError(f"{source}: {exc}") from None
        return self.managers[key]

    def model_values(self, spec: SceneSpec, manager: Plugins) -> dict[str, Any]:
        """The scene's model and ``model_defaults``, over the batch's: what says which plugins its model turns on."""
        table = OptionTable.of(manager)
        own = {}
        for key, value in spec.values.items():
            with contextlib.suppress(BasError):  # another option (perhaps of a plugin the model turns on): read later
                if table.resolve(key, spec.source) in ("model", "model_defaults"):
                    own[key] = value
        values = dict(self.base_values)
        values.update(convert_values(own, table, spec.base, spec.source, spec.text))
        return values

    def plan(self, spec: SceneSpec) -> SceneState:
        names = self.plugin_names + [p for p in spec.plugins if p not in self.plugin_names]
        manager = self.scene_manager(names, spec.source)
        try:
            recommended = model_plugins(manager, self.model_values(spec, manager), names)
        except BasError as exc:
            raise BasError(f"{spec.source}: {exc}") from None
        if recommended:  # its options are the scene's to set too
            manager = self.scene_manager(names + recommended, spec.source)
        values = dict(self.base_values)
        values.update(convert_values(spec.values, OptionTable.of(manager), spec.base, spec.source, spec.text))
        if any(opt.name == "quiet" for _, opt in manager.run_options()):
            values["quiet"] = True  # the batch shows progress; a bar per scene would garble it
        run_out = self.out / spec.name
        try:
            config = make_config(manager, dict(values, out=run_out), names)
            config.check()
        except BasError as exc:
            raise BasError(f"{spec.source}: {exc}") from None
        record = {"name": spec.name, "source": spec.source, "out": spec.name, "status": "pending", "error": None}
        state = SceneState(spec, run_out, record, model_settings=describe_model_settings(config))
        run_json = run_out / "run.json"
        preview = self.out / summary_io.PREVIEW_DIR / f"{spec.name}.png"
        task = SceneTask(name=spec.name, out=str(run_out), values=values, plugins=names, preview=str(preview))
        if run_json.is_file():
            finished, damage = read_finished(run_out)
            if damage is not None:  # never skipped as done; replaced only with --overwrite, as a finished run always is
                if not self.overwrite:
                    record.update(status="damaged", error=f"{run_out} holds a damaged finished run ({damage}); restore its files, or delete the "
                                                          "folder or pass --overwrite to run the scene again.")
                    return state
                record["replaced"] = f"its earlier run was damaged ({damage})"
                task.overwrite = True
                state.task = task
                return state
            diffs = option_differences(finished.get("config") or {}, config.to_json())
            if not diffs:
                record.update(self.previous_record(spec.name, finished), status="skipped", error=None)
                return state
            key, old, new = diffs[0]
            more = f" and {len(diffs) - 1} more" if len(diffs) > 1 else ""
            if not self.overwrite:
                record.update(status="other-options", error=f"{run_out} holds a finished run made with other options ({key}: {old!r} there, "
                                                            f"{new!r} requested{more}); pass --overwrite to run it again with these options.")
                return state
            task.overwrite = True
        elif self.overwrite and checkpoint.complete_checkpoints(run_out):
            task.overwrite = True  # start over: the interrupted run may have other options
        state.task = task
        return state

    def previous_record(self, name: str, finished: dict) -> dict:
        """What the summary said of a skipped scene when it finished (or what its run.json says)."""
        old = self.previous.get(name)
        if old and old.get("status") in OK_STATUSES:
            return {k: v for k, v in old.items() if k not in ("name", "source", "out", "replaced")}
        times = finished.get("times") if isinstance(finished.get("times"), dict) else {}  # read_run checks the files, not the record's extras
        device = finished.get("device") if isinstance(finished.get("device"), str) else None
        return {"device": device, "seconds": times.get("total_s"), "files": list(finished["files"]) + ["run.json"], "run_times": times}

    # -- running --------------------------------------------------------------------------------
    def config(self) -> BatchConfig:
        device = str(self.base_values.get("device") or "auto")
        return BatchConfig(out=self.out, executor=self.executor_name, device=device, options=self.executor_values, quiet=self.quiet)

    def run(self) -> dict:
        to_run = [s for s in self.states if s.task is not None]
        executor = None
        if to_run:  # an executor that cannot start (Ray missing, an unreachable cluster) fails before anything is written
            executor = self.entry.factory(self.config())
            try:
                executor.open(len(to_run))
            except BaseException:
                executor.close()  # whatever it started before it failed (a Ray of its own)
                raise
        try:
            with BatchLock(self.out):
                self.write()
                try:
                    if executor is not None:
                        if not self.quiet:
                            said = collections.Counter(s.model_settings for s in to_run if s.model_settings)
                            for line, n in said.items():  # as bas run says it, once per batch, with how many scenes
                                click.echo(f"{n} of {len(to_run)} scene(s): {line}", err=True)
                        progress = BatchProgress(len(to_run), skipped=len(self.states) - len(to_run), quiet=self.quiet)
                        try:
                            self.follow(executor, to_run, progress)
                        finally:
                            progress.close()
                finally:
                    for state in to_run:
                        if state.record["status"] in ("pending", "running", "retrying"):
                            state.record.update(status="interrupted" if state.started else "not-started",
                                                error=state.record.get("error") or "The batch stopped before this scene finished; run it again to continue.")
                    self.finished_at = time.time()
                    summary = self.write()
        finally:
            if executor is not None:
                executor.close()
        if self.interrupted:
            stopped = [s.spec.name for s in to_run if s.record["status"] == "interrupted"]
            raise Interrupted(f"Interrupted; {len(stopped)} running scene(s) stopped at a step boundary with a checkpoint "
                              f"({', '.join(stopped[:5]) or 'none'}); run the same command again to continue. Summary: {self.out / summary_io.SUMMARY}")
        return summary

    def follow(self, executor, to_run: list[SceneState], progress: BatchProgress) -> None:
        by_name = {s.spec.name: s for s in to_run}
        outstanding = set(by_name)
        for state in to_run:
            executor.submit(state.task)
        try:
            while outstanding:
                self.handle(executor.poll(POLL_S), by_name, outstanding, executor, progress)
        except KeyboardInterrupt:
            self.interrupted = True
            progress.note("Stopping: running scenes save a checkpoint at their next step (Ctrl-C again to stop at once) ...")
            executor.interrupt()
            outstanding = {n for n in outstanding if by_name[n].started}
            try:
                while outstanding:
                    self.handle(executor.poll(POLL_S), by_name, outstanding, None, progress)
            except KeyboardInterrupt:
                pass

    def handle(self, events, by_name, outstanding: set, executor, progress: BatchProgress) -> None:
        changed = False
        for event in events:
            state = by_name.get(event.name)
            if state is None or event.name not in outstanding:
                continue  # progress that arrived after the scene finished
            record = state.record
            if isinstance(event, Started):
                state.started = True
                record.update(status="running", attempt=event.attempt, host=event.host, pid=event.pid, started=_iso(time.time()), error=None)
                progress.started(event.name, event.attempt)
                changed = True
            elif isinstance(event, Progress):
                if event.device and record.get("device") != event.device:
                    record["device"] = event.device
                progress.update(event.name, event.phase, event.step, event.total)
            elif isinstance(event, Finished):
                result = dict(event.result)
                task = state.task
                if result.get("crashed") and task.attempt <= self.retries and executor is not None:
                    task.attempt += 1
                    # resume from what the dead process saved (run_scene): a scene being run again over a damaged run or
                    # one of other options keeps --overwrite, so that a crash before any checkpoint starts over again
                    state.started = False  # queued again: after Ctrl-C it is not waited for
                    record.update(status="retrying", error=result["error"])
                    progress.note(f"{event.name}: {result['error']} Retrying ({task.attempt - 1} of {self.retries}).")
                    executor.submit(task)
                else:
                    result["started"], result["finished"] = _iso(result.get("started")) or record.get("started"), _iso(result.get("finished"))
                    record.update(result)
                    if record["status"] == "done" and state.task.preview and Path(state.task.preview).is_file():
                        record["preview"] = Path(state.task.preview).relative_to(self.out).as_posix()
                    outstanding.discard(event.name)
                    progress.finished(event.name, record["status"], record.get("error"), record.get("seconds"))
                changed = True
        if changed:
            self.write(gallery=False)

    # -- the summary ----------------------------------------------------------------------------
    def summary(self) -> dict:
        counts = {status: 0 for status in FINAL_STATUSES}
        for state in self.states:
            counts[state.record["status"]] = counts.get(state.record["status"], 0) + 1
        return {
            "bas_version": __version__,
            "out": str(self.out),
            "executor": self.executor_name,
            "executor_options": self.shown_options,
            "plugins": self.plugin_names,
            "overwrite": self.overwrite,
            "retries": self.retries,
            "started": _iso(self.started_at),
            "finished": _iso(self.finished_at),
            "seconds": round((self.finished_at or time.time()) - self.started_at, 3),
            "interrupted": self.interrupted,
            "counts": {k: v for k, v in counts.items() if v},
            "scenes": [ordered(s.record) for s in self.states],
        }

    def write(self, gallery: bool = True) -> dict:
        """batch.json now; index.html too when ``gallery`` or GALLERY_EVERY_S have passed (it
        looks into every scene's report folder, which on shared storage is not free)."""
        data = self.summary()
        now = time.monotonic()
        with_gallery = gallery or now - self.gallery_written >= GALLERY_EVERY_S
        summary_io.write_summary(self.out, data, gallery=with_gallery)
        if with_gallery:
            self.gallery_written = now
        return data


def run_batch(scenes: Iterable, out, *, executor: str = "local", plugins: Iterable[str] = (), overwrite: bool = False,
              retries: int = 1, quiet: bool = False, **options) -> dict:
    """Run every scene into ``out/<name>/`` and return the summary (what ``batch.json`` holds).

    ``scenes``: scene folders, manifests (``.jsonl``, ``.csv``) and dicts shaped like manifest
    lines.  ``options``: ``bas run``'s options with underscores (the same for every scene unless a
    manifest line sets its own) and the executor's (``workers=2``, ``ray_address="auto"``).
    Scenes that fail are in the summary with their error; problems with the batch itself (a
    manifest that does not parse, two scenes with one name, an unknown option) raise
    :class:`bas.core.errors.BasError` before anything runs.
    """
    return Batch(scenes, Path(out), executor, list(plugins), overwrite, retries, quiet, options).run()
