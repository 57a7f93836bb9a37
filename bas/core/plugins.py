"""Finding, loading and querying plugins.

Built-in plugins live in ``bas/plugins/`` and are registered exactly like installed ones (entry
point group ``bas``).  Default built-ins are on unless blocked with ``--plugin no:NAME``; opt-in
built-ins and installed plugins are turned on with ``--plugin NAME``.  A fresh manager is made per
run (and per test), never a module global.

An installed plugin that is not turned on is not even imported, except to list plugins and to
find a command that is not bas's own.  A plugin whose import or hook raises, or calls
``sys.exit``, is reported by name (:class:`PluginError`), never obeyed; where every plugin is
loaded (``tolerant=True``: ``bas plugins``, finding commands) it is set aside in
:attr:`Plugins.broken` and the others work.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import click
import pluggy

from bas.core import hookspecs
from bas.core.errors import BasError, PluginError
from bas.core.version import __version__

ENTRY_POINT_GROUP = "bas"

# name (as users type it) -> (module, on by default)
BUILTIN_PLUGINS: dict[str, tuple[str, bool]] = {
    "files": ("bas.plugins.files", True),
    "sam-masks": ("bas.plugins.sam_masks", False),
    "coco-masks": ("bas.plugins.coco_masks", False),
    "mask-cleanup": ("bas.plugins.mask_cleanup", True),
    "lora": ("bas.plugins.lora", True),
    "full": ("bas.plugins.full", False),
    "masked-loss": ("bas.plugins.masked_loss", True),
    "attention-loss": ("bas.plugins.attention_loss", True),
    "union-sampling": ("bas.plugins.union_sampling", True),
    "prior-preservation": ("bas.plugins.prior_preservation", False),
    "background-anchor": ("bas.plugins.background_anchor", False),
    "attention-contrast": ("bas.plugins.attention_contrast", False),
    "adamw": ("bas.plugins.adamw", True),
    "progress": ("bas.plugins.progress", True),
    "report": ("bas.plugins.report", True),
    "tensorboard": ("bas.plugins.tensorboard", False),
    "checkpoints": ("bas.plugins.checkpoints", True),
    "model-card": ("bas.plugins.model_card", True),
    "clip-prompt": ("bas.plugins.clip_prompt", True),
    "dino-identity": ("bas.plugins.dino_identity", True),
    "bas-mini": ("bas.plugins.bas_mini", True),
    "sd": ("bas.plugins.sd", True),
    "sdxl": ("bas.plugins.sdxl", True),
    "local-executor": ("bas.plugins.local_executor", True),
    "ray-executor": ("bas.plugins.ray_executor", True),
    "flux": ("bas.plugins.flux", True),
}

REGISTER_HOOKS = {
    "mask source": "bas_register_mask_sources",
    "weight strategy": "bas_register_weight_strategies",
    "loss term": "bas_register_loss_terms",
    "optimizer": "bas_register_optimizers",
    "sampler": "bas_register_samplers",
    "observer": "bas_register_observers",
    "evaluator": "bas_register_evaluators",
    "model family": "bas_register_model_families",
    "executor": "bas_register_executors",
}
TRAINING_KINDS = ("weight strategy", "loss term", "optimizer", "sampler", "observer", "model family")


@dataclass
class PluginInfo:
    name: str
    source: str  # "built-in" or "<distribution> <version>"
    version: str
    default: bool  # on without being named
    explicit: bool  # named with --plugin
    description: str = ""


@dataclass
class Entry:
    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    description: str = ""


@dataclass
class Registry:
    kind: str
    entries: dict[str, Entry] = field(default_factory=dict)

    def add(self, plugin: str, name: str, factory: Callable[..., Any], description: str = "") -> None:
        if name in self.entries:
            other = self.entries[name].plugin
            raise PluginError(
                f"{self.kind} '{name}' is registered by both plugin '{other}' and plugin '{plugin}'; "
                f"turn one of them off with --plugin no:{plugin}."
            )
        self.entries[name] = Entry(self.kind, name, factory, plugin, description)

    def get(self, name: str, option: str) -> Entry:
        if name not in self.entries:
            known = ", ".join(sorted(self.entries)) or "none"
            raise BasError(f"Unknown {self.kind} '{name}' for {option}; choose one of: {known}.")
        return self.entries[name]


class PerPlugin:
    """A hook argument made for each plugin that receives it: ``PerPlugin(lambda plugin: ...)``."""

    def __init__(self, make: Callable[[str], Any]):
        self.make = make


def describe_failure(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


def parse_plugin_names(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split ``--plugin`` values into (wanted, blocked); ``no:NAME`` blocks NAME."""
    wanted, blocked = [], []
    for raw in names:
        for name in str(raw).split(","):
            name = name.strip()
            if not name:
                continue
            if name.startswith("no:"):
                blocked.append(name[3:])
            elif name not in wanted:
                wanted.append(name)
    return wanted, blocked


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def shadowed_entry_points() -> list[str]:
    """Installed plugins named as a built-in one, which are therefore never loaded."""
    return sorted(f"{name} ({ep.value})" for name, ep in _entry_points().items() if name in BUILTIN_PLUGINS)


