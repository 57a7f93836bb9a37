"""The plugin system: loading, blocking, attribution of errors and clashes, plugin options."""

from __future__ import annotations

import inspect
import types
from pathlib import Path

import pytest

import bas
from bas.core import hookspecs, plugins as plugins_module
from bas.core.errors import BasError, PluginError
from bas.core.plugins import BUILTIN_PLUGINS, Plugins


def test_default_plugins_are_on_and_opt_in_ones_off():
    pm = Plugins()
    assert {n for n, (_, default) in BUILTIN_PLUGINS.items() if default} == set(pm.infos)
    assert "full" not in pm.infos and "prior-preservation" not in pm.infos
    assert pm.choose("weight strategy").name == "lora"
    assert pm.choose("mask source").name == "files"


def test_unknown_plugin_lists_the_available_ones():
    with pytest.raises(BasError) as exc:
        Plugins(["nope"])
    message = str(exc.value)
    assert "Unknown plugin 'nope'" in message
    for name in BUILTIN_PLUGINS:
        assert name in message


def test_named_plugin_beats_the_default_and_two_named_ones_clash():
    assert Plugins(["full"]).choose("weight strategy").name == "full"
    with pytest.raises(BasError, match="full and lora both provide a weight strategy"):
        Plugins(["full", "lora"]).choose("weight strategy")


def test_blocking_a_builtin_removes_what_it_registers():
    pm = Plugins(["no:attention-loss", "no:union-sampling"])
    assert "attention-loss" not in pm.infos
    assert set(pm.registry("loss term").entries) == {"diffusion"}
    assert pm.registry("sampler").entries == {}


class ClashingLoss:
    """Registers a loss under a built-in's name."""

    @bas.hookimpl
    def bas_register_loss_terms(self, register):
        register("diffusion", object)


class RaisingPlugin:
    @bas.hookimpl
    def bas_register_observers(self, register):
        raise ValueError("boom")


def test_a_name_registered_twice_names_both_plugins():
    pm = Plugins(extra=[("clasher", ClashingLoss())])
    with pytest.raises(PluginError) as exc:
        pm.registry("loss term")
    assert "'masked-loss'" in str(exc.value) and "'clasher'" in str(exc.value)


def test_an_exception_inside_a_hook_names_plugin_and_hook():
    pm = Plugins(extra=[("raiser", RaisingPlugin())])
    with pytest.raises(PluginError, match=r"Plugin 'raiser' raised in hook bas_register_observers: ValueError: boom"):
        pm.registry("observer")


def test_hook_without_spec_is_rejected():
    bad = types.SimpleNamespace()

    @bas.hookimpl
    def bas_no_such_hook():
        pass

    bad.bas_no_such_hook = bas_no_such_hook
    with pytest.raises(PluginError, match="'typo'"):
        Plugins(extra=[("typo", bad)])


def test_entry_point_that_fails_to_import_is_named(monkeypatch):
    class BrokenEntryPoint:
        name = "broken"
        value = "broken_pkg:plugin"
        dist = None

        def load(self):
            raise ImportError("No module named 'broken_pkg'")

    monkeypatch.setattr(plugins_module, "_entry_points", lambda: {"broken": BrokenEntryPoint()})
    with pytest.raises(PluginError, match=r"Error importing plugin 'broken': ImportError: No module named 'broken_pkg'"):
        Plugins(["broken"])
    assert "broken" not in Plugins().infos  # installed plugins are opt-in


def installed_sampler(monkeypatch, name: str, **attributes):
    """An installed plugin ``name`` (module ``{name}_sampler``, a sampler "first" that always shows concept 0),
    its module given ``attributes``."""
    module = types.ModuleType(f"{name}_sampler")
    module.__doc__ = "A sampler that always shows concept 0."
    for key, value in attributes.items():
        setattr(module, key, value)

    @bas.hookimpl
    def bas_register_samplers(register):
        register("first", lambda config, n: (lambda rng: [0]))

    module.bas_register_samplers = bas_register_samplers

    class EntryPoint:
        value, dist = f"{name}_sampler", None

        def load(self):
            return module

    EntryPoint.name = name
    monkeypatch.setattr(plugins_module, "_entry_points", lambda: {name: EntryPoint()})
    return module


def test_installed_plugin_is_loaded_by_name(monkeypatch):
    installed_sampler(monkeypatch, "fancy")
    pm = Plugins(["fancy"])
    assert pm.choose("sampler").name == "first"  # a named plugin wins over the default union sampler
    assert pm.infos["fancy"].explicit


def api_plugin(monkeypatch, api):
    """An installed plugin 'versioned' (a sampler) that declares ``BAS_PLUGIN_API = api``."""
    installed_sampler(monkeypatch, "versioned", BAS_PLUGIN_API=api)


def test_a_plugin_of_the_current_api_loads(monkeypatch):
    api_plugin(monkeypatch, hookspecs.PLUGIN_API)
    assert Plugins(["versioned"]).choose("sampler").name == "first"


