"""``bas eval``: the paper's automatic evaluation for any finished run, with evaluators as plugins.

For each run it builds the prompts (templates times every subset of the run's concept handles, or
a prompts file), generates the images through :func:`bas.generate` (or takes them from a folder),
lets each chosen evaluator score every image, and writes ``eval.json``, ``eval.csv`` and
``index.html`` (:mod:`bas.evaluation.outputs`).  This module knows no particular evaluator: they
come from the ``bas_register_evaluators`` hook and implement :class:`Evaluator`.

Output is whole or absent: everything is built in a staging folder beside ``--out`` and renamed
into place at the end.  The staging folder of an interrupted evaluation keeps its images, and the
same command run again reuses them.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence


from bas.core import io
from bas.core.checkpoint import complete_checkpoints
from bas.core.evaluation import EvalConfig, EvalRun, Evaluator, Metric, Sample, iter_chunks  # noqa: F401 (the contract, re-exported)
from bas.core.errors import BasError, PluginError
from bas.core.handles import HANDLE_PATTERN
from bas.core.plugins import Plugins
from bas.core.runfolder import settle

PLACEHOLDER = "{}"
# Ten prompt contexts in the paper's style.  The paper evaluates with "10 prompt templates" and shows
# "at the beach" and "in the snow" among them, but lists none in its text; these are ours (docs/eval.md).
PAPER_TEMPLATES = (
    "a photo of {} at the beach",
    "a photo of {} in the snow",
    "a photo of {} in the jungle",
    "a photo of {} in the desert",
    "a photo of {} in the street",
    "a photo of {} on top of a wooden floor",
    "a photo of {} with a city in the background",
    "a photo of {} with a mountain in the background",
    "a photo of {} with the Eiffel Tower in the background",
    "a photo of {} floating on top of water",
)
BUILTIN_TEMPLATES = {"paper": PAPER_TEMPLATES}
EVAL_FILE = "eval.json"
IMAGES_DIR = "images"
STAGING_STATE = "generation.json"
IMAGE_NAME = re.compile(r"(?P<stem>.+)-seed(?P<seed>-?\d+)\.png")


@dataclass(frozen=True)
class PromptSpec:
    prompt: str
    concepts: tuple[int, ...]
    template: str | None


# -- runs ---------------------------------------------------------------------------------------
def is_eval_output(path: Path) -> bool:
    return (Path(path) / EVAL_FILE).is_file()


def collect_runs(paths: Sequence[Path], out: Path | None = None) -> tuple[list[Path], list[str]]:
    """The run folders among ``paths`` (as a shell glob such as ``runs/*`` gives them) and notes on what
    was skipped: files (``batch.json``, ``index.html``) and earlier ``bas eval`` outputs.  A folder that
    is not a finished run is an error."""
    runs, notes, seen = [], [], set()
    out_resolved = Path(out).resolve() if out else None
    for raw in paths:
        path = Path(raw)
        settle(path)  # a swap a crash interrupted is finished or undone, as generate and export do
        if not path.exists():
            if complete_checkpoints(path):  # a first run stopped: it lives in its staging folder beside path
                raise BasError(f"{path} holds an interrupted run, not a finished one; finish it with `bas run ... --resume` or leave it out.")
            raise BasError(f"{path} does not exist; pass run folders written by `bas run` or `bas batch`.")
        resolved = path.resolve()
        if resolved in seen:
            continue
        seen.add(resolved)
        if not path.is_dir():
            notes.append(f"skipped {path}: a file, not a run folder")
        elif is_eval_output(path) or (resolved == out_resolved and not (path / "run.json").is_file()):  # a run as --out: check_out says so
            notes.append(f"skipped {path}: a bas eval output, not a run")
        elif not (path / "run.json").is_file():
            raise BasError(f"{path} is not a finished bas run (it has no run.json); finish it with `bas run ... --resume` or leave it out.")
        else:
            runs.append(path)
    if not runs:
        raise BasError("None of the given paths is a run folder; pass the --out folders of `bas run` (or `bas batch DIR`'s DIR/*).")
    return runs, notes


def read_run_info(path: Path) -> dict:
    from bas.generation.generate import read_run

    info = read_run(path)
    handles = info.get("handles")
    if not isinstance(handles, list) or not handles or not all(isinstance(h, str) and HANDLE_PATTERN.fullmatch(h) for h in handles):
        raise BasError(f"{path}/run.json has no valid handle list; the run folder is damaged, run it again.")
    return info


def run_names(paths: Sequence[Path]) -> list[str]:
    """A distinct, file-name-safe name per run: its folder name, numbered when two runs share one."""
    from bas.generation.generate import slug

    names, used = [], set()
    for path in paths:
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", path.resolve().name).strip(".-") or slug(str(path))
        name, k = base, 2
        while name in used:
            name, k = f"{base}-{k}", k + 1
        used.add(name)
        names.append(name)
    return names


def class_words_for(info: dict, given: Sequence[str], path: Path) -> list[str] | None:
    """One class word per handle: ``--class-word`` (one per concept), else the run's ``--init-token``
    words; the background handle's word is ``background``.  None when the run has neither."""
    from bas.core.scene import BACKGROUND_INIT_TOKEN

    handles = info["handles"]
    n_concepts = len(handles) - (1 if info.get("background") else 0)
    words = list(given) or list(info.get("init_tokens") or [])
    if given and len(words) != n_concepts:
        raise BasError(f"{len(words)} --class-word values were given but {path} has {n_concepts} concepts; give one per concept, in handle order.")
    if not words:
        return None
    if len(words) != n_concepts:
        return None
    return words + ([BACKGROUND_INIT_TOKEN] if info.get("background") else [])


# -- prompts ------------------------------------------------------------------------------------
def concept_subsets(n: int) -> list[tuple[int, ...]]:
    """Every non-empty subset of ``n`` concepts: singles first, then pairs, ..., each in handle order."""
    return [c for k in range(1, n + 1) for c in itertools.combinations(range(n), k)]


def fill(template: str, handles: Sequence[str]) -> str:
    """A template with its ``{}`` replaced by the handles joined as training joins them ("A and B")."""
    return template.replace(PLACEHOLDER, " and ".join(handles))


def prompt_specs(run: EvalRun, templates: Sequence[str], literal: Sequence[tuple[int, str]], source: str) -> list[PromptSpec]:
    """The prompts of one run: each template over every subset of its concept handles, then the literal
    prompts (``(line number, prompt)`` of a prompts file), checked against the run's handles."""
    handles = run.handles
    concept_index = [handles.index(h) for h in run.concept_handles]
    specs: dict[str, PromptSpec] = {}
    for template in templates:
        for subset in concept_subsets(len(concept_index)):
            chosen = tuple(concept_index[i] for i in subset)
            prompt = fill(template, [handles[i] for i in chosen])
            specs.setdefault(prompt, PromptSpec(prompt, chosen, template))
    for line, prompt in literal:
        named = [m.group(0) for m in HANDLE_PATTERN.finditer(prompt)]
        unknown = [h for h in named if h not in handles]
        if unknown:
            raise BasError(f"{source} line {line} names {unknown[0]}, which {run.path} does not have (its handles: {' '.join(handles)}); "
                           f"fix the prompt or leave that run out.")
        concepts = tuple(dict.fromkeys(handles.index(h) for h in named))
        specs.setdefault(prompt, PromptSpec(prompt, concepts, None))
    return list(specs.values())


def split_prompts_file(path: Path) -> tuple[list[str], list[tuple[int, str]]]:
    """Lines with ``{}`` are templates (filled with every subset of the handles); other lines are
    prompts used as written (``<asset0>``, ...).  Returns (templates, [(line number, prompt)]).  The file
    is read as ``bas generate --prompts-file`` reads its (:func:`bas.generation.generate.read_prompt_lines`)."""
    from bas.generation.generate import read_prompt_lines

    templates, literal = [], []
    for number, line in read_prompt_lines(path, "one prompt or template ({} for the handles) per line"):
        (templates.append(line) if PLACEHOLDER in line else literal.append((number, line)))
    return templates, literal


# -- evaluators ---------------------------------------------------------------------------------
@dataclass
class ChosenEvaluator:
    name: str
    plugin: str
    evaluator: Any
    explicit: bool
    default_for: Any


def choose_evaluators(plugins: Plugins, config: EvalConfig, infos: Sequence[dict]) -> list[ChosenEvaluator]:
    registry = plugins.registry("evaluator")
    if config.evaluators:
        entries = [registry.get(name, "--evaluator") for name in dict.fromkeys(config.evaluators)]
    else:
        entries = sorted((e for e in registry.entries.values() if any(_default_for(e.factory)(info) for info in infos)), key=lambda e: e.name)
        if not entries:
            known = ", ".join(sorted(registry.entries)) or "none"
            raise BasError(f"No evaluator applies to these runs by default; name one with --evaluator (available: {known}).")
    chosen, owners = [], {}
    for entry in entries:
        evaluator = entry.factory(config)
        for metric in getattr(evaluator, "metrics", ()):
            if metric.name in owners:
                raise PluginError(f"Metric '{metric.name}' is given by both evaluator '{owners[metric.name]}' and evaluator '{entry.name}'; "
                                  f"leave one of them out of --evaluator.")
            owners[metric.name] = entry.name
        chosen.append(ChosenEvaluator(entry.name, entry.plugin, evaluator, bool(config.evaluators), _default_for(entry.factory)))
    return chosen


def _default_for(factory):
    return getattr(factory, "default_for", None) or (lambda info: True)


def template_sets(chosen: Sequence[ChosenEvaluator]) -> dict[str, Sequence[str]]:
    sets: dict[str, Sequence[str]] = dict(BUILTIN_TEMPLATES)
    for c in chosen:
        sets.update(getattr(c.evaluator, "templates", None) or {})
    return sets


def choose_templates(config: EvalConfig, chosen: Sequence[ChosenEvaluator], has_prompts_file: bool) -> tuple[str | None, list[str]]:
    sets = template_sets(chosen)
    name = config.templates
    if name is None:
        if has_prompts_file:
            return None, []
        preferred = {getattr(c.evaluator, "default_templates", None) or "paper" for c in chosen}
        name = preferred.pop() if len(preferred) == 1 else "paper"  # evaluators that disagree: the paper's
    if name not in sets:
        raise BasError(f"Unknown template set '{name}' for --templates; choose one of: {', '.join(sorted(sets))}.")
    return name, list(sets[name])


# -- images -------------------------------------------------------------------------------------
def staging_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.bas-eval-partial"


def check_out(config: EvalConfig) -> None:
    out = Path(config.out)
    target = out.resolve()
    for run in config.runs:
        resolved = Path(run).resolve()
        if target == resolved:
            raise BasError(f"--out {out} is the run folder {run} itself, which bas eval must not write into; "
                           "put the evaluation beside the runs, such as --out eval.")
        if resolved in target.parents:
            raise BasError(f"--out {out} is inside the run folder {run}; put the evaluation beside the runs, such as --out eval.")
    if out.exists() and not out.is_dir():
        raise BasError(f"--out {out} is a file; pass a folder for eval.json, eval.csv, index.html and the images.")
    io.check_output_folder(out, "--out")  # below a file: one line, not mkdir's traceback
    if out.is_dir() and any(out.iterdir()):
        if not is_eval_output(out):
            raise BasError(f"--out {out} is a folder that holds other files, not an earlier bas eval; choose a new or empty folder.")
        if not config.overwrite:
            raise BasError(f"--out {out} holds an earlier bas eval; pass --overwrite to replace it, or choose another folder.")
    if config.images is not None and (Path(config.images).resolve() == target or target in Path(config.images).resolve().parents):
        raise BasError(f"--images {config.images} is inside --out {out}, which bas eval replaces; pass another --out.")


def generation_settings(config: EvalConfig, runs: Sequence[EvalRun]) -> dict:
    """What must match for an interrupted evaluation's images to be reused."""
    return {"device": config.device, "precision": config.precision,
            "runs": {r.name: {"path": str(r.path.resolve()), "run.json": (r.path / "run.json").stat().st_mtime_ns, "sampling": r.sampling}
                     for r in runs}}


def choose_sampling(config: EvalConfig, runs: Sequence[EvalRun]) -> None:
    """Each run's sampler and guidance: ``--scheduler``/``--guidance`` where given, else its family's
    defaults (as ``bas generate`` picks them), checked against its family before anything generates."""
    from bas.core.family import check_model_files
    from bas.core.model import resolve_model
    from bas.core.runs import run_family, run_model
    from bas.generation.generate import run_sampling_defaults

    for run in runs:
        with run_model(run.path):
            check_model_files(resolve_model(run.info["model"]))  # the model its images load from: no link out, before any staging
        try:
            scheduler, guidance, steps = run_sampling_defaults(run_family(run.info, out=run.path), run.info, config.scheduler, config.guidance,
                                                               config.steps)
        except BasError as exc:
            raise BasError(f"{run.path}: {exc}") from None
        run.sampling = {"scheduler": scheduler, "guidance": guidance, "steps": steps}


def prepare_staging(config: EvalConfig, runs: Sequence[EvalRun]) -> tuple[Path, bool]:
    """The staging folder beside ``--out``: kept from an interrupted evaluation with the same generation
    settings (its images are reused), else made anew; and whether it was kept."""
    staging = staging_dir(Path(config.out))
    settings = generation_settings(config, runs)
    state = staging / STAGING_STATE
    same = False
    if staging.exists():
        try:
            same = json.loads(state.read_text()) == settings
        except (OSError, json.JSONDecodeError):
            same = False
        if not same:
            shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    io.write_json(state, settings)
    return staging, same


def generate_samples(run: EvalRun, specs: Sequence[PromptSpec], config: EvalConfig, folder: Path, progress) -> tuple[list[Sample], int]:
    """Generate (through :func:`bas.generate`) the images of ``specs`` not already in ``folder``;
    returns the samples and how many images were already there."""
    from bas.generation.generate import generate
    from bas.generation.generate import image_stem

    seeds = [config.seed + i for i in range(config.num_images)]
    path = lambda spec, s: folder / f"{image_stem(spec.prompt)}-seed{s}.png"  # noqa: E731
    todo = [spec for spec in specs if not all(path(spec, s).is_file() for s in seeds)]
    reused = sum(len(seeds) for spec in specs if spec not in todo)
    progress.update(reused)
    if todo:
        generate(run.path, [s.prompt for s in todo], seeds=seeds, grid=False, **run.sampling,
                 out_dir=folder, device=config.device, precision=config.precision, batch_size=config.batch_size,
                 on_image=lambda p: progress.update(1))
    return [Sample(run.name, spec.prompt, spec.concepts, s, spec.template, path(spec, s)) for spec in specs for s in seeds], reused


def find_samples(run: EvalRun, specs: Sequence[PromptSpec], folder: Path, notes: list[str]) -> list[Sample]:
    """Match the PNGs in ``folder`` (named as ``bas generate`` names them) to the run's prompts."""
    from bas.generation.generate import image_stem

    by_stem: dict[str, PromptSpec] = {}
    for spec in specs:
        stem = image_stem(spec.prompt)
        if stem in by_stem:
            raise BasError(f"The prompts '{by_stem[stem].prompt}' and '{spec.prompt}' give their images the same file name, so images in "
                           f"{folder} cannot be told apart; leave one of them out of --prompts.")
        by_stem[stem] = spec
    samples, matched = [], set()
    for file in sorted(folder.glob("*.png")):
        if file.name.startswith("grid-"):
            continue
        m = IMAGE_NAME.fullmatch(file.name)
        spec = by_stem.get(m.group("stem")) if m else None
        if spec is None:
            raise BasError(f"{file} matches none of the {len(specs)} prompts bas eval has for {run.path} (images are matched by the names "
                           f"`bas generate` gives them, PROMPT-seedS.png); remove it, or pass the prompts it was made from with --prompts.")
        matched.add(spec.prompt)
        samples.append(Sample(run.name, spec.prompt, spec.concepts, int(m.group("seed")), spec.template, file))
    if not samples:
        raise BasError(f"{folder} holds no image of {run.path}'s prompts; generate them first, or leave out --images.")
    missing = len(specs) - len(matched)
    if missing:
        notes.append(f"{run.name}: {missing} of {len(specs)} prompts have no image in {folder}; scored the {len(samples)} images there")
    order = {spec.prompt: i for i, spec in enumerate(specs)}
    return sorted(samples, key=lambda s: (order[s.prompt], s.seed))


def images_folder(config: EvalConfig, run: EvalRun, several: bool) -> Path:
    root = Path(config.images)
    if (root / run.name).is_dir():
        return root / run.name
    if (root / run.path.resolve().name).is_dir():
        return root / run.path.resolve().name
    if not several:
        return root
    raise BasError(f"--images {root} has no folder {run.name} for the run {run.path}; put each run's images in a folder named as the run.")


# -- scoring ------------------------------------------------------------------------------------
def score_all(chosen: Sequence[ChosenEvaluator], runs: Sequence[EvalRun], samples: dict[str, list[Sample]], device, make_bar,
              notes: list[str]) -> dict[tuple[str, int], dict]:
    """``{(run name, sample index): {"scores": {...}, "details": {...}}}`` from every evaluator."""
    results: dict[tuple[str, int], dict] = {(r.name, i): {"scores": {}, "details": {}} for r in runs for i in range(len(samples[r.name]))}
    for c in chosen:
        targets = [r for r in runs if c.explicit or c.default_for(r.info)]
        skipped = [r.name for r in runs if r not in targets]
        if skipped:
            notes.append(f"{c.name} did not score {', '.join(skipped)} (it measures other runs by default; name it with --evaluator to force it)")
        if not targets:
            continue
        metrics = {m.name for m in c.evaluator.metrics}
        c.evaluator.load(device)
        bar = make_bar(sum(len(samples[r.name]) for r in targets), f"scoring ({c.name})")
        for run in targets:
            count = 0
            for i, scored in enumerate(c.evaluator.score(run, samples[run.name])):
                if i >= len(samples[run.name]):
                    raise PluginError(f"Evaluator '{c.name}' returned more scores than {run.name} has images.")
                entry = results[(run.name, i)]
                for key, value in (scored or {}).items():
                    if key in metrics:
                        value = float(value)
                        if not math.isfinite(value):
                            raise PluginError(f"Evaluator '{c.name}' gave {key} = {value} for {samples[run.name][i].path}; a score must be a finite number.")
                        entry["scores"][key] = value
                    else:
                        entry["details"][f"{c.name}: {key}" if key in entry["details"] else key] = value
                count += 1
                bar.update(1)
            if count != len(samples[run.name]):
                raise PluginError(f"Evaluator '{c.name}' returned {count} scores for the {len(samples[run.name])} images of {run.name}.")
        bar.close()
        notes += [f"{c.name}: {line}" for line in c.evaluator.notes()]
    return results


def summary_of(chosen: Sequence[ChosenEvaluator], runs: Sequence[EvalRun], samples: dict[str, list[Sample]], results: dict) -> dict:
    """Per run and metric: the mean over its images and a 95% bootstrap interval resampling prompts."""
    from bas.evaluation.stats import summarize

    summary: dict[str, dict] = {}
    for run in runs:
        row = {}
        for c in chosen:
            for metric in c.evaluator.metrics:
                pairs = [(results[(run.name, i)]["scores"][metric.name], s.prompt) for i, s in enumerate(samples[run.name])
                         if metric.name in results[(run.name, i)]["scores"]]
                if pairs:
                    values, clusters = zip(*pairs)
                    row[metric.name] = summarize(values, clusters=clusters)
        summary[run.name] = row
    return summary


# -- the command --------------------------------------------------------------------------------
def eval_options(plugins: Plugins) -> list[tuple[str, Any]]:
    """``(plugin, click.Option)`` for every option the enabled plugins add to ``bas eval``."""
    return [(plugin, opt) for plugin, opts in plugins.call_each("bas_eval_options") for opt in (opts or [])]


CORE_FIELDS = {f for f in EvalConfig.__dataclass_fields__} - {"options", "plugins"}


def make_eval_config(plugins: Plugins, values: dict[str, Any], plugin_names: Iterable[str] = ()) -> EvalConfig:
    """An :class:`EvalConfig` from option values; plugin options take their defaults when absent."""
    from bas.core.plugins import option_default

    options = {opt.name: option_default(opt) for _, opt in eval_options(plugins)}
    unknown = set(values) - CORE_FIELDS - set(options)
    if unknown:
        raise BasError(f"Unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(CORE_FIELDS | set(options)))}.")
    core = {k: v for k, v in values.items() if k in CORE_FIELDS and v is not None}
    options.update({k: v for k, v in values.items() if k in options})
    for key in ("runs", "evaluators", "class_words"):
        if key in core:
            core[key] = list(core[key])
    core["runs"] = [Path(r) for r in core.get("runs", [])]
    for key in ("out", "prompts", "images"):
        if core.get(key) is not None:
            core[key] = Path(core[key])
    return EvalConfig(plugins=list(plugin_names), options=options, **core)


def evaluate(config: EvalConfig, plugins: Plugins) -> dict:
    """Run the whole evaluation and write ``config.out``; returns what ``eval.json`` holds."""
    from tqdm.auto import tqdm

    from bas.evaluation import outputs as eval_outputs
    from bas.core.model import resolve_device

    def say(message: str) -> None:
        if not config.quiet:
            print(message, file=sys.stderr, flush=True)

    def make_bar(total: int, desc: str):
        return tqdm(total=total, desc=desc, unit="image", file=sys.stderr, disable=config.quiet, dynamic_ncols=True)

    # everything a user can get wrong, before a model loads or an image is generated
    config.check()
    paths, notes = collect_runs(config.runs, config.out)
    config.runs = paths
    check_out(config)
    infos = [read_run_info(p) for p in paths]
    names = run_names(paths)
    runs = [EvalRun(name, path, info, class_words_for(info, config.class_words, path)) for name, path, info in zip(names, paths, infos)]
    chosen = choose_evaluators(plugins, config, infos)
    templates_file, literal = split_prompts_file(config.prompts) if config.prompts else ([], [])
    template_name, templates = choose_templates(config, chosen, bool(config.prompts))
    templates = list(dict.fromkeys(templates + templates_file))
    specs = {run.name: prompt_specs(run, templates, literal, str(config.prompts)) for run in runs}
    for run in runs:
        if not specs[run.name]:
            raise BasError(f"No prompt for {run.path}: its prompts file names none of its handles; add a template with {{}} or a prompt naming them.")
    for c in chosen:
        for run in runs:
            if c.explicit or c.default_for(run.info):
                c.evaluator.check(run)
    device = resolve_device(config.device)
    samples: dict[str, list[Sample]] = {}
    if config.images is None:
        choose_sampling(config, runs)
    else:
        for run in runs:
            samples[run.name] = find_samples(run, specs[run.name], images_folder(config, run, len(runs) > 1), notes)

    # from here on, work is kept: an interrupted evaluation leaves its images in the staging folder;
    # one process at a time works on --out and its staging folder (a second one gets an Error line)
    from bas.core.runfolder import RunLock, this_command

    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)  # the lock file lives beside --out
    lock = RunLock(out)
    lock.acquire(this_command())
    try:
        staging, kept = prepare_staging(config, runs)
        try:
            if config.images is None:
                total = sum(len(specs[r.name]) * config.num_images for r in runs)
                say(f"Generating {total} images ({config.num_images} per prompt) for {len(runs)} run(s) into {out / IMAGES_DIR} ...")
                bar, reused = make_bar(total, "generating"), 0
                for run in runs:
                    samples[run.name], count = generate_samples(run, specs[run.name], config, staging / IMAGES_DIR / run.name, bar)
                    reused += count
                bar.close()
                if reused:
                    notes.append(f"reused {reused} images that an interrupted bas eval with the same settings had generated")
            results = score_all(chosen, runs, samples, device, make_bar, notes)
            prune_images(staging, samples)
            summary = summary_of(chosen, runs, samples, results)
            data = eval_outputs.result_json(config, runs, chosen, samples, results, summary, notes, template_name, templates, final=out,
                                            staging=staging)
            eval_outputs.write_outputs(staging, data)
        except KeyboardInterrupt:
            from bas.core.training import Interrupted

            raise Interrupted(f"Interrupted; the images generated so far are kept in {staging}, and the same command continues from them.") from None
        except BaseException:
            if not kept:  # a failed evaluation leaves nothing behind (one interrupted before keeps its images for the next try)
                shutil.rmtree(staging, ignore_errors=True)
            raise
        swap_into_place(staging, out)
        return data
    finally:
        lock.release()


def prune_images(staging: Path, samples: dict[str, list[Sample]]) -> None:
    """Remove images an interrupted evaluation made for prompts this one does not score."""
    kept = {s.path.resolve() for items in samples.values() for s in items}
    for path in (staging / IMAGES_DIR).rglob("*.png"):
        if path.resolve() not in kept:
            path.unlink()


def swap_into_place(staging: Path, out: Path) -> None:
    """Rename the finished staging folder to ``out``; an earlier evaluation there goes only after that."""
    (staging / STAGING_STATE).unlink(missing_ok=True)
    if out.exists():
        old = out.parent / f".{out.name}.bas-eval-old"
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(out)


def evaluate_runs(runs, out, *, plugins: Iterable[str] = (), **options) -> dict:
    """The Python API of ``bas eval``: ``runs`` (folders, or one folder), ``out`` and the command's
    options with underscores (``templates="paper"``, ``num_images=2``, ``evaluators=["clip-prompt"]``,
    ``clip_model="./clip"``, ...).  Returns what ``eval.json`` holds."""
    runs = [runs] if isinstance(runs, (str, Path)) else list(runs)
    plugins = list(plugins)
    manager = Plugins(plugins)
    return evaluate(make_eval_config(manager, dict(options, runs=runs, out=Path(out)), plugins), manager)