def installed_plugin_packages() -> dict[str, str]:
    """``{top-level package: plugin name}`` of the installed (not built-in) plugins: the package of
    each entry point (``mypkg.plugin:obj`` -> ``mypkg``), whose modules are the plugin's code."""
    found = {}
    for name, ep in _entry_points().items():
        top = str(ep.value).split(":", 1)[0].split(".", 1)[0]
        if name not in BUILTIN_PLUGINS and top and top != "bas":
            found.setdefault(top, name)
    return found


def available_plugin_names() -> list[str]:
    return sorted(set(BUILTIN_PLUGINS) | set(_entry_points()))


class Plugins:
    """A plugin manager for one run: the enabled plugins and the components they register."""

    def __init__(self, names: Iterable[str] = (), *, all_installed: bool = False, extra: Iterable[tuple[str, Any]] = (),
                 tolerant: bool = False):
        """``names``: the ``--plugin`` values.  ``all_installed`` loads every plugin (for listing).
        ``extra``: ``(name, plugin object)`` pairs registered as if named (tests, notebooks).
        ``tolerant``: a plugin that fails to load or raises in a hook is recorded in
        :attr:`broken` (name -> message) and left out, instead of stopping everything."""
        wanted, blocked = parse_plugin_names(names)
        extra = list(extra)
        self.names, self.extra = list(names), extra  # what it was made from, to make it again with more plugins on
        self.tolerant = tolerant
        self.broken: dict[str, str] = {}
        self.pm = pluggy.PluginManager("bas")
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        entry_points = _entry_points()
        known = set(BUILTIN_PLUGINS) | set(entry_points) | {n for n, _ in extra}
        for name in wanted + blocked:
            if name not in known:
                raise BasError(
                    f"Unknown plugin '{name}'; available plugins: {', '.join(sorted(known))} "
                    "(install a package that provides it to add more)."
                )
        for name in blocked:
            self.pm.set_blocked(name)

        for name, (module_name, default) in BUILTIN_PLUGINS.items():
            if name in blocked or not (default or name in wanted or all_installed):
                continue
            module = self._import(name, lambda m=module_name: importlib.import_module(m))
            if module is not None:
                self._register(name, module, "built-in", __version__, default, name in wanted)
        for name, ep in entry_points.items():
            if name in BUILTIN_PLUGINS or name in blocked or not (name in wanted or all_installed):
                continue  # a built-in's name always means the built-in (see shadowed_entry_points)
            obj = self._import(name, ep.load)
            if obj is None:
                continue
            dist = getattr(ep, "dist", None)
            version = dist.version if dist else "unknown"
            source = f"{dist.name} {version}" if dist else f"entry point {ep.value}"
            self._register(name, obj, source, version, False, name in wanted)
        for name, obj in extra:
            if name not in blocked:
                self._register(name, obj, "registered in code", "n/a", False, True)
        while True:
            try:
                self.pm.check_pending()
                break
            except pluggy.PluginValidationError as exc:
                name = self.pm.get_name(exc.plugin) if getattr(exc, "plugin", None) is not None else "?"
                error = PluginError(f"Plugin '{name}' implements a hook that bas does not have: {exc}")
                if not self.tolerant or name == "?":
                    raise error from exc
                self._set_aside(name, str(error))

    def _import(self, name: str, load: Callable[[], Any]) -> Any:
        try:
            return _import_plugin(name, load)
        except PluginError as exc:
            if not self.tolerant:
                raise
            self.broken[name] = str(exc)
            return None

    def _register(self, name, obj, source, version, default, explicit) -> None:
        incompatible = api_mismatch(name, obj, source)
        if incompatible:  # skipped, whatever the mode: the others work, and the user is told why
            warnings.warn(incompatible, stacklevel=2)
            self.broken[name] = incompatible
            return
        try:
            self.pm.register(obj, name=name)
        except pluggy.PluginValidationError as exc:
            error = PluginError(f"Plugin '{name}' is not a valid bas plugin: {exc}")
            if not self.tolerant:
                raise error from exc
            self._set_aside(name, str(error))
            return
        doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
        self.infos[name] = PluginInfo(name, source, version, default, explicit, doc[0] if doc else "")

    def _set_aside(self, name: str, message: str) -> None:
        self.broken[name] = message
        self.infos.pop(name, None)
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)

    # -- calling hooks with attribution ---------------------------------------------------------
    def call_each(self, hook_name: str, **kwargs) -> list[tuple[str, Any]]:
        """Call every implementation of a hook, returning ``(plugin name, result)`` pairs.

        A :class:`PerPlugin` argument is made for each plugin.  Exceptions (``sys.exit``
        included) are re-raised as :class:`PluginError` naming the plugin and the hook; with
        ``tolerant`` the plugin is set aside in :attr:`broken` instead.
        """
        results = []
        for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):
            plugin = self.pm.get_name(impl.plugin)
            if plugin in self.broken:
                continue
            args = {k: v.make(plugin) if isinstance(v, PerPlugin) else v for k, v in kwargs.items() if k in impl.argnames}
            try:
                results.append((plugin, impl.function(**args)))
            except KeyboardInterrupt:
                raise
            except BaseException as exc:
                if isinstance(exc, BasError) and not self.tolerant:
                    raise
                error = exc if isinstance(exc, BasError) else PluginError(f"Plugin '{plugin}' raised in hook {hook_name}: {describe_failure(exc)}")
                if not self.tolerant:
                    raise error from exc
                self._set_aside(plugin, str(error))
        return [(plugin, result) for plugin, result in results if plugin not in self.broken]

    def model_path(self, name: str) -> str | None:
        """The folder the first plugin that knows the model name ``name`` gives it (``bas_model_path``), or None."""
        for _plugin, folder in self.call_each("bas_model_path", name=name):
            if folder is not None:
                return str(folder)
        return None

    def model_settings(self, name: str) -> tuple[str | None, dict[str, Any]]:
        """The first plugin that knows the model name ``name`` and the ``bas run`` options it recommends for it
        (``bas_model_settings``), or ``(None, {})``."""
        for plugin, settings in self.call_each("bas_model_settings", name=name):
            if settings is not None:
                if not isinstance(settings, dict) or not all(isinstance(k, str) for k in settings):
                    raise PluginError(f"Plugin '{plugin}' returned {settings!r} from bas_model_settings; return a dict of option names.")
                return plugin, dict(settings)
        return None, {}

    def registry(self, kind: str) -> Registry:
        registry = Registry(kind)
        self.call_each(REGISTER_HOOKS[kind], register=PerPlugin(lambda plugin: (lambda name, factory, description="": registry.add(plugin, name, factory, description))))
        registry.entries = {name: e for name, e in registry.entries.items() if e.plugin not in self.broken}
        return registry

    def choose(self, kind: str) -> Entry:
        """The one component of ``kind`` to use: from a plugin named with --plugin, else a default."""
        entries = list(self.registry(kind).entries.values())
        explicit = [e for e in entries if self.infos[e.plugin].explicit]
        pool = explicit or [e for e in entries if self.infos[e.plugin].default]
        owners = sorted({e.plugin for e in pool})
        if len(owners) > 1:
            raise BasError(f"Plugins {' and '.join(owners)} both provide a {kind}; name only one of them with --plugin.")
        if not pool:
            raise BasError(f"No {kind} is enabled; turn one on with --plugin NAME (see `bas plugins`).")
        return pool[0]

    def run_options(self) -> list[tuple[str, Any]]:
        """``(plugin, click.Option)`` for every option the enabled plugins add to ``bas run``."""
        return [(plugin, opt) for plugin, opts in self.call_each("bas_run_options") for opt in (opts or [])]

    def batch_options(self) -> list[tuple[str, Any]]:
        """``(plugin, click.Option)`` for every option the enabled plugins add to ``bas batch``."""
        return [(plugin, opt) for plugin, opts in self.call_each("bas_batch_options") for opt in (opts or [])]

    def mask_options(self) -> list[tuple[str, Any]]:
        """The options ``bas masks`` takes: those of plugins that provide a mask source or nothing
        that training uses (mask cleanup), not those of weight strategies, losses, optimizers, ..."""
        training = {e.plugin for kind in TRAINING_KINDS for e in self.registry(kind).entries.values()}
        sources = {e.plugin for e in self.registry("mask source").entries.values()}
        return [(plugin, opt) for plugin, opt in self.run_options() if plugin in sources or plugin not in training]

    def versions(self) -> dict[str, str]:
        return {name: info.version for name, info in self.infos.items()}


