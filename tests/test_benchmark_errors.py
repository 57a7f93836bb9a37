"""The benchmarks' command lines (benchmarks/): a user's error is one ``Error: ...`` line naming the fix, with a non-zero
exit, before any long work (the expensive function fails the test if it is reached), and nothing is written or changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bas.core.errors import BasError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import (  # noqa: E402
    attention_probe,
    attributes,
    batch,
    extract,
    fidelity,
    handle_drift,
    harness,
    lora_dtype,
    memory_plan,
    mini_decoder,
    report,
    tuning_rule,
)
from benchmarks.commandline import Command  # noqa: E402


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` and its file's checksum: what a refused command must leave as it was."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder" for p in sorted(root.rglob("*"))}


def error_line(result, code: int, start: str, fix: str) -> str:
    """The one ``Error:`` line of ``result``: exit status ``code``, no traceback, starting with ``start`` and ending with ``fix``."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    line = errors[0]
    assert line.startswith(f"Error: {start}"), line
    assert line.endswith(fix), line
    if code == 1:  # nothing but the line (click's usage errors come with the usage above it)
        assert result.output.strip().splitlines() == [line], result.output
    return line


def never(what: str):
    def fail(*args, **kwargs):
        pytest.fail(f"{what} was reached: the check must come before it")

    return fail


# -- the shared command class ------------------------------------------------------------------------
def test_a_known_failure_anywhere_in_a_command_is_one_error_line_and_a_bug_keeps_its_traceback():
    def refuse(ctx, param, value):
        if value == "callback":
            raise BasError("Refused in a callback; give another value.")
        return value

    @click.command(cls=Command)
    @click.option("--what", callback=refuse)
    def command(what):
        if what == "bas":
            raise BasError("Refused; give another value.")
        if what == "disk":
            raise OSError(28, "No space left on device", "/tmp/x")
        raise KeyError("a bug")

    runner = CliRunner()
    error_line(runner.invoke(command, ["--what", "callback"]), 1, "Refused in a callback", "give another value.")
    error_line(runner.invoke(command, ["--what", "bas"]), 1, "Refused;", "give another value.")
    assert "No space left on device" in error_line(runner.invoke(command, ["--what", "disk"]), 1, "", ".")
    bug = runner.invoke(command, ["--what", "bug"])
    assert isinstance(bug.exception, KeyError)


# -- tuning_rule -------------------------------------------------------------------------------------
TUNING = {"name": "tuning"}


@pytest.mark.parametrize(
    "content, says",
    [
        ({"stats": {"a": {}}, "scene_set": TUNING}, "the stats of 'a' have no mean of identity, composition, leakage, count"),
        ({"stats": {}, "scene_set": TUNING}, "its stats hold no setting"),
        ({"stats": {"a": [1]}, "scene_set": TUNING}, "the stats of 'a' are a list, not an object of metrics"),
        ({"stats": {"a": "high"}, "scene_set": TUNING}, "the stats of 'a' are a string, not an object of metrics"),
        ({"stats": {"a": {"identity": 3}}, "scene_set": TUNING}, "the stats of 'a' give identity as a number, not an object"),
        ({"stats": {"a": {"identity": {"value": [1]}}}, "scene_set": TUNING}, "the stats of 'a' give identity's mean as None, not a number"),
        (
            {"stats": {"a": {"identity": {"value": {"mean": "0.5"}}}}, "scene_set": TUNING},
            "the stats of 'a' give identity's mean as '0.5', not a number",
        ),
    ],
)
def test_the_tuning_rule_refuses_stats_of_the_wrong_shape_in_one_line(tmp_path, content, says):
    path = tmp_path / "result.json"
    path.write_text(json.dumps(content))
    result = CliRunner().invoke(tuning_rule.main, [str(path)])
    error_line(result, 1, f"{path} is not a result benchmarks.fidelity wrote ({says}); ", "give the JSON it wrote, as it wrote it.")


def test_the_tuning_rule_refuses_a_scene_set_that_is_not_a_record(tmp_path):
    path = tmp_path / "result.json"
    path.write_text(json.dumps({"stats": {}, "scene_set": "tuning"}))
    result = CliRunner().invoke(tuning_rule.main, [str(path)])
    error_line(result, 1, f"{path}'s scene_set is a string, not a record; ", "give the JSON benchmarks.fidelity wrote.")


# -- fidelity: result files, a table and its sweeps ----------------------------------------------------
def ablation(baseline, seed: int, shape=(3, 1, 2)) -> dict:
    rng = np.random.default_rng(seed)
    values = {m: rng.uniform(0, 1, shape).round(3).tolist() for m in fidelity.METRICS}
    return {"what": "", "plugins": [], "options": {}, "baseline": baseline, "values": values}


def family(folder: Path) -> tuple[Path, Path]:
    """A table (full and x) and a sweep of it (full and v), as small as the benchmark writes them (50 resamples)."""
    table, sweep = folder / "table.json", folder / "sweep.json"
    common = {"stats": {}, "scene_set": {"name": "tuning"}, "resamples": 50}
    table.write_text(json.dumps({**common, "ablations": {"full": ablation(None, 0), "x": ablation("full", 1)}}))
    sweep.write_text(json.dumps({**common, "ablations": {"full": ablation(None, 0), "v": ablation("full", 2)}, "belongs_to": "table.json"}))
    return table, sweep


