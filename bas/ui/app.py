"""The page: Scene, Extract, Generate, Export and Runs tabs over bas's Python API (gradio).

Handlers are thin: masks come from the mask-source plugins (:mod:`bas.ui.scenes`), extractions are
``bas run`` command lines run by :mod:`bas.ui.jobs`, images come from :func:`bas.generate` and
exports from :func:`bas.export`.  A user error is one ``Error: ...`` line in the tab's status.
Import this module only after ``GRADIO_TEMP_DIR`` points into the workspace (``bas ui`` does).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import html
import os
import re
import socket
import threading
import zipfile
from pathlib import Path

import gradio as gr

from bas.core import io, runfolder
from bas.core.checkpoint import complete_checkpoints, latest_state
from bas.core.errors import BasError
from bas.core.failures import known_failure
from bas.exports.export import FORMATS
from bas.generation.generate import read_run
from bas.core.mask_cleanup import MaskCleanup
from bas.core.model import PRECISIONS
from bas.ui import commands, scenes
from bas.ui.jobs import Jobs
from bas.ui.workspace import RUNS, Workspace, check_name

# The picture of the Scene tab: a click is a point, a drag a box; both come back as fractions of
# the picture's size, so they do not depend on how large the browser shows it.
CANVAS_TEMPLATE = '<div class="bas-canvas">${value}</div>'
CANVAS_JS = """
let start = null;
const picture = () => element.querySelector('img');
const at = (e) => { const r = picture().getBoundingClientRect(); return [(e.clientX - r.left) / r.width, (e.clientY - r.top) / r.height, e.clientX, e.clientY]; };
element.addEventListener('mousedown', (e) => { if (!picture() || e.target !== picture() || e.button !== 0) return; e.preventDefault(); start = at(e); });
window.addEventListener('mouseup', (e) => {
  if (!start || !picture()) return;
  const end = at(e), first = start; start = null;
  if (Math.hypot(end[2] - first[2], end[3] - first[3]) > 6) trigger('box', {x0: first[0], y0: first[1], x1: end[0], y1: end[1]});
  else trigger('point', {x: first[0], y: first[1]});
});
// an image dropped on the picture, or pasted (Ctrl+V) while the Scene tab shows, goes through the upload button
const feed = (files) => {
  let input = document.querySelector('#upload-image');  // gradio keeps the button's file input just before it
  while (input && !(input.tagName === 'INPUT' && input.type === 'file')) input = input.previousElementSibling;
  const file = [...files][0];
  if (!input || !file) return;
  const list = new DataTransfer();
  list.items.add(file);
  input.files = list.files;
  input.dispatchEvent(new Event('change', {bubbles: true}));
};
element.addEventListener('dragover', (e) => e.preventDefault());
element.addEventListener('drop', (e) => { e.preventDefault(); feed(e.dataTransfer.files); });
document.addEventListener('paste', (e) => {
  if (!element.offsetParent || !e.clipboardData || !e.clipboardData.files.length) return;
  e.preventDefault();
  feed(e.clipboardData.files);
});
"""
# a handle goes where the prompt's cursor is (an empty prompt starts as "a photo of"), spaced from its neighbours
CHIPS_JS = """
element.addEventListener('click', (e) => {
  const b = e.target.closest('button[data-handle]'), t = document.querySelector('#prompts textarea');
  if (!b || !t) return;
  const start = t.selectionStart ?? t.value.length, end = t.selectionEnd ?? start;
  let before = t.value.slice(0, start), after = t.value.slice(end);
  if (!t.value.trim()) { before = 'a photo of '; after = ''; }
  const pre = before && !/\\s$/.test(before) ? ' ' : '', post = after && !/^\\s/.test(after) ? ' ' : '';
  t.value = before + pre + b.dataset.handle + post + after;
  const at = (before + pre + b.dataset.handle).length;
  t.focus();
  t.setSelectionRange(at, at);
  t.dispatchEvent(new Event('input', {bubbles: true}));
});
"""
# the whole page: arrow keys move between tabs (as ARIA tabs do), Ctrl+Enter in the prompts generates;
# the page is marked data-bas-keys once these keys work (gradio runs this after the app has mounted)
PAGE_JS = """
() => {
  document.addEventListener('keydown', (e) => {
    const tab = e.target.closest && e.target.closest('[role=tab]');
    if (tab && (e.key === 'ArrowRight' || e.key === 'ArrowLeft')) {
      const tabs = [...tab.parentElement.querySelectorAll('[role=tab]')];
      const next = tabs[(tabs.indexOf(tab) + (e.key === 'ArrowRight' ? 1 : tabs.length - 1)) % tabs.length];
      e.preventDefault();
      next.click();
      next.focus();
    }
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey) && e.target.closest && e.target.closest('#prompts')) {
      e.preventDefault();
      document.querySelector('#generate').click();
    }
  });
  document.documentElement.dataset.basKeys = 'ready';
}
"""
# the queue: a Stop button for every job queued or running, and Show to follow it in the progress panel
QUEUE_JS = """
element.addEventListener('click', (e) => {
  const b = e.target.closest('button[data-job]');
  if (b) trigger(b.dataset.action === 'halt' ? 'halt' : 'follow', {job: b.dataset.job});
});
"""
PHASE_COLOURS = {"phase 1": "#1f77b4", "phase 2": "#ff7f0e"}
CSS = """
.bas-canvas img { width: 100%; max-width: 768px; cursor: crosshair; user-select: none; display: block; }
.bas-canvas .empty { padding: 4em 1em; text-align: center; color: #777; border: 2px dashed #ccc; }
.bas-queue li { margin: .2em 0; }
.bas-queue button { margin-left: .5em; padding: 0 .6em; border-radius: .3em; border: 1px solid #999; background: #f4f4f4; cursor: pointer; }
.bas-chip { margin: 0 .3em .3em 0; padding: .2em .7em; border-radius: 1em; border: 1px solid #999; background: #f4f4f4; cursor: pointer; font-family: monospace; }
"""
POSITIVE, NEGATIVE = "a point on the concept", "a point off it (negative)"
LABEL_STATE = {"finished": "finished", "interrupted": "interrupted (resumable)", "failed": "failed"}


def say(text: str) -> str:
    """A status line for a Markdown output: handles such as <asset0> must not read as HTML tags."""
    return html.escape(text, quote=False)


def number(text, kind, what: str):
    """An optional number typed in a text field: None when blank."""
    text = str(text or "").strip()
    if not text:
        return None
    try:
        return kind(float(text)) if kind is int else kind(text)
    except ValueError:
        raise BasError(f"{what} '{text}' is not a number; write one such as {'512' if kind is int else '1e-4'}, or leave it blank.") from None


def required(value, kind, what: str, example: str):
    """A number field that must not be left blank (gr.Number gives None); its range is the API's to check."""
    if value is None or str(value).strip() == "":
        raise BasError(f"{what} is blank; write a number such as {example}.")
    number_ = float(value)
    if kind is int and not number_.is_integer():
        raise BasError(f"{what} must be a whole number, not {value}.")
    return kind(number_)


@contextlib.contextmanager
def uploaded(path: Path):
    """Errors about an uploaded file name it as the user knows it, not by gradio's folder for it
    (``.bas-ui/uploads/<64 hex digits>/``)."""
    try:
        yield
    except BasError as exc:
        raise BasError(str(exc).replace(str(path), path.name).replace(str(path.parent) + os.sep, "")
                       .replace("with --image", "as the image").replace("with --mask", "as a mask")) from None


def caption(path: Path, prompts: list[str]) -> str:
    """A generated image's prompt and seed, from its name (``<image_stem(prompt)>-seed<S>.png``)."""
    from bas.generation.generate import image_stem

    stem, _, seed = path.stem.rpartition("-seed")
    prompt = next((p for p in prompts if image_stem(p) == stem), stem)
    return f"{prompt} (seed {seed})"


def status_error(exc: Exception) -> str:
    return say(f"Error: {exc}")


def guarded(outputs: int):
    """Run a handler; a known failure (a BasError, the machine's limits, a plugin's fault: the command
    line's, :func:`bas.core.failures.known_failure`) leaves every output as it was except the last
    (the status line)."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                error = known_failure(exc)
                if error is None:
                    raise
                return (*[gr.skip()] * (outputs - 1), status_error(error))
        return run
    return wrap


class App:
    def __init__(self, workspace: Workspace, model: str, sam_model: str, device: str = "auto"):
        self.ws = workspace
        self.model, self.sam_model, self.device = model, sam_model, device
        self.sam = scenes.SamSession()
        self.jobs = Jobs(workspace.jobs, lambda args: commands.parse_run(args, workspace))
        self.generating = threading.Lock()
        self.draft_locks: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)  # a browser tab's draft: one change at a time

    # -- Scene ------------------------------------------------------------------------------------
    def canvas(self, draft: scenes.Draft | None, cleanup: MaskCleanup) -> str:
        if draft is None:
            return '<div class="empty">Drop an image here, paste one (Ctrl+V), upload one, or open a scene of the workspace.</div>'
        return f'<img src="{scenes.data_url(scenes.render(draft, cleanup))}" draggable="false" alt="scene with masks">'

    def scene_outputs(self, draft, cleanup, message):
        """canvas, concept choice, init word, concepts list, draft, status"""
        labels = draft.labels() if draft else []
        selected = labels[draft.selected] if labels else None
        word = draft.concepts[draft.selected].init_word if labels else ""
        return (self.canvas(draft, cleanup), gr.update(choices=labels, value=selected), word,
                scenes.scene_summary(draft) if draft else "", draft, say(message))

    def draft_lock(self, request) -> threading.Lock:
        return self.draft_locks[getattr(request, "session_hash", None) or ""]

    def with_brush(self, handler):
        """``handler`` (a Scene handler's six outputs, the status last) with the brush's picture for the draft it
        returns inserted before the status, so that both change in one update: a separate event after it lags
        behind the status under load, and a stroke made meanwhile lands on the previous picture."""
        @functools.wraps(handler)
        def run(*args, **kwargs):
            out = handler(*args, **kwargs)
            brush = self.brush_for(out[4]) if isinstance(out[4], scenes.Draft) else gr.skip()
            return (*out[:5], brush, out[5])
        return run

    def brush_for(self, draft):
        """The brush's picture for the draft's selected concept."""
        try:
            return scenes.brush_value(draft, self.ws.tmp / "brush") if draft is not None else None
        except BasError:
            return gr.skip()

    def segmenter(self, checkpoint: str, device: str, draft: scenes.Draft):
        return lambda prompt: self.sam.segment(checkpoint.strip() or self.sam_model, device.strip() or "auto", draft.image, prompt)

    @staticmethod
    def cleanup_options(threshold, fill, dilate, erode, feather) -> dict:
        return {"mask_threshold": None if threshold in (None, "", 0) else float(threshold), "fill_holes": bool(fill),
                "mask_dilate": float(dilate or 0), "mask_erode": float(erode or 0), "mask_feather": float(feather or 0)}

    def build(self) -> gr.Blocks:
        ws = self.ws
        d = commands.defaults(model=self.model)
        with gr.Blocks(title="bas ui") as demo:
            job_id = gr.State(None)
            seen = gr.State(-1)
            picture_shown = gr.State("")  # which attention map the page shows (job, file, time)
            draft = gr.State(None)
            gr.Markdown(f"## bas: Break-A-Scene\nWorkspace `{ws.root}`: scenes in `scenes/`, runs in `runs/`, exports in `exports/`.")
            with gr.Tabs(elem_id="tabs") as tabs:
                # ---------------------------------------------------------------- Scene
                with gr.Tab("Scene", id="scene", elem_id="tab-scene"):
                    with gr.Row():
                        with gr.Column(scale=3):
                            canvas = gr.HTML(self.canvas(None, MaskCleanup()), html_template=CANVAS_TEMPLATE, js_on_load=CANVAS_JS, elem_id="scene-canvas")
                            scene_status = gr.Markdown("Click on a concept to add a point; drag to draw a box around it; or paint it with the brush below.", elem_id="scene-status")
                            concepts_md = gr.Markdown("", elem_id="scene-concepts")
                            with gr.Accordion("Brush and eraser: paint the selected concept's mask", open=True, elem_id="brush-panel"):
                                brush = gr.ImageEditor(None, type="numpy", image_mode="RGBA", sources=(), transforms=(), layers=False,
                                                       brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=12), eraser=gr.Eraser(default_size=12),
                                                       canvas_size=(scenes.DISPLAY_MAX_SIDE, scenes.DISPLAY_MAX_SIDE), show_label=False, elem_id="mask-brush")
                                with gr.Row():
                                    brush_load = gr.Button("Paint the selected concept (start from its mask)", elem_id="brush-load")
                                    brush_use = gr.Button("Use the painted mask for the selected concept", variant="primary", elem_id="use-brush")
                        with gr.Column(scale=2):
                            sam_ready, sam_line = scenes.sam_status(self.sam_model)  # said first: whether clicks can segment
                            sam_status = gr.Markdown(say(sam_line), elem_id="sam-status")
                            with gr.Row():
                                # any file: one that is not an image gets a message saying so (a filter in the file picker says nothing)
                                upload_image = gr.UploadButton("Upload an image", elem_id="upload-image")
                                upload_mask = gr.UploadButton("Upload mask PNG(s)", file_count="multiple", elem_id="upload-mask")
                            keep_original = gr.Checkbox(False, label=f"Keep the full-size original (else an upload is brought down to {scenes.WORKING_SIDE} px)", elem_id="keep-original")
                            with gr.Row():
                                open_path = gr.Dropdown(ws.scenes(), label="Open a scene folder of the workspace", allow_custom_value=True, value=None, elem_id="open-scene", scale=3)
                                open_button = gr.Button("Open", elem_id="open-scene-button", scale=1)
                            click_mode = gr.Radio([POSITIVE, NEGATIVE], value=POSITIVE, label="A click adds", elem_id="click-mode")
                            concept = gr.Radio([], label="Concept (its handle)", elem_id="concept")
                            with gr.Row():
                                new_button = gr.Button("New concept", elem_id="new-concept")
                                undo_button = gr.Button("Undo", elem_id="undo")
                                remove_button = gr.Button("Remove concept", elem_id="remove-concept")
                            init_word = gr.Textbox(label="Init word of this concept (one word, such as 'bear'; blank: 'object')", elem_id="init-word")
                            with gr.Accordion("Mask cleanup", open=False, elem_id="mask-cleanup"):
                                threshold = gr.Number(0, label="Threshold (--mask-threshold; 0: keep soft values)", elem_id="mask-threshold")
                                fill = gr.Checkbox(False, label="Fill holes (--fill-holes)", elem_id="fill-holes")
                                dilate = gr.Number(0, label="Dilate, pixels (--mask-dilate)", minimum=0, elem_id="mask-dilate")
                                erode = gr.Number(0, label="Erode, pixels (--mask-erode)", minimum=0, elem_id="mask-erode")
                                feather = gr.Number(0, label="Feather, pixels (--mask-feather)", minimum=0, elem_id="mask-feather")
                            with gr.Accordion("Segment Anything", open=not sam_ready):
                                sam_model = gr.Textbox(self.sam_model, label="SAM checkpoint (hub id or folder; bas ui --sam-model sets it)", elem_id="sam-model")
                                sam_device = gr.Textbox(self.device, label="Device (auto, cpu, cuda, cuda:N)")
                            scene_name = gr.Textbox(label="Scene name (saved in scenes/NAME)", elem_id="scene-name")
                            replace = gr.Checkbox(False, label="Replace the scene of that name")
                            save_button = gr.Button("Save scene", variant="primary", elem_id="save-scene")
                            scene_command = gr.Textbox(label="The same from the command line", interactive=False, buttons=["copy"], lines=2, elem_id="scene-command")
                    cleanup_inputs = [threshold, fill, dilate, erode, feather]
                    scene_out = [canvas, concept, init_word, concepts_md, draft, scene_status]

                # ---------------------------------------------------------------- Extract
                with gr.Tab("Extract", id="extract", elem_id="tab-extract"):
                    with gr.Row():
                        with gr.Column(scale=2):
                            x_scene = gr.Dropdown(ws.scenes(), label="Scene", allow_custom_value=True, elem_id="extract-scene")
                            run_name = gr.Textbox(label="Run name (written to runs/NAME)", elem_id="run-name")
                            x_model = gr.Textbox(self.model, label="Model (hub id or pipeline folder)", elem_id="extract-model")
                            weights = gr.Radio(["lora", "full"], value="lora", label="Weights of phase 2 (LoRA, or a full fine-tune as the paper)",
                                               elem_id="weights")
                            with gr.Row():
                                p1 = gr.Number(d["phase1_steps"], precision=0, label="Phase 1 steps (handles)", elem_id="phase1-steps")
                                p2 = gr.Number(d["phase2_steps"], precision=0, label="Phase 2 steps (weights + handles)", elem_id="phase2-steps")
                            with gr.Row():
                                lr1 = gr.Number(d["phase1_lr"], label="Phase 1 learning rate")
                                lr2 = gr.Textbox("", label="Phase 2 learning rate (blank: 1e-4 LoRA, 2e-6 full)")
                            with gr.Row():
                                rank = gr.Number(d["lora_rank"], precision=0, label="LoRA rank")
                                seed = gr.Number(d["seed"], precision=0, label="Seed")
                                resolution = gr.Textbox("", label="Resolution (blank: the model's)")
                            with gr.Row():
                                precision = gr.Dropdown(list(PRECISIONS), value="auto", label="Precision")
                                x_device = gr.Textbox(self.device, label="Device")
                            words = gr.Textbox(label="Init words, one per concept, separated by commas (from the scene; blank: 'object')", elem_id="init-words")
                            background = gr.Checkbox(False, label="Also extract the background (--background)")
                            extra_plugins = gr.CheckboxGroup(list(self.optional_plugins()), value=[n for n in d["plugins"] if n in self.optional_plugins()],
                                                             label="More plugins (ticked as the model recommends)", elem_id="more-plugins")
                            extra = gr.Textbox(label="More options, as on the command line (such as --validation-prompt \"a photo of <asset0>\")", elem_id="more-options")
                            overwrite = gr.Checkbox(False, label="Replace a run of that name (--overwrite)")
                        with gr.Column(scale=3):
                            # the buttons and what they act on, together at the top (on screen in a small window)
                            with gr.Row():
                                start = gr.Button("Start", variant="primary", elem_id="start")
                                stop = gr.Button("Stop (saves a checkpoint)", elem_id="stop")
                                resume = gr.Button("Resume", elem_id="resume")
                            x_status = gr.Markdown("", elem_id="extract-status")
                            progress = gr.Markdown("No extraction started yet.", elem_id="progress")
                            queue = gr.HTML("", html_template="<div>${value}</div>", js_on_load=QUEUE_JS, elem_id="queue")
                            loss_plot = gr.LinePlot(x="step", y="loss", color="phase", title="Training loss", height=260, elem_id="loss-plot",
                                                    color_map=PHASE_COLOURS)
                            attention = gr.Image(label="Attention of each handle (newest)", interactive=False, elem_id="attention", height=260)
                            command = gr.Textbox(label="The same from the command line", interactive=False, buttons=["copy"], lines=2, elem_id="run-command")
                    form = [x_scene, run_name, x_model, weights, p1, p2, lr1, lr2, rank, seed, resolution, precision, x_device, words, background, extra_plugins, extra, overwrite]
                    # a user's switch to the full fine-tune unticks what cannot run with it (not a job's form being shown again)
                    weights.input(lambda w, ticked, model: commands.ticked_for_weights(w, ticked, model or None), [weights, extra_plugins, x_model],
                                  extra_plugins)
                    # another model typed: the fields still at the last model's recommendation take the new one's
                    model_for = gr.State(self.model)  # the model the fields' starting values are those of
                    follows = [p1, p2, lr1, rank, seed]  # commands.FOLLOWS_MODEL, in order

                    def on_model(model, previous, weights_, ticked, *numbers):
                        model = (model or "").strip()
                        if model == (previous or ""):
                            return [gr.skip()] * (len(follows) + 2)
                        try:
                            values, ticked = commands.follow_model(previous, model, dict(zip(commands.FOLLOWS_MODEL, numbers)), ticked, weights_)
                        except BasError:  # a recommendation that cannot be made (start says why): the fields stay as they are
                            return [gr.skip()] * (len(follows) + 1) + [model]
                        return [*values.values(), ticked, model]

                    for event in (x_model.blur, x_model.submit):
                        event(on_model, [x_model, model_for, weights, extra_plugins, *follows], [*follows, extra_plugins, model_for])

                # ---------------------------------------------------------------- Generate
                with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                    with gr.Row():
                        with gr.Column(scale=2):
                            g_run = gr.Dropdown(ws.finished_runs(), label="Run", allow_custom_value=True, elem_id="generate-run")
                            chips = gr.HTML("", html_template="<div>${value}</div>", js_on_load=CHIPS_JS, elem_id="handle-chips")
                            prompts = gr.Textbox(label="Prompts, one per line (click a handle to add it at the cursor; Ctrl+Enter generates)", lines=3, elem_id="prompts")
                            negative = gr.Textbox(label="Negative prompt")
                            seeds = gr.Textbox("0,1,2,3", label="Seeds (comma-separated)", elem_id="seeds")
                            with gr.Row():
                                sampling = commands.sampling_choices()  # until a run is picked: the default family's
                                steps = gr.Number(sampling["steps"], precision=0, label="Steps", elem_id="generate-steps")
                                guidance = gr.Number(sampling["guidance"], label="Guidance (blank: the run's family's)", elem_id="guidance")
                                lora_scale = gr.Number(1.0, label="LoRA scale (0: handles only)", elem_id="lora-scale")
                            scheduler = gr.Dropdown(sampling["schedulers"], value=sampling["scheduler"], label="Sampler", elem_id="sampler")
                            generate = gr.Button("Generate", variant="primary", elem_id="generate")
                            g_command = gr.Textbox(label="The same from the command line", interactive=False, buttons=["copy"], elem_id="generate-command")
                            g_status = gr.Markdown("", elem_id="generate-status")
                        with gr.Column(scale=3):
                            grid = gr.Image(label="Grid (a row per prompt, a column per seed)", interactive=False, elem_id="generate-grid")
                            gallery = gr.Gallery(label="Images (saved in the run's samples/)", columns=4, elem_id="generate-gallery")

                # ---------------------------------------------------------------- Export
                with gr.Tab("Export", id="export", elem_id="tab-export"):
                    with gr.Row():
                        with gr.Column(scale=2):
                            e_run = gr.Dropdown(ws.finished_runs(), label="Run", allow_custom_value=True, elem_id="export-run")
                            fmt = gr.Radio(list(FORMATS), value="kohya", label="Format: diffusers; kohya (AUTOMATIC1111, ComfyUI); lora-from-full", elem_id="export-format")
                            e_name = gr.Textbox(label="Name of the LoRA file and embeddings (blank: the run's name)")
                            e_rank = gr.Number(32, precision=0, label="Rank of a LoRA made from a full fine-tune")
                            e_preview = gr.Checkbox(True, label="Generate a preview when the run's report has none")
                            export = gr.Button("Export", variant="primary", elem_id="export")
                            e_command = gr.Textbox(label="The same from the command line", interactive=False, buttons=["copy"], elem_id="export-command")
                            e_status = gr.Markdown("", elem_id="export-status")
                            e_file = gr.File(label="Download", interactive=False, elem_id="export-file")
                        with gr.Column(scale=3):
                            card = gr.Markdown("", elem_id="export-card")

                # ---------------------------------------------------------------- Runs
                with gr.Tab("Runs", id="runs", elem_id="tab-runs"):
                    runs_table = gr.Dataframe(headers=["run", "status", "date", "handles", "model", "steps", "note"], interactive=False, elem_id="runs-table")
                    with gr.Row():
                        refresh = gr.Button("Refresh", elem_id="refresh-runs")
                        r_resume = gr.Button("Resume the selected run", elem_id="resume-run")
                        r_stop = gr.Button("Stop the selected run", elem_id="stop-run")
                        r_delete = gr.Button("Delete the selected run", variant="stop", elem_id="delete-run")
                    r_selected = gr.Textbox(None, visible="hidden", elem_id="selected-run")  # a value the page has: Delete asks about it
                    r_details = gr.Markdown("Select a run to see its report.", elem_id="run-details")
                    report = gr.Gallery(label="Report", columns=2, object_fit="contain", elem_id="run-report")
                    r_status = gr.Markdown("", elem_id="runs-status")

            timer = gr.Timer(1.0)

            def scene_words(folder):
                try:
                    path = self.ws.inside(folder)
                except BasError:
                    return gr.skip(), gr.skip()
                info = self.ws.scene_info(path)
                return ", ".join(info.get("init_tokens") or []), gr.update(value=path.name) if path.name else gr.skip()

            # ---------------------------------------------------------------- Scene events
            def upload_image_handler(file, keep, *cleanup):
                try:
                    path = self.ws.inside(file)
                    with uploaded(path):
                        image, size = scenes.working_copy(path, bool(keep))
                        new = scenes.new_draft(image)
                except BasError as exc:
                    return (*[gr.skip()] * 7, status_error(exc), gr.skip())
                name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(path).stem).strip("-.")[:40] or "scene"
                reduced = f", brought down to {new.size[0]}x{new.size[1]} to work with (training uses 512 px; tick 'Keep the full-size original' to keep it)" if new.size != size else ""
                out = self.scene_outputs(new, self.cleanup(cleanup), f"Loaded {Path(path).name} ({size[0]}x{size[1]}{reduced}); click on a concept, drag a box around it, or paint it with the brush.")
                return (*out[:5], name, "", out[5], self.brush_for(new))

            # the brush's picture in the same update as the status that says the image loaded (see with_brush)
            upload_image.upload(upload_image_handler, [upload_image, keep_original, *cleanup_inputs], [*scene_out[:5], scene_name, scene_command, scene_status, brush])

            def open_handler(folder, *cleanup):
                try:
                    new = scenes.open_scene(self.ws, folder or "")
                except BasError as exc:
                    return (*[gr.skip()] * 7, status_error(exc), gr.skip())
                out = self.scene_outputs(new, self.cleanup(cleanup), f"Opened {new.origin}: {len(new.concepts)} masks.")
                return (*out[:5], Path(new.origin).name, "", out[5], self.brush_for(new))

            open_button.click(open_handler, [open_path, *cleanup_inputs], [*scene_out[:5], scene_name, scene_command, scene_status, brush])

            def edit(action):
                """A Scene handler that changes the draft and re-renders it."""
                @guarded(6)
                def handler(current, mode, checkpoint, device, threshold, fill, dilate, erode, feather, evt: gr.EventData = None, request: gr.Request = None):
                    # no *args here: gradio places the event data by its position in the signature
                    cleanup = self.cleanup((threshold, fill, dilate, erode, feather))
                    if current is None:
                        raise BasError("Upload an image first (or open a scene folder).")
                    with self.draft_lock(request):  # one change of the draft at a time, in the order they came
                        message = action(current, mode, self.segmenter(checkpoint, device, current), evt)
                        return self.scene_outputs(current, cleanup, message)
                return handler

            edit_inputs = [draft, click_mode, sam_model, sam_device, *cleanup_inputs]
            scene_out_brush = [*scene_out[:5], brush, scene_out[5]]  # a handler wrapped in with_brush: the status stays last
            # "multiple": a click made while SAM loads (or segments the previous one) waits its turn instead of being dropped
            canvas.point(edit(lambda dr, mode, seg, evt: scenes.add_point(dr, evt._data["x"], evt._data["y"], mode == POSITIVE, seg)), edit_inputs, scene_out,
                         trigger_mode="multiple")
            canvas.box(edit(lambda dr, mode, seg, evt: scenes.set_box(dr, evt._data["x0"], evt._data["y0"], evt._data["x1"], evt._data["y1"], seg)), edit_inputs, scene_out,
                       trigger_mode="multiple")
            undo_button.click(edit(lambda dr, mode, seg, evt: scenes.undo(dr, seg)), edit_inputs, scene_out)
            new_button.click(self.with_brush(edit(lambda dr, mode, seg, evt: scenes.new_concept(dr))), edit_inputs, scene_out_brush)
            remove_button.click(edit(lambda dr, mode, seg, evt: scenes.remove_concept(dr)), edit_inputs, scene_out)
            for control in cleanup_inputs:
                control.change(edit(lambda dr, mode, seg, evt: "Cleanup applies to the preview, and to the masks when the scene is saved."), edit_inputs, scene_out)

            @guarded(6)
            def use_brush(current, value, threshold, fill, dilate, erode, feather, request: gr.Request = None):
                cleanup = (threshold, fill, dilate, erode, feather)  # no *args: gradio places the request by its position
                if current is None:
                    raise BasError("Upload an image first (or open a scene folder).")
                with self.draft_lock(request):
                    return self.scene_outputs(current, self.cleanup(cleanup), scenes.set_painted_mask(current, value))

            brush_load.click(self.brush_for, draft, brush)
            brush_use.click(use_brush, [draft, brush, *cleanup_inputs], scene_out)
            sam_model.change(lambda checkpoint: say(scenes.sam_status(checkpoint.strip() or self.sam_model)[1]), sam_model, sam_status)

            @guarded(6)
            def on_mask_upload(current, files, threshold, fill, dilate, erode, feather, request: gr.Request = None):
                cleanup = (threshold, fill, dilate, erode, feather)  # no *args: gradio places the request by its position
                if current is None:
                    raise BasError("Upload the scene's image first, then its masks.")
                messages = []
                with self.draft_lock(request):
                    for f in files or []:
                        with uploaded(self.ws.inside(f)):
                            messages.append(scenes.add_mask_file(current, self.ws.inside(f), Path(f).name))
                return self.scene_outputs(current, self.cleanup(cleanup), " ".join(messages))

            upload_mask.upload(on_mask_upload, [draft, upload_mask, *cleanup_inputs], scene_out)

            @guarded(6)
            def on_select_concept(current, label, *cleanup):
                if current is None or label not in current.labels() or current.labels().index(label) == current.selected:
                    return (gr.skip(),) * 6
                current.selected = current.labels().index(label)
                return self.scene_outputs(current, self.cleanup(cleanup), f"{label} selected: clicks now refine it.")

            concept.input(self.with_brush(on_select_concept), [draft, concept, *cleanup_inputs], scene_out_brush)

            def on_init_word(current, word, label):
                if scenes.set_init_word(current, label, word):
                    return scenes.scene_summary(current)
                return gr.skip()

            # always_last: a keystroke typed while the previous one is handled is not dropped (gradio's
            # default for .input); the concept shown when the word was typed gets it, whatever is selected since
            init_word.input(on_init_word, [draft, init_word, concept], concepts_md, trigger_mode="always_last")

            def save_handler(current, name, overwrite_scene, checkpoint, device, word, label, *cleanup):
                try:
                    if current is None:
                        raise BasError("Upload an image first (or open a scene folder).")
                    scenes.set_init_word(current, label, word)  # the field as shown, should its last keystroke still be on its way
                    options = self.cleanup_options(*cleanup)
                    MaskCleanup.from_options(options)
                    folder, written, cli = scenes.save(current, self.ws, name, options, bool(overwrite_scene), checkpoint.strip() or self.sam_model,
                                                       (device or "").strip() or self.device)
                except BasError as exc:
                    return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), status_error(exc)
                relative = self.ws.relative(folder)
                choices = self.ws.scenes()
                message = f"Saved {relative}: " + ", ".join(p.name for p in written) + ". Next: the Extract tab."
                return (gr.update(choices=choices, value=relative), gr.update(choices=choices, value=relative), *scene_words(relative), cli, message)

            save_button.click(save_handler, [draft, scene_name, replace, sam_model, sam_device, init_word, concept, *cleanup_inputs],
                              [open_path, x_scene, words, run_name, scene_command, scene_status])

            # ---------------------------------------------------------------- Extract events
            # a scene picked by the user (not one a reload restores) fills in its init words and a run name
            x_scene.input(scene_words, x_scene, [words, run_name])
            x_scene.select(scene_words, x_scene, [words, run_name])

            def form_values(values) -> dict:
                (scene, name, model, weights_, phase1, phase2, lr_1, lr_2, rank_, seed_, res, precision_, device, words_, bg, plugins, extra_, overwrite_) = values
                if not scene:
                    raise BasError("Choose a scene (save one in the Scene tab first).")
                self.ws.inside(scene)
                out = f"{RUNS}/{check_name(name, 'run')}"
                init = [w.strip() for w in (words_ or "").split(",") if w.strip()]  # a word with a space is an error at Start
                return {"scene": scene, "out": out, "model": (model or "").strip() or self.model, "weights": weights_, "phase1_steps": phase1,
                        "phase2_steps": phase2, "phase1_lr": lr_1, "phase2_lr": number(lr_2, float, "Phase 2 learning rate"), "lora_rank": rank_, "seed": seed_,
                        "resolution": number(res, int, "Resolution"),
                        "precision": precision_, "device": (device or "").strip() or "auto", "init_tokens": init, "background": bg,
                        "plugins": plugins, "extra": extra_, "overwrite": overwrite_}

            def shown(args: list[str]) -> str:
                return f"cd {commands.shell([self.ws.root])}\nbas run {commands.shell(args)}"

            def start_handler(*values):
                try:
                    form_ = form_values(values)
                    args = commands.run_args(form_, commands.absolute(self.ws))
                    text = shown(commands.run_args(form_, commands.relative))
                    self.check_not_overwriting(commands.parse_run(args, self.ws)[0])
                    job = self.jobs.submit(args, text)
                except BasError as exc:
                    return gr.skip(), gr.skip(), status_error(exc), -1
                return job.id, text, f"Queued {job.out.name}.", -1

            start.click(start_handler, form, [job_id, command, x_status, seen])

            def command_preview(*values):
                try:
                    return shown(commands.run_args(form_values(values), commands.relative))
                except BasError as exc:
                    return f"({exc})"

            for control in form:
                control.change(command_preview, form, command)

            def stop_handler(current):
                return self.stop_job(self.jobs.get(current))

            stop.click(stop_handler, job_id, x_status)

            def halt_handler(evt: gr.EventData):
                return self.stop_job(self.jobs.get(evt._data.get("job")))

            queue.halt(halt_handler, None, x_status)

            def follow_handler(evt: gr.EventData):
                job = self.jobs.get(evt._data.get("job"))
                if job is None:
                    return gr.skip(), gr.skip(), gr.skip(), "That extraction is no longer known to this server."
                return job.id, -1, job.shown, f"Showing {job.out.name}."

            queue.follow(follow_handler, None, [job_id, seen, command, x_status])

            def resume_out(out: Path):
                try:
                    job = self.resume(out)
                except BasError as exc:
                    return gr.skip(), gr.skip(), status_error(exc), gr.skip()
                return job.id, job.shown, f"Resuming {job.out.name}.", -1

            def resume_handler(current, *values):
                job = self.jobs.get(current)
                if job is not None:
                    return resume_out(job.out)
                try:
                    out = self.ws.inside(f"{RUNS}/{check_name(values[1], 'run')}")
                except BasError as exc:
                    return gr.skip(), gr.skip(), status_error(exc), gr.skip()
                return resume_out(out)

            resume.click(resume_handler, [job_id, *form], [job_id, command, x_status, seen])

            def tick(current, version, shown):
                job = self.jobs.get(current)
                queue_text = self.queue_html(current)
                if job is None or job.version == version:
                    return gr.skip(), gr.skip(), gr.skip(), queue_text, version, shown
                status = job.status(self.jobs.place(job) if job.state == "queued" else None)
                plot = self.loss_frame(job)
                picture = str(job.attention) if job.attention and job.attention.is_file() else None
                # the picture only when it changed: gradio copies a file it is sent over its cached copy,
                # which a browser may be reading at that moment
                key = f"{job.id}|{picture}|{job.attention.stat().st_mtime_ns if picture else ''}"
                update = gr.skip() if key == shown else gr.update(value=picture, label=f"Attention of each handle ({job.attention_at})" if picture else "Attention of each handle")
                return f"**{html.escape(status)}**", plot, update, queue_text, job.version, key

            timer.tick(tick, [job_id, seen, picture_shown], [progress, loss_plot, attention, queue, seen, picture_shown], show_progress="hidden")

            def on_load():
                active = self.jobs.active()
                running = [j for j in active if j.state != "queued"]
                job = (running or active)[-1] if active else self.jobs.newest()
                if job is None:
                    return None, -1, gr.skip(), *[gr.skip()] * len(form), gr.skip()
                fields = self.form_of(job)
                return job.id, -1, job.shown, *fields, fields[form.index(x_model)]  # the form shows that run's model

            demo.load(on_load, None, [job_id, seen, command, *form, model_for])

            # ---------------------------------------------------------------- Generate events
            g_run.change(self.generate_settings, g_run, [chips, g_status, scheduler, guidance, steps])

            def generate_handler(run, text, negative_, seeds_text, steps_, guidance_, scale, sampler):
                from bas.generation.generate import generate_images
                from bas.core.runs import read_run, run_family

                try:
                    out = self.ws.run_path(run or "")
                    prompt_list = [p.strip() for p in (text or "").splitlines() if p.strip()]
                    if not prompt_list:
                        raise BasError('Write a prompt, such as "a photo of <asset0> at the beach" (click a handle to add it).')
                    try:
                        seed_list = [int(s) for s in re.split(r"[,\s]+", seeds_text or "") if s]
                    except ValueError:
                        raise BasError(f"Seeds '{seeds_text}' are not integers; write them as 0,1,2,3.") from None
                    options = {"seeds": seed_list or [0], "steps": required(steps_, int, "Steps", "50"), "lora_scale": required(scale, float, "LoRA scale", "1 (0: handles only)"),
                               "guidance": None if guidance_ in (None, "") else float(guidance_),  # blank: the family's
                               "negative_prompt": negative_ or None, "scheduler": sampler, "device": self.device}
                    info = read_run(out)
                    family = run_family(info)
                    cli = "bas generate " + commands.shell(commands.generate_args(self.ws.relative(out), prompt_list, options, family, info))
                    with self.generating:
                        paths = generate_images(out, prompt_list, **options)
                except BasError as exc:
                    return gr.skip(), gr.skip(), gr.skip(), status_error(exc)
                grid_path = [p for p in paths if p.name.startswith("grid-")]
                singles = [(str(p), caption(p, prompt_list)) for p in paths if p not in grid_path]
                return (str(grid_path[0]) if grid_path else singles[0][0]), singles, cli, f"Wrote {len(singles)} image{'' if len(singles) == 1 else 's'} into {self.ws.relative(paths[0].parent)}."

            generate.click(generate_handler, [g_run, prompts, negative, seeds, steps, guidance, lora_scale, scheduler], [grid, gallery, g_command, g_status], concurrency_limit=1)

            # ---------------------------------------------------------------- Export events
            def export_handler(run, fmt_, name, rank_, preview):
                from bas.exports.export import export_run

                try:
                    out = self.ws.run_path(run or "")
                    read_run(out)
                    if name:
                        check_name(name, "export")
                    dest = self.ws.export_dir(out.name, fmt_)
                    options = {"name": name or None, "rank": int(rank_ or 32), "preview": bool(preview), "overwrite": True}
                    cli = "bas export " + commands.shell(commands.export_args(self.ws.relative(out), fmt_, self.ws.relative(dest), options))
                    with self.generating:
                        written = export_run(out, fmt_, dest, device=self.device, **options)
                    archive = dest.with_suffix(".zip")
                    with io.atomic_path(archive) as tmp:
                        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
                            for path in written:
                                zf.write(path, f"{dest.name}/{path.relative_to(dest).as_posix()}")
                except BasError as exc:
                    return gr.skip(), gr.skip(), gr.skip(), status_error(exc)
                readme = (dest / "README.md").read_text(encoding="utf-8")
                readme = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", readme)  # its preview is a file of the zip, not of this page
                return str(archive), readme, cli, f"Wrote {self.ws.relative(dest)} and {archive.name} ({len(written)} files)."

            export.click(export_handler, [e_run, fmt, e_name, e_rank, e_preview], [e_file, card, e_command, e_status], concurrency_limit=1)

            # ---------------------------------------------------------------- Runs events
            def runs_rows():
                return [[e.name, e.status, self.run_date(e), " ".join((e.info or {}).get("handles", [])), (e.info or {}).get("model", ""), e.steps, e.note]
                        for e in self.run_entries()]

            def refresh_lists():
                finished = self.ws.finished_runs()
                scenes_ = self.ws.scenes()
                return runs_rows(), gr.update(choices=finished), gr.update(choices=finished), gr.update(choices=scenes_), gr.update(choices=scenes_)

            lists = [runs_table, g_run, e_run, x_scene, open_path]
            refresh.click(refresh_lists, None, lists)
            tabs.change(refresh_lists, None, lists)
            demo.load(refresh_lists, None, lists)

            def select_run(evt: gr.SelectData):
                rows = self.run_entries()
                row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
                if row is None or row >= len(rows):
                    return None, "", []
                entry = rows[row]
                report_dir = entry.report  # a run working or interrupted writes it in its staging folder
                # the report's own pictures: a link there could lead to any file of the machine's
                pictures = [str(p) for p in sorted(report_dir.glob("*.png")) if not p.is_symlink()] if report_dir.is_dir() and not report_dir.is_symlink() else []
                return self.ws.relative(entry.path), self.run_details(entry), pictures

            runs_table.select(select_run, None, [r_selected, r_details, report])

            def resume_selected(selected):
                if not selected:
                    return gr.skip(), gr.skip(), "Select an interrupted run first.", gr.skip(), gr.skip()
                try:
                    job = self.resume(self.ws.run_path(selected))
                except BasError as exc:
                    return gr.skip(), gr.skip(), status_error(exc), gr.skip(), gr.skip()
                return job.id, job.shown, f"Resuming {job.out.name}: follow it in the Extract tab.", -1, gr.Tabs(selected="extract")

            r_resume.click(resume_selected, r_selected, [job_id, command, r_status, seen, tabs])

            def stop_selected(selected):
                if not selected:
                    return "Select a queued or running run first."
                try:
                    out = self.ws.run_path(selected)
                except BasError as exc:
                    return status_error(exc)
                job = self.jobs.for_out(out)
                if job is None and runfolder.run_place(out).holder is not None:
                    return say(f"Error: {out.name} is being written by another bas process ({runfolder.run_place(out).holder.describe()}); stop it there (Ctrl-C).")
                return self.stop_job(job)

            r_stop.click(stop_selected, r_selected, r_status)

            def delete_selected(selected, confirmed):
                if not selected:
                    return gr.skip(), gr.skip(), gr.skip(), "Select a run first."
                if not confirmed:
                    return gr.skip(), gr.skip(), gr.skip(), "Nothing deleted."
                try:
                    out = self.ws.run_path(selected)
                    self.jobs.forget(out)
                    self.ws.delete_run(out)
                except BasError as exc:
                    return gr.skip(), gr.skip(), gr.skip(), status_error(exc)
                return None, "Select a run to see its report.", [], f"Deleted {selected}."

            confirmed = gr.Checkbox(False, visible="hidden")
            r_delete.click(delete_selected, [r_selected, confirmed], [r_selected, r_details, report, r_status],
                           js="(selected) => [selected, selected ? confirm('Delete ' + selected + ' and all its files?') : false]").then(refresh_lists, None, lists)
        return demo

    # -- helpers --------------------------------------------------------------------------------------
    def generate_settings(self, run):
        """The Generate tab for the picked run: its handles as chips, a line about it, and its family's
        samplers with the default sampler, guidance and steps bas generate takes for it (FLUX.1-dev: flow-euler,
        3.5 and 50; FLUX.1-schnell: 0 and 4; SD: DDIM, 7.5 and 50)."""
        from bas.core.runs import run_family

        try:
            info = read_run(self.ws.run_path(run))
            sampling = commands.sampling_choices(run_family(info), info)
        except BasError as exc:
            return "", status_error(exc), gr.skip(), gr.skip(), gr.skip()
        buttons = "".join(f'<button class="bas-chip" data-handle="{html.escape(h)}">{html.escape(h)}</button>' for h in info["handles"])
        return (buttons, f"{len(info['handles'])} handles, base model {info['model']}.",
                gr.update(choices=sampling["schedulers"], value=sampling["scheduler"]), gr.update(value=sampling["guidance"]),
                gr.update(value=sampling["steps"]))

    def cleanup(self, values) -> MaskCleanup:
        try:
            return MaskCleanup.from_options(self.cleanup_options(*values))
        except BasError:
            return MaskCleanup()

    @staticmethod
    def optional_plugins() -> tuple[str, ...]:
        return commands.optional_plugins()

    @staticmethod
    def check_not_busy(out: Path) -> None:
        """Refuse a run another process (a `bas run` on the command line) is writing now (the queue
        refuses this server's own, with its state)."""
        holder = runfolder.run_place(out).holder
        if holder is not None and (holder.pid, holder.host) != (os.getpid(), socket.gethostname()):
            raise BasError(f"{out.name} is being written by another bas process ({holder.describe()}); wait for it to finish or choose another run name.")

    def check_not_overwriting(self, config) -> None:
        out = Path(config.out)
        self.jobs.check_free(out)  # first: a run of this server that is running has checkpoints too
        self.check_not_busy(out)
        if config.resume or config.overwrite:
            return
        if complete_checkpoints(out):  # before a finished run in place: `bas run` says the same
            raise BasError(f"{out.name} holds an interrupted run; press Resume to continue it, tick 'Replace a run of that name' to start over, or choose another name.")
        if (out / "run.json").is_file():
            raise BasError(f"{out.name} already holds a finished run; tick 'Replace a run of that name' or choose another run name.")

    def resume(self, out: Path):
        """Queue ``bas run ... --resume`` for the interrupted run for ``out``, wherever its checkpoints
        are (the page's command, or the options its newest checkpoint saved)."""
        self.check_not_busy(out)  # it may have checkpoints already
        if not complete_checkpoints(out):
            if (out / "run.json").is_file():
                raise BasError(f"{out.name} is finished; there is nothing to resume.")
            raise BasError(f"{out.name} has no checkpoint to resume from; start it again.")
        job = self.jobs.for_out(out)
        if job is not None:
            args = [a for a in job.args if a not in ("--overwrite", "--resume")] + ["--resume"]
            text = "\n".join(job.shown.split("\n")[:-1] + [job.shown.split("\n")[-1].replace(" --overwrite", "") + " --resume"])
        else:
            saved = latest_state(out)["config"]
            args = commands.config_args(saved) + ["--resume"]
            text = f"bas run {commands.shell(args)}"
        return self.jobs.submit(args, text)

    def stop_job(self, job) -> str:
        """Stop, wherever the page shows the job: a queued one leaves the queue, a running one saves a checkpoint."""
        if job is None or job.state not in ("queued", "running"):
            return "Nothing to stop: that extraction is not queued or running."
        self.jobs.stop(job)
        return f"Stopping {job.out.name}: it finishes the current step and saves a checkpoint." if job.state == "stopping" else f"Removed {job.out.name} from the queue."

    def form_of(self, job) -> list:
        """The Extract form as it was for ``job`` (after a reload the form shows the run the panel shows);
        "more options" stay as typed, since a command line cannot be split back into fields."""
        try:
            config, names = commands.parse_run(job.args, self.ws)
        except BasError:
            return [gr.skip()] * 18
        o = config.options
        scene = self.ws.relative(o["scene"]) if o.get("scene") else gr.skip()
        optional = set(self.optional_plugins())
        return [scene, Path(config.out).name, config.model or self.model, "full" if "full" in names else "lora",
                config.phase1_steps, config.phase2_steps, config.phase1_lr, commands.format_number(config.phase2_lr) if config.phase2_lr else "",
                o.get("lora_rank", gr.skip()), config.seed, str(config.resolution or ""), config.precision, config.device,
                ", ".join(config.init_tokens), bool(config.background), [n for n in names if n in optional], gr.skip(), bool(config.overwrite)]

    def queue_html(self, current: str | None) -> str:
        """Every job queued or running, each with its Stop button (and Show, for one the panel does not follow)."""
        active = self.jobs.active()
        if not active:
            return ""
        items = []
        for job in active:
            # not the step and loss (the panel shows them): the list, and so its buttons, change only with a job's state
            status = html.escape(job.status(self.jobs.place(job)) if job.state == "queued" else f"{job.out.name}: {job.state} on {job.device}")
            show = "" if job.id == current else f'<button data-job="{job.id}" data-action="follow">Show</button>'
            halt = f'<button data-job="{job.id}" data-action="halt">Stop</button>' if job.state in ("queued", "running") else ""
            items.append(f'<li data-out="{html.escape(job.out.name)}">{status}{show}{halt}</li>')
        return f'<div class="bas-queue"><b>Queue</b> (one extraction at a time per device):<ul>{"".join(items)}</ul></div>'

    @staticmethod
    def loss_frame(job):
        """The curve's points (steps counted across both phases), and a blank point for each phase of the
        run without a step yet: the plot fixes its colours with its first frame, so every phase the run
        will have must be in it (a phase without a colour is never drawn)."""
        import pandas as pd

        offset = {1: 0, 2: job.phase_steps.get(1, 0)}
        phases = sorted(job.phase_steps) or [1, 2]
        rows = [(h["step"] + offset[h["phase"]], h["loss"], h["phase"]) for h in job.history]
        seen = {phase for _, _, phase in rows}
        rows += [(offset[p] + 1 if job.phase_steps else float("nan"), float("nan"), p) for p in phases if p not in seen]
        return pd.DataFrame({"step": pd.Series([r[0] for r in rows], dtype="float64"),
                             "loss": pd.Series([r[1] for r in rows], dtype="float64"),
                             "phase": pd.Series([f"phase {r[2]}" for r in rows], dtype="str")})

    def run_entries(self):
        entries = []
        seen_outs = set()
        for folder in self.ws.run_folders():
            job = self.jobs.for_out(folder)
            entry = self.ws.run_entry(folder, job.state if job else None, job.message if job and job.state in ("failed", "interrupted") else "")
            entry.steps = self.steps_text(entry, job)
            entries.append(entry)
            seen_outs.add(folder.resolve())
        for job in sorted(self.jobs.jobs.values(), key=lambda j: j.created):
            if Path(job.out).resolve() not in seen_outs and job.state != "cancelled":
                entry = self.ws.run_entry(Path(job.out), job.state, job.message)
                entry.steps = self.steps_text(entry, job)
                entries.append(entry)
                seen_outs.add(Path(job.out).resolve())
        return entries

    @staticmethod
    def steps_text(entry, job) -> str:
        if entry.info:
            config = entry.info.get("config", {})
            return f"{config.get('phase1_steps')} + {config.get('phase2_steps')}"
        if job and job.phase_steps:
            return " + ".join(str(n) for n in job.phase_steps.values())
        return ""

    def serve_reports(self, server_app) -> None:
        """``GET report/NAME/FILE``: a run's report (``index.html`` and its pictures) as a page of its own,
        behind the same login as gradio's files, with no script allowed to run in it."""
        import mimetypes

        from fastapi.responses import PlainTextResponse, Response

        login = next(r.dependencies for r in server_app.routes if getattr(r, "path", "") == "/config")  # gradio's login check

        def report_file(name: str, file: str):
            try:
                folder = self.ws.run_entry(self.ws.run_path(f"{RUNS}/{check_name(name, 'run')}")).report.resolve()
                path = self.ws.inside(folder / (file or "index.html"))
                if folder not in path.parents or not path.is_file():
                    raise BasError(f"{name} has no report file {file}; a run writes its report as it finishes (bas run --plugin report).")
            except BasError as exc:
                return PlainTextResponse(f"Error: {exc}", status_code=404)
            # the bytes, not a FileResponse: gradio's compression would not match a streamed file's length
            return Response(path.read_bytes(), media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream",
                            headers={"Content-Security-Policy": "script-src 'none'; object-src 'none'", "X-Content-Type-Options": "nosniff"})

        server_app.add_api_route("/report/{name}/{file:path}", report_file, methods=["GET"], dependencies=login)

    def run_date(self, entry) -> str:
        """When the run was started (its job's time) or last written (its files)."""
        import time

        job = self.jobs.for_out(entry.path)
        if job is not None:
            stamp = job.created
        else:
            place = entry.path / "run.json" if entry.info else entry.staging
            try:
                stamp = place.stat().st_mtime if place is not None else None
            except OSError:
                stamp = None
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp)) if stamp else ""

    def run_details(self, entry) -> str:
        lines = [f"### {entry.name}: {LABEL_STATE.get(entry.status, entry.status)}"]
        if entry.note:
            lines.append(html.escape(entry.note))
        if entry.info:
            info = entry.info
            times = info.get("times", {})
            lines.append(f"Handles {' '.join(f'`{h}`' for h in info['handles'])}, base model `{info['model']}`, "
                         f"weights {info.get('weights') or 'handles only'}, {info.get('resolution')} px, took {times.get('total_s', 0):.0f} s.")
            lines.append(f"Model card: `{self.ws.relative(entry.path)}/README.md`.")
        if (entry.report / "index.html").is_file():
            lines.append(f'<a href="report/{html.escape(entry.name)}/index.html" target="_blank" id="report-link">Open the report</a> '
                         f'(`{self.ws.relative(entry.path)}/report/index.html`)')
        job = self.jobs.for_out(entry.path)
        if job:
            lines.append(f"Command:\n```\n{job.shown}\n```")
        return "\n\n".join(lines)