def api_mismatch(name: str, obj: Any, source: str) -> str | None:
    """Why the plugin ``obj`` cannot be loaded by this bas (the plugin API it declares as
    ``BAS_PLUGIN_API`` is not one bas supports), or None."""
    declared = getattr(obj, "BAS_PLUGIN_API", None)
    if declared is None or (isinstance(declared, int) and not isinstance(declared, bool) and declared in hookspecs.SUPPORTED_PLUGIN_APIS):
        return None
    supported = ", ".join(map(str, sorted(hookspecs.SUPPORTED_PLUGIN_APIS)))
    return (f"plugin '{name}' ({source}) was written for bas plugin API {declared!r}, and this bas {__version__} "
            f"supports API {supported}; it is skipped: install a version of the plugin for API {hookspecs.PLUGIN_API}, "
            "or a bas that supports its API.")


def _import_plugin(name: str, load: Callable[[], Any]) -> Any:
    try:
        return load()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit included: importing a plugin must not end bas
        raise PluginError(f"Error importing plugin '{name}': {describe_failure(exc)}") from exc


def option_default(opt: click.Option) -> Any:
    """The value click would give an option that is not on the command line."""
    value = opt.get_default(click.Context(click.Command("bas")), call=True)
    if value is None or type(value).__name__ == "Sentinel":  # click 8.2+ marks "no default" with a sentinel
        return () if opt.multiple else (False if opt.is_flag else None)
    return opt.type_cast_value(click.Context(click.Command("bas")), value)