def damage(which: str, change):
    def apply(table: Path, sweep: Path) -> Path:
        path = table if which == "table" else sweep
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
        return path

    return apply


DAMAGES = {
    "ablations a list": (damage("table", lambda d: d.update(ablations=[])), "its ablations are not an object of ablation records"),
    "an ablation a list": (damage("table", lambda d: d["ablations"].update(x=[1, 2])), "ablation 'x' is a list, not a record"),
    "values missing": (damage("sweep", lambda d: d["ablations"]["v"].pop("values")), "ablation 'v' has no values"),
    "values not numbers": (
        damage("table", lambda d: d["ablations"]["x"]["values"].update(identity=[[["a", "b"]]])),
        "ablation 'x''s identity values are not finite numbers of scenes x extraction seeds x generation seeds",
    ),
    "values flat": (
        damage("table", lambda d: d["ablations"]["x"]["values"].update(identity=[0.5, 0.5])),
        "ablation 'x''s identity values are not finite numbers of scenes x extraction seeds x generation seeds",
    ),
    "values unpaired": (
        damage("table", lambda d: d["ablations"]["x"].update(ablation("full", 1, shape=(2, 1, 2)))),
        "ablation 'x''s values do not pair with its baseline 'full''s (other metrics or other counts)",
    ),
    "a baseline not in the file": (
        damage("table", lambda d: d["ablations"]["x"].update(baseline="nosuch")),
        "ablation 'x''s baseline 'nosuch' is not in the file",
    ),
    "options a list": (
        damage("sweep", lambda d: d["ablations"]["v"].update(options=["a"])),
        "ablation 'v''s what, plugins or options are not text, a list and an object",
    ),
    "scene_set a string": (damage("sweep", lambda d: d.update(scene_set="tuning")), "its scene_set is not a record with a name"),
    "belongs_to a number": (damage("sweep", lambda d: d.update(belongs_to=5)), "its belongs_to 5 is not a file name"),
    "stats a list": (damage("table", lambda d: d.update(stats=[])), "it has no stats object"),
    "resamples text": (damage("table", lambda d: d.update(resamples="many")), "its resamples 'many' is not a positive whole number"),
}


@pytest.mark.parametrize("case", list(DAMAGES))
def test_holm_over_refuses_a_damaged_table_or_sweep_in_one_line_and_writes_nothing(tmp_path, case):
    table, sweep = family(tmp_path)
    apply, says = DAMAGES[case]
    damaged = apply(table, sweep)
    before = snapshot(tmp_path)
    result = CliRunner().invoke(fidelity.main, ["--holm-over", str(table), str(sweep)])
    error_line(
        result, 1, f"{damaged.resolve()} is not a result of benchmarks/fidelity.py ({says}); ", "give the JSON files it wrote, as it wrote them."
    )
    assert snapshot(tmp_path) == before


def test_holm_over_refuses_a_file_that_holds_a_list(tmp_path):
    table, sweep = family(tmp_path)
    sweep.write_text("[1, 2]")
    before = snapshot(tmp_path)
    result = CliRunner().invoke(fidelity.main, ["--holm-over", str(table), str(sweep)])
    error_line(result, 1, f"{sweep.resolve()} is not a result of benchmarks/fidelity.py (it holds a list, not an object); ", "as it wrote them.")
    assert snapshot(tmp_path) == before


def test_a_file_beside_the_table_whose_belongs_to_names_nothing_is_no_sweep_of_it(tmp_path):
    table, sweep = family(tmp_path)
    (tmp_path / "number.json").write_text(json.dumps({"belongs_to": 5}))
    (tmp_path / "nul.json").write_text(json.dumps({"belongs_to": "table\u0000.json"}))
    (tmp_path / "empty.json").write_text(json.dumps({"belongs_to": ""}))
    (tmp_path / "list.json").write_text(json.dumps({"belongs_to": ["table.json"]}))
    assert fidelity.sweeps_of(table) == [sweep.resolve()]
    result = CliRunner().invoke(fidelity.main, ["--holm-over", str(table), str(sweep)])
    assert result.exit_code == 0, result.output
    assert "One family of 16 claims over 2 files." in result.output
    assert json.loads(sweep.read_text())["holm_family"] == {"files": ["table.json", "sweep.json"], "size": 16}


def test_every_result_and_operating_point_in_the_repository_passes_the_checks():
    results = [p for p in sorted((ROOT / "benchmarks" / "results").glob("fidelity*.json")) if "stats" in json.loads(p.read_text())]
    assert len(results) >= 10
    for path in results:
        fidelity.load_result(path)
        if fidelity.scene_set_name_of(json.loads(path.read_text())) == "tuning":
            assert tuning_rule.stats_problem(json.loads(path.read_text())["stats"]) is None
    for path in sorted((ROOT / "benchmarks").glob("operating-point*.json")):
        fidelity.load_operating_point(path)
    assert report.all_rows()  # the speed results render