@pytest.mark.parametrize("api", [hookspecs.PLUGIN_API + 1, 0, "1", True])
def test_a_plugin_of_another_api_is_skipped_with_a_warning_naming_both_apis(monkeypatch, invoke, api):
    api_plugin(monkeypatch, api)
    with pytest.warns(UserWarning, match=rf"plugin 'versioned' .* plugin API {api!r}, and this bas .* supports API {hookspecs.PLUGIN_API}; it is skipped"):
        pm = Plugins(["versioned"])
    assert "versioned" in pm.broken and "versioned" not in pm.infos
    assert pm.choose("sampler").name == "union"  # the run goes on with the default sampler
    with pytest.warns(UserWarning):
        result = invoke("plugins")
    assert result.exit_code == 0 and "versioned  [broken: plugin 'versioned'" in result.output


def test_plugin_options_show_in_run_help_only_when_the_plugin_is_on(invoke):
    plain = invoke("run", "--help").output
    with_prior = invoke("run", "--plugin", "prior-preservation", "--help").output
    assert "--class-prompt" not in plain
    assert "--class-prompt" in with_prior and "--num-class-images" in with_prior
    assert "--lora-rank" in plain  # a default plugin's options are always there


def test_plugins_command_lists_every_plugin_with_what_it_provides(invoke):
    out = invoke("plugins").output
    for name in BUILTIN_PLUGINS:
        assert f"{name}  [" in out
    assert "weight strategy 'full'" in out and "opt-in (--plugin full)" in out
    assert "optimizer 'adamw8bit'" in out


def test_every_hook_is_implemented_by_a_builtin_or_tested_and_documented():
    specs = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("bas_")]
    assert len(specs) >= 8
    guide = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()  # the author guide's hook table
    tests_text = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    pm = Plugins(all_installed=True)
    for name in specs:
        assert f"| `{name}(" in guide, f"{name} is not in the hook table of docs/plugins.md"
        implemented = bool(getattr(pm.pm.hook, name).get_hookimpls())
        assert implemented or name in tests_text.replace(f'"{name}"', ""), f"{name} has no implementation or test"


class ModelNamePlugin:
    """Maps the model name ``my-model`` to a folder, as the bas-mini plugin maps ``bas-mini``."""

    def __init__(self, folder):
        self.folder = folder

    @bas.hookimpl
    def bas_model_path(self, name):
        return self.folder if name == "my-model" else None


def test_a_model_name_is_found_through_the_plugins_as_bas_mini_is(tiny_model, scene, tmp_path):
    from bas.core.api import make_config
    from bas.core.model import resolve_model
    from bas.core.training import extract
    from bas.mini import model_path

    assert resolve_model("bas-mini", Plugins()) == str(model_path())
    assert resolve_model("bas-mini", Plugins(["no:bas-mini"])) == "bas-mini"  # no plugin knows it: a hub id
    assert resolve_model("some/hub-id", Plugins()) == "some/hub-id"
    pm = Plugins(extra=[("names", ModelNamePlugin(tiny_model))])
    assert resolve_model("my-model", pm) == str(tiny_model)
    values = {"scene": scene, "model": "my-model", "out": tmp_path / "out", "quiet": True, "phase1_steps": 1, "phase2_steps": 0}
    run = extract(make_config(pm, values, []), pm)
    assert run.info["model"] == "my-model" and run.info["family"] == "sd"


class RunFilePlugin:
    def __init__(self, claimed):
        self.claimed = claimed

    @bas.hookimpl
    def bas_write_run_files(self, run, out, info):
        (out / "notes.txt").write_text(f"{len(info['handles'])} handles")
        return self.claimed


@pytest.mark.parametrize("claimed, error", [(["notes.txt"], None), (["missing.txt"], "says it wrote missing.txt, but it is not there"),
                                            (["../outside.txt"], "which is not inside")])
def test_a_plugin_adds_files_to_a_finished_run(claimed, error, tiny_model, scene, tmp_path):
    from bas.core.api import make_config
    from bas.core.training import extract

    pm = Plugins(extra=[("notes", RunFilePlugin(claimed))])
    out = tmp_path / "out"
    values = {"scene": scene, "model": str(tiny_model), "out": out, "quiet": True, "phase1_steps": 1, "phase2_steps": 0}
    if error:
        with pytest.raises(BasError, match=f"Plugin 'notes' .*{error}"):
            extract(make_config(pm, values, []), pm)
        assert not out.exists()
        return
    info = extract(make_config(pm, values, []), pm).info
    assert (out / "notes.txt").read_text() == "2 handles" and "notes.txt" in info["files"] and "notes.txt" in info["checksums"]
    assert "README.md" in info["files"] and (out / "README.md").is_file()  # the built-in model-card plugin's


def test_without_the_model_card_plugin_a_run_has_no_card(tiny_model, scene, tmp_path):
    from bas.core.api import make_config
    from bas.core.training import extract

    pm = Plugins(["no:model-card"])
    out = tmp_path / "out"
    values = {"scene": scene, "model": str(tiny_model), "out": out, "quiet": True, "phase1_steps": 1, "phase2_steps": 0}
    info = extract(make_config(pm, values, ["no:model-card"]), pm).info
    assert (out / "handles.safetensors").is_file() and not (out / "README.md").exists() and not (out / "embeddings").exists()
    assert "README.md" not in info["files"]