# -- fidelity: the operating point ---------------------------------------------------------------------
GOOD_SETTINGS = {"steps": [100, 100], "learning_rates": {"phase1_lr": 0.002}, "attention_res": None, "options": {}}


@pytest.mark.parametrize(
    "settings, says",
    [
        ({}, "its settings have no steps, learning_rates, attention_res, options"),
        ("fast", "its settings are a string, not an object"),
        ({**GOOD_SETTINGS, "learning_rates": [0.002]}, "its settings' learning_rates [0.002] are not an object of phase1_lr, phase2_lr, "),
        ({**GOOD_SETTINGS, "learning_rates": {"phase1_lr": "fast"}}, "its settings' learning_rates {'phase1_lr': 'fast'} are not an object"),
        ({**GOOD_SETTINGS, "steps": []}, "its settings' steps [] are not [phase-1 steps, phase-2 steps]"),
        ({**GOOD_SETTINGS, "steps": [100, "100"]}, "its settings' steps [100, '100'] are not [phase-1 steps, phase-2 steps]"),
        ({**GOOD_SETTINGS, "attention_res": "16"}, "its settings' attention_res '16' is neither null nor a whole number"),
        ({**GOOD_SETTINGS, "options": []}, "its settings' options [] are not an object of bas run options"),
        ({**GOOD_SETTINGS, "plugins": "background-anchor"}, "its settings' plugins 'background-anchor' are not a list of plugin names"),
    ],
)
def test_the_test_scenes_refuse_an_operating_point_with_settings_of_the_wrong_shape_in_one_line(tmp_path, monkeypatch, settings, says):
    point = tmp_path / "point.json"
    point.write_text(json.dumps({"chosen": "2026-12-07T00:00:00+00:00", "settings": settings, "test_seed": 3, "test_scenes": 12}))
    monkeypatch.setattr(fidelity, "run_benchmark", never("the benchmark"))
    before = snapshot(tmp_path)
    args = ["--scenes", "test", "--operating-point", str(point), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out.json")]
    result = CliRunner().invoke(fidelity.main, args)
    error_line(result, 1, f"{point} is not an operating point written by --choose-operating-point ({says}", "; write it again.")
    assert snapshot(tmp_path) == before
    with pytest.raises(click.ClickException, match="is not an operating point written by --choose-operating-point"):
        fidelity.scene_set("test", point)  # every reader of the point, not only the command line


def test_choosing_the_operating_point_refuses_a_tuning_result_whose_scene_set_is_not_a_record(tmp_path):
    tuning = tmp_path / "tuning.json"
    tuning.write_text(json.dumps({"ablations": {"full": ablation(None, 0)}, "stats": {}, "scene_set": "tuning"}))
    before = snapshot(tmp_path)
    result = CliRunner().invoke(fidelity.main, ["--choose-operating-point", str(tuning), "--operating-point", str(tmp_path / "point.json")])
    error_line(result, 1, f"{tuning} is not a result of benchmarks/fidelity.py (its scene_set is not a record with a name); ", "as it wrote them.")
    assert snapshot(tmp_path) == before


# -- fidelity --belongs-to: what would refuse the sweep after its runs is refused before them -------------
def belongs_to_case(tmp_path: Path, case: str) -> tuple[str, str]:
    table, sweep = family(tmp_path)
    if case == "other scenes":
        return "v2", "--belongs-to table.json ran on the tuning scenes, this run on the v2 scenes; a sweep belongs to a table of its own scenes"
    if case == "damaged sibling":
        damage("sweep", lambda d: d["ablations"].update(v=[]))(table, sweep)
        return "tuning", f"{sweep.resolve()} is not a result of benchmarks/fidelity.py (ablation 'v' is a list, not a record)"
    damage("sweep", lambda d: d.update(scene_set={"name": "v2"}))(table, sweep)
    return "tuning", "the files ran on different scene sets (table.json: tuning, sweep.json: v2)"


@pytest.mark.parametrize("case", ["other scenes", "damaged sibling", "sibling of other scenes"])
def test_a_sweep_its_table_would_refuse_after_the_runs_is_refused_before_them(tmp_path, monkeypatch, case):
    scene_set_name, says = belongs_to_case(tmp_path, case)
    monkeypatch.setattr(fidelity, "run_extractions", never("a run"))
    monkeypatch.setattr(fidelity, "write_scene", never("a scene written to --work"))
    before = snapshot(tmp_path)
    scene = "purple-orange" if scene_set_name == "v2" else "tuning-01-box"
    with pytest.raises(click.ClickException) as caught:
        fidelity.run_benchmark(
            tmp_path / "new-sweep.json",
            scene_set_name=scene_set_name,
            scenes=[scene],
            variants=[fidelity.parse_variant("w:x=1")],
            table=tmp_path / "table.json",
            work=tmp_path / "work",
            steps=(2, 2),
            extraction_seeds=[0],
            seeds=[0],
            log=lambda m: None,
        )
    assert caught.value.message.startswith(says), caught.value.message
    assert snapshot(tmp_path) == before


def test_a_sweep_of_its_own_scenes_joining_a_whole_family_goes_on_to_its_runs(tmp_path, monkeypatch):
    table, sweep = family(tmp_path)
    again = tmp_path / "again.json"  # this sweep, run before: it is written again, so it need not be given
    again.write_text(sweep.read_text())

    class Reached(Exception):
        pass

    def reached(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(fidelity, "write_scene", reached)
    with pytest.raises(Reached):
        fidelity.run_benchmark(
            again,
            scene_set_name="tuning",
            scenes=["tuning-01-box"],
            variants=[fidelity.parse_variant("w:x=1")],
            table=table,
            work=tmp_path / "work",
            steps=(2, 2),
            extraction_seeds=[0],
            seeds=[0],
            log=lambda m: None,
        )


# -- report ----------------------------------------------------------------------------------------------
README_TEXT = "# Benchmarks\n\n<!-- results:start -->\nold\n<!-- results:end -->\n\nafter\n"


@pytest.fixture
def report_files(tmp_path, monkeypatch):
    results, readme = tmp_path / "results", tmp_path / "README.md"
    results.mkdir()
    (results / "cpu.json").write_text((ROOT / "benchmarks" / "results" / "cpu-2026-11-26.json").read_text())
    (results / "fidelity.json").write_text(json.dumps({"ablations": {}, "stats": {}}))  # no rows: not a speed result
    readme.write_text(README_TEXT)
    monkeypatch.setattr(report, "RESULTS_DIR", results)
    monkeypatch.setattr(report, "README", readme)
    return results, readme


def test_the_report_rewrites_only_the_section_between_its_markers(report_files):
    results, readme = report_files
    result = CliRunner().invoke(report.main, [])
    assert result.exit_code == 0, result.output
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\n<!-- results:start -->\n### sdxl-small at 256 px") and text.endswith("<!-- results:end -->\n\nafter\n")
    printed = CliRunner().invoke(report.main, ["--print"])
    assert printed.exit_code == 0 and printed.output.startswith("### sdxl-small") and readme.read_text() == text


@pytest.mark.parametrize(
    "args, says, names",
    [(["--bogus"], "No such option", "--bogus"), (["--prnt"], "No such option", "--print"), (["print"], "Got unexpected extra argument", "print")],
)
def test_the_report_refuses_an_argument_it_does_not_take_and_leaves_the_readme_alone(report_files, args, says, names):
    results, readme = report_files
    before = snapshot(readme.parent)
    result = CliRunner().invoke(report.main, args)
    assert names in error_line(result, 2, says, "")  # click's own words (they differ a little between its versions)
    assert snapshot(readme.parent) == before
    assert CliRunner().invoke(report.main, ["--help"]).exit_code == 0 and snapshot(readme.parent) == before


ROW = json.loads((ROOT / "benchmarks" / "results" / "cpu-2026-11-26.json").read_text())["rows"][0]


@pytest.mark.parametrize(
    "content, says",
    [
        ('{"rows": [', "is not a readable results file (Expecting value: line 1 column 11 (char 10)); "),
        ("[1, 2]", "is not a results file of benchmarks/extract.py (it is not an object with a list of rows); "),
        ('{"rows": {}}', "is not a results file of benchmarks/extract.py (it is not an object with a list of rows); "),
        ('{"rows": [{}]}', "is not a results file of benchmarks/extract.py (row 1 has no command, date, device, "),
        ('{"rows": [3]}', "is not a results file of benchmarks/extract.py (row 1 is a number, not an object); "),
        (json.dumps({"rows": [{**ROW, "arch": "sd9"}]}), "is not a results file of benchmarks/extract.py (row 1's arch 'sd9' is not one of tiny, "),
        (
            json.dumps({"rows": [{**ROW, "configs": {"bas": {}}}]}),
            "is not a results file of benchmarks/extract.py (row 1 does not render: KeyError: ",
        ),
    ],
)
def test_the_report_refuses_a_damaged_results_file_in_one_line_and_leaves_the_readme_alone(report_files, content, says):
    results, readme = report_files
    (results / "damaged.json").write_text(content)
    before = snapshot(readme.parent)
    result = CliRunner().invoke(report.main, [])
    error_line(result, 1, f"{results / 'damaged.json'} {says}", f"or move it out of {results}.")
    assert snapshot(readme.parent) == before


@pytest.mark.parametrize("text", ["# no markers\n", "<!-- results:end -->\n<!-- results:start -->\n", "<!-- results:start -->\n" * 2])
def test_the_report_refuses_a_readme_without_its_markers_in_one_line(report_files, text):
    results, readme = report_files
    readme.write_text(text)
    before = snapshot(readme.parent)
    result = CliRunner().invoke(report.main, [])
    error_line(result, 1, f"{readme} does not hold the markers <!-- results:start --> and <!-- results:end --> once each", "shows where they were).")
    assert snapshot(readme.parent) == before


# -- attributes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content, says",
    [
        ("{", "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
        ("[]", "it has no list of images"),
        ('{"images": [{"prompt": "a photo of <asset0>"}]}', "an image is not a prompt, a seed and scores"),
        (
            '{"images": [{"prompt": "a photo of <asset0>", "seed": 0, "scores": {"identity": "high"}}]}',
            "the scores of 'a photo of <asset0>' are not all numbers",
        ),
    ],
)
def test_attributes_refuses_a_damaged_kept_score_file_in_one_line(tmp_path, monkeypatch, content, says):
    scores = tmp_path / "kept" / "scores"
    scores.mkdir(parents=True)
    name = next(iter(fidelity.scene_set("tuning")[0]))
    (scores / f"{name}--full--e0.json").write_text(content)
    monkeypatch.setattr(attributes, "base_prior", never("the base model's samples"))
    before = snapshot(tmp_path)
    args = ["--keep", str(tmp_path / "kept"), "--scenes", "tuning", "--prior-seeds", "2", "--out", str(tmp_path / "out.json")]
    result = CliRunner().invoke(attributes.main, args)
    path = scores / f"{name}--full--e0.json"
    error_line(result, 1, f"{path} is not a kept score file ({says}); ", "remove it and the benchmark makes it again.")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "out, says",
    [
        ("taken", "--out {tmp}/taken is a folder; pass the path of the file to write."),
        ("afile/out.json", "The folder of --out {tmp}/afile is a file; pass a folder path."),
        ("afile/sub/out.json", "The folder of --out {tmp}/afile/sub is below {tmp}/afile, which is a file; pass a folder path."),
    ],
)
def test_attributes_refuses_an_out_it_could_only_fail_to_write_before_any_work(tmp_path, monkeypatch, out, says):
    (tmp_path / "kept" / "scores").mkdir(parents=True)
    (tmp_path / "taken").mkdir()
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(attributes, "read_samples", never("reading the kept scores"))
    monkeypatch.setattr(attributes, "base_prior", never("the base model's samples"))
    before = snapshot(tmp_path)
    result = CliRunner().invoke(attributes.main, ["--keep", str(tmp_path / "kept"), "--scenes", "tuning", "--out", str(tmp_path / out)])
    line = says.format(tmp=tmp_path)
    error_line(result, 1, line, line[-20:])
    assert snapshot(tmp_path) == before


def test_attributes_refuses_a_negative_prior_seed_count(tmp_path, monkeypatch):
    (tmp_path / "kept").mkdir()
    monkeypatch.setattr(attributes, "read_samples", never("reading the kept scores"))
    result = CliRunner().invoke(attributes.main, ["--keep", str(tmp_path / "kept"), "--prior-seeds", "-1"])
    error_line(result, 2, "Invalid value for '--prior-seeds': -1 is not in the range x>=0.", "x>=0.")


# -- memory_plan -----------------------------------------------------------------------------------------
MEMORY_CASES = [
    (["--check", "--arch", "nosuch"], 2, "Invalid value for '--arch': 'nosuch' is not one of 'flux', ", "'tiny'."),
    (["--check", "--quantize", "bogus"], 2, "Invalid value for '--quantize': 'bogus' is not one of 'none', 'nf4', 'int8'.", "'int8'."),
    (["--check", "--device", "cdua"], 1, "Unknown --device 'cdua'; ", "use auto, cpu, cuda, cuda:N or mps."),
    (["--check", "--device", "cpu", "--optimizer", "bogus"], 1, "Unknown optimizer 'bogus' for --optimizer; ", "choose one of: adamw, adamw8bit."),
    ([], 2, "give one of --check and --table.", "--table."),
    (["--check", "--table"], 2, "give one of --check and --table.", "--table."),
]
if not torch.cuda.is_available():
    MEMORY_CASES.append((["--check", "--device", "cuda"], 1, "--device cuda was asked for but no CUDA GPU is visible; ", "use --device cpu."))


@pytest.mark.parametrize("args, code, start, fix", MEMORY_CASES)
def test_the_memory_plan_refuses_a_bad_option_in_one_line_before_building_a_model(monkeypatch, args, code, start, fix):
    from benchmarks import presets

    monkeypatch.setattr(presets, "materialize", never("building the preset"))
    monkeypatch.setattr(memory_plan, "make_plan", never("the plan"))
    error_line(CliRunner().invoke(memory_plan.main, args), code, start, fix)


# -- extract ---------------------------------------------------------------------------------------------
EXTRACT_CASES = {
    "cache-dir a file": (["--cache-dir", "{tmp}/afile"], "--cache-dir {tmp}/afile is a file; ", "pass a folder path."),
    "cache-dir below a file": (
        ["--cache-dir", "{tmp}/afile/cache"],
        "--cache-dir {tmp}/afile/cache is below {tmp}/afile, which is a file; ",
        "folder path.",
    ),
    "out truncated": (["--out", "{tmp}/truncated.json"], "--out {tmp}/truncated.json is not a readable results file (Expecting ", "wrote there."),
    "out a list": (
        ["--out", "{tmp}/list.json"],
        "--out {tmp}/list.json is not a results file of benchmarks/extract.py (no list of rows",
        "wrote there.",
    ),
    "out without rows": (["--out", "{tmp}/norows.json"], "--out {tmp}/norows.json is not a results file of benchmarks/extract.py ", "wrote there."),
    "out rows without command": (["--out", "{tmp}/nocommand.json"], "--out {tmp}/nocommand.json is not a results file of ", "wrote there."),
    "out a folder": (["--out", "{tmp}/taken"], "--out {tmp}/taken is a folder; ", "pass the path of the file to write."),
    "out below a file": (["--out", "{tmp}/afile/out.json"], "The folder of --out {tmp}/afile is a file; ", "pass a folder path."),
}


@pytest.mark.parametrize("case", list(EXTRACT_CASES))
def test_extract_refuses_an_out_or_cache_dir_it_could_only_fail_on_after_measuring(tmp_path, monkeypatch, case):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "taken").mkdir()
    (tmp_path / "truncated.json").write_text('{"rows": [')
    (tmp_path / "list.json").write_text("[]")
    (tmp_path / "norows.json").write_text("{}")
    (tmp_path / "nocommand.json").write_text('{"rows": [{}]}')
    monkeypatch.setattr(extract, "materialize", never("building the preset"))
    monkeypatch.setattr(extract, "run_worker", never("a measurement"))
    args, start, fix = EXTRACT_CASES[case]
    args = [a.format(tmp=tmp_path) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "new.json")]
    before = snapshot(tmp_path)
    error_line(CliRunner().invoke(extract.main, ["--device", "cpu", *args]), 1, start.format(tmp=tmp_path), fix)
    assert snapshot(tmp_path) == before


# -- harness (the worker) ----------------------------------------------------------------------------------
def good_spec(tmp_path: Path) -> dict:
    return dict(
        model="m",
        resolution=64,
        warmup=1,
        timed=1,
        seed=0,
        device="cpu",
        num_class_images=1,
        threads=None,
        plugins=[],
        variant=asdict(harness.Variant()),
        workdir=str(tmp_path / "work"),
    )


@pytest.mark.parametrize(
    "content, says",
    [
        ('{"variant": ', "Expecting value: line 1 column 13 (char 12)"),
        ("[]", "it holds a list, not an object"),
        ("{}", "no variant, workdir, model, resolution, warmup, timed, seed, device of the right kind"),
        ("bad variant", "its variant has unknown settings speed"),
        ("no class images", "no num_class_images for its prior preservation"),
    ],
)
def test_the_harness_refuses_a_spec_it_cannot_measure_in_one_line(tmp_path, monkeypatch, content, says):
    spec = tmp_path / "spec.json"
    if content == "bad variant":
        content = json.dumps({**good_spec(tmp_path), "variant": {"speed": 2}})
    elif content == "no class images":
        content = json.dumps({k: v for k, v in good_spec(tmp_path).items() if k != "num_class_images"})
    spec.write_text(content)
    monkeypatch.setattr(harness, "measure", never("the measurement"))
    before = snapshot(tmp_path)
    result = CliRunner().invoke(harness.main, [str(spec), str(tmp_path / "out.json")])
    error_line(result, 1, f"{spec} is not a measurement spec ({says}); ", "writes one per configuration and runs this on it.")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "args, code, start, fix",
    [
        ([], 2, "Missing argument 'SPEC'.", "'SPEC'."),
        (["{tmp}/none.json", "{tmp}/out.json"], 2, "Invalid value for 'SPEC': ", "none.json' does not exist."),
    ],
)
def test_the_harness_takes_a_spec_and_an_out_or_says_so(tmp_path, monkeypatch, args, code, start, fix):
    monkeypatch.setattr(harness, "measure", never("the measurement"))
    error_line(CliRunner().invoke(harness.main, [a.format(tmp=tmp_path) for a in args]), code, start, fix)
    helped = CliRunner().invoke(harness.main, ["--help"])
    assert helped.exit_code == 0 and "SPEC" in helped.output and not any(tmp_path.iterdir())


def test_the_harness_refuses_an_out_it_could_only_fail_to_write_and_writes_a_result_whole(tmp_path, monkeypatch):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(good_spec(tmp_path)))
    (tmp_path / "taken").mkdir()
    monkeypatch.setattr(harness, "measure", never("the measurement"))
    error_line(CliRunner().invoke(harness.main, [str(spec), str(tmp_path / "taken")]), 1, f"OUT {tmp_path}/taken is a folder; ", "file to write.")
    monkeypatch.setattr(harness, "measure", lambda spec: {"measured": spec["resolution"]})
    result = CliRunner().invoke(harness.main, [str(spec), str(tmp_path / "out.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out.json").read_text()) == {"measured": 64}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "spec.json", "taken"]  # no temporary left beside it


def test_the_spec_extract_writes_is_one_the_harness_measures(tmp_path, monkeypatch):
    """What run_worker writes passes the harness's checks; its result is read back once the worker wrote it."""
    seen = []

    def worker(command, **kwargs):
        spec, out = Path(command[-2]), Path(command[-1])
        seen.append(harness.load_spec(spec))
        out.write_text(json.dumps({"measured": True}))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(extract.subprocess, "run", worker)
    spec = dict(model="m", resolution=128, warmup=1, timed=2, seed=0, device="cpu", num_class_images=4, threads=None, plugins=["no:report"])
    assert extract.run_worker(dict(spec, variant=asdict(harness.REFERENCE_STYLE)), tmp_path / "w") == {"measured": True}
    assert seen[0]["variant"] == asdict(harness.REFERENCE_STYLE) and seen[0]["workdir"] == str(tmp_path / "w")


# -- batch -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, start",
    [
        (["--repeats", "0"], "Invalid value for '--repeats': 0 is not in the range x>=1."),
        (["--scenes", "0"], "Invalid value for '--scenes': 0 is not in the range x>=1."),
        (["--scenes", "-2"], "Invalid value for '--scenes': -2 is not in the range x>=1."),
        (["--steps", "0"], "Invalid value for '--steps': 0 is not in the range x>=1."),
        (["--config", "ray-3"], "Invalid value for '--config': 'ray-3' is not one of 'loop', 'local-1', 'local-2', 'ray-1', 'ray-2'."),
    ],
)
def test_the_batch_benchmark_refuses_counts_below_one_and_configurations_it_has_not(tmp_path, monkeypatch, args, start):
    monkeypatch.setattr(batch, "prepare", never("the benchmark"))
    error_line(CliRunner().invoke(batch.main, [*args, "--out", str(tmp_path / "out.json")]), 2, start, start[-8:])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "out, says",
    [
        ("taken", "--out {tmp}/taken is a folder; pass the path of the file to write."),
        ("afile/o.json", "The folder of --out {tmp}/afile is a file; pass a folder path."),
    ],
)
def test_the_batch_benchmark_checks_its_out_before_the_runs_and_writes_it_whole(tmp_path, monkeypatch, out, says):
    (tmp_path / "taken").mkdir()
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(batch, "prepare", never("the benchmark"))
    before = snapshot(tmp_path)
    line = says.format(tmp=tmp_path)
    error_line(CliRunner().invoke(batch.main, ["--out", str(tmp_path / out)]), 1, line, line[-12:])
    assert snapshot(tmp_path) == before
    # the runs made up: the file is written once, whole
    monkeypatch.setattr(batch, "prepare", lambda work, scenes: (work / "model", [work / f"s{i}" for i in range(scenes)]))
    row = {
        "concurrency": 1,
        "wall_s": 2.0,
        "scenes_per_min": 60.0,
        "run_s_sum": 1.0,
        "run_s_median": 0.5,
        "overhead_per_scene_s": 0.5,
        "cluster_start_s": None,
    }
    monkeypatch.setattr(batch, "measure", lambda config, model, scenes, out, steps: dict(row))
    result = CliRunner().invoke(batch.main, ["--scenes", "2", "--config", "loop", "--out", str(tmp_path / "new" / "b.json")])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "new" / "b.json").read_text())
    assert written["settings"]["scenes"] == 2 and written["summary"]["loop"]["throughput_vs_loop"] == 1.0
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["b.json"]


# -- attention_probe -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, code, start, fix",
    [
        (["--every", "0"], 2, "Invalid value for '--every': 0 is not in the range x>=1.", "x>=1."),
        (["--set", "foo"], 2, "Invalid value for '--set': 'foo' is not KEY=VALUE", "(such as attention_loss_weight=0.05)"),
        (["--out", "{tmp}/taken"], 1, "--out {tmp}/taken is a folder; ", "pass the path of the file to write."),
        (["--out", "{tmp}/afile/p.json"], 1, "The folder of --out {tmp}/afile is a file; ", "pass a folder path."),
        (["--out", "{tmp}/probe.png"], 2, "Invalid value for '--out': {tmp}/probe.png is the name of the figure", "pass a path ending in .json."),
        (["--out", "{tmp}/fig.json"], 1, "The figure beside --out {tmp}/fig.png is a folder; ", "pass the path of the file to write."),
    ],
)
def test_the_attention_probe_refuses_a_bad_option_in_one_line_before_any_run(tmp_path, monkeypatch, args, code, start, fix):
    (tmp_path / "taken").mkdir()
    (tmp_path / "fig.png").mkdir()
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(attention_probe, "extract_with_probe", never("an extraction"))
    before = snapshot(tmp_path)
    args = [a.format(tmp=tmp_path) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "probe.json")]
    error_line(CliRunner().invoke(attention_probe.main, ["--scene", "tuning-01-box", *args]), code, start.format(tmp=tmp_path), fix)
    assert snapshot(tmp_path) == before


# -- mini_decoder ------------------------------------------------------------------------------------------
def fake_pipeline(folder: Path, record: str | None = None) -> Path:
    """A folder with the files of a pipeline bas.mini.train writes (empty: nothing here loads them)."""
    for name in mini_decoder.PIPELINE_FILES:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".json"):
            path.write_text("{}")
        else:
            path.mkdir()
    if record is not None:
        (folder / "training.json").write_text(record)
    return folder


def test_the_decoder_finetune_takes_the_pipeline_bas_mini_ships():
    from bas.mini import model_path

    assert mini_decoder.read_record(model_path())  # its files are all there, and its training record reads


@pytest.mark.parametrize("case", ["out below a file", "out a file", "empty model", "truncated record", "record a list"])
def test_the_decoder_finetune_refuses_what_it_could_only_fail_on_after_training(tmp_path, monkeypatch, case):
    from bas.mini import train

    (tmp_path / "afile").write_text("x")
    model, out = tmp_path / "model", tmp_path / "out"
    model.mkdir()
    if case == "out below a file":
        out, says, fix = tmp_path / "afile" / "out", f"--out {tmp_path}/afile/out is below {tmp_path}/afile, which is a file; ", "folder path."
    elif case == "out a file":
        out, says, fix = tmp_path / "afile", f"--out {tmp_path}/afile is a file; ", "pass a folder path."
    elif case == "empty model":
        says = f"--model {model} is not a pipeline bas.mini.train wrote (it has no model_index.json, vae/config.json, "
        fix = "give its --out folder."
    else:
        fake_pipeline(model, '{"stage": ' if case == "truncated record" else "[]")
        what = "Expecting value: line 1 column 11 (char 10)" if case == "truncated record" else "a list, not an object"
        says, fix = f"{model}/training.json is not the record bas.mini.train writes ({what}); ", "train the model again, or remove the file."
    monkeypatch.setattr(train, "load_vae", never("loading the VAE"))
    monkeypatch.setattr(train, "draw_dataset", never("drawing the training scenes"))
    before = snapshot(tmp_path)
    error_line(CliRunner().invoke(mini_decoder.main, ["--model", str(model), "--out", str(out), "--steps", "1"]), 1, says, fix)
    assert snapshot(tmp_path) == before


# -- handle_drift and lora_dtype -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, code, start, fix",
    [
        (["--work", "{tmp}/afile"], 1, "--work {tmp}/afile is a file; ", "pass a folder path."),
        (["--work", "{tmp}/afile/w"], 1, "--work {tmp}/afile/w is below {tmp}/afile, which is a file; ", "pass a folder path."),
        (["--steps", "0"], 2, "Invalid value for '--steps': 0 is not in the range x>=1.", "x>=1."),
        (["--out", "{tmp}/taken"], 1, "--out {tmp}/taken is a folder; ", "pass the path of the file to write."),
        (["--out", "{tmp}/afile/d.json"], 1, "The folder of --out {tmp}/afile is a file; ", "pass a folder path."),
    ],
)
def test_handle_drift_refuses_a_bad_option_in_one_line_before_any_run(tmp_path, monkeypatch, args, code, start, fix):
    import bas.core.training
    import bas.demo.demo

    (tmp_path / "afile").write_text("x")
    (tmp_path / "taken").mkdir()
    monkeypatch.setattr(bas.demo.demo, "draw_mini_scene", never("drawing the scene"))
    monkeypatch.setattr(bas.core.training, "extract", never("an extraction"))
    args = [a.format(tmp=tmp_path) for a in args]
    args += [] if "--out" in args else ["--out", str(tmp_path / "drift.json")]
    args += [] if "--work" in args else ["--work", str(tmp_path / "work")]
    before = snapshot(tmp_path)
    error_line(CliRunner().invoke(handle_drift.main, args), code, start.format(tmp=tmp_path), fix)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "args, code, start, fix",
    [
        (["--steps", "0"], 2, "Invalid value for '--steps': 0 is not in the range x>=1.", "x>=1."),
        (["--rank", "0"], 2, "Invalid value for '--rank': 0 is not in the range x>=1.", "x>=1."),
        (["--out", "{tmp}/taken"], 1, "--out {tmp}/taken is a folder; ", "pass the path of the file to write."),
        (["--out", "{tmp}/afile/d.json"], 1, "The folder of --out {tmp}/afile is a file; ", "pass a folder path."),
    ],
)
def test_lora_dtype_refuses_a_bad_option_in_one_line_before_any_run(tmp_path, monkeypatch, args, code, start, fix):
    import bas.demo.tiny

    (tmp_path / "afile").write_text("x")
    (tmp_path / "taken").mkdir()
    monkeypatch.setattr(bas.demo.tiny, "save_tiny_model", never("making the tiny model"))
    args = [a.format(tmp=tmp_path) for a in args]
    args += [] if "--out" in args else ["--out", str(tmp_path / "dtype.json")]
    before = snapshot(tmp_path)
    error_line(CliRunner().invoke(lora_dtype.main, args), code, start.format(tmp=tmp_path), fix)
    assert snapshot(tmp_path) == before


# -- as users run them: a module or a script, its own process ----------------------------------------------------
@pytest.mark.parametrize(
    "command, start, fix",
    [
        (
            ["-m", "benchmarks.fidelity", "--holm-over", "{tmp}/table.json"],
            "{tmp}/table.json is not a result of benchmarks/fidelity.py (",
            "as it wrote them.",
        ),
        (["benchmarks/report.py", "--bogus"], "No such option", ""),
        (["benchmarks/batch.py", "--repeats", "0"], "Invalid value for '--repeats': 0 is not in the range x>=1.", "x>=1."),
    ],
)
def test_a_benchmark_run_as_users_run_it_prints_one_error_line(tmp_path, command, start, fix):
    (tmp_path / "table.json").write_text('{"ablations": []}')
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    proc = subprocess.run(
        [sys.executable, *[c.format(tmp=tmp_path) for c in command]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"Error: {start.format(tmp=tmp_path)}") and line.endswith(fix), proc.stderr
    assert proc.stdout == ""
