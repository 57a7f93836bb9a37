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

**Plugin API version and stability.** A plugin declares the API it was written for with a
module-level ``BAS_PLUGIN_API = 1`` (on the object its entry point names). bas loads a plugin whose
API is in :data:`SUPPORTED_PLUGIN_APIS` (or that declares none); any other is skipped with a
``Warning:`` naming the plugin, the API it wants and the one bas has, and the run goes on
without it. :data:`PLUGIN_API` goes up when a *stable* hook changes in a way that breaks existing
implementations (a renamed or removed hook or argument, a changed ``register`` or component
contract); adding a hook, an argument (implementations may take a subset) or an optional
component attribute does not change it. Each hook below says whether it is **stable** (kept
within an API version) or **provisional** (may change in a minor release of bas, said in
CHANGELOG.md). ``bas.testing`` gives plugin authors fixtures (a tiny model per family, a scene, a
CLI runner) to test against.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("bas")
hookimpl = pluggy.HookimplMarker("bas")

PLUGIN_API = 1
"""The plugin API this bas implements."""
SUPPORTED_PLUGIN_APIS = frozenset({1})
"""The plugin APIs whose plugins this bas loads (a plugin's ``BAS_PLUGIN_API``)."""


@hookspec
def bas_run_options():
    """Return a list of ``click.Option`` objects to add to ``bas run`` (and the Python API).

    Their values reach components through ``config.options[option.name]``; the Python API takes
    them as keyword arguments of :func:`bas.extract` with the option's default otherwise.
    ``bas run --plugin NAME --help`` lists the options a plugin adds.

    **Stable** (plugin API 1).
    """


@hookspec
def bas_register_commands(cli):
    """Add commands to the ``bas`` command group ``cli`` (a ``click.Group``).

    **Stable** (plugin API 1).
    """


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

    **Stable** (plugin API 1).
    """


@hookspec
def bas_register_weight_strategies(register):
    """Register weight strategies: ``register(name, factory)``.

    ``factory(config)`` returns a :class:`bas.core.components.WeightStrategy`: which weights
    phase 2 trains (LoRA adapters, the full UNet and text encoder, ...), its default learning
    rate, how they are saved into the output folder and how they are applied to a pipeline for
    generation.  Exactly one is used per run: the one from a plugin named with ``--plugin``,
    else the default.

    **Provisional**: the WeightStrategy contract may still grow what it must provide (plugin API 1).
    """


@hookspec
def bas_register_loss_terms(register):
    """Register loss terms: ``register(name, factory)``.

    ``factory(config)`` returns a :class:`bas.core.components.LossTerm` (or ``None`` to stay out
    of this run).  Every term of every enabled plugin is added, each times its ``weight``.  A term
    may prepare the model in ``setup(run)`` (for example install attention capture) and undo it in
    ``teardown(run)``; its ``__call__(batch)`` is called once per training step.

    **Stable** (plugin API 1).
    """


@hookspec
def bas_register_optimizers(register):
    """Register optimizers: ``register(name, factory)``; ``--optimizer NAME`` picks one.

    ``factory(param_groups, config)`` returns a ``torch.optim.Optimizer``.  A factory may carry
    ``factory.check(config, device)``, which the run calls before any model loads to refuse, with a
    :class:`bas.core.errors.BasError`, a device or installation the optimizer cannot run on
    (``adamw8bit``: CUDA and an importable bitsandbytes), so that such a run fails in a second
    rather than after the model loaded.

    **Stable** (plugin API 1).
    """


@hookspec
def bas_register_samplers(register):
    """Register concept samplers: ``register(name, factory)``; the default plugin's is used
    unless a plugin named with ``--plugin`` provides one.

    ``factory(config, num_concepts)`` returns a callable ``sample(rng) -> list[int]`` giving the
    concepts (in prompt order) that one training step shows.  ``rng`` is a seeded
    ``random.Random``.  With no sampler at all, every step shows all concepts.

    **Stable** (plugin API 1).
    """


@hookspec
def bas_register_model_families(register):
    """Register model families: ``register(name, factory)``; ``factory()`` returns a
    :class:`bas.core.family.ModelFamily`.

    A family is what bas needs to know about one model architecture.  The built-in ``sd``
    (Stable Diffusion 1.x/2.x), ``sdxl`` and ``flux`` (FLUX.1) are plugins like any other.  A run's family is the
    one whose ``recognises(model_index)`` accepts ``--model``'s ``model_index.json`` (for a hub
    id only that file is fetched), or the one named with ``--family NAME``; it is stored in
    ``run.json`` and used again by ``bas generate``, ``bas edit`` and ``bas export``.  The loop
    never asks which family it runs; it calls these verbs:

    - ``load(model, plan=None)``: the parts, as :class:`bas.core.family.Components`: every text encoder
      with its tokenizer (``TextEncoder``, in pipeline order), the denoiser, the VAE, the
      training noise scheduler.  bas adds one new token per concept to *every* tokenizer and
      one trainable row per encoder (``HandleEmbedding``), so each tokenizer must support
      ``add_tokens`` and each encoder ``get/set_input_embeddings``.  A tokenizer may be
      smaller than its embedding matrix (T5 pads its vocabulary): the handle rows then take
      the ids the tokenizer gives them.  A run passes a :class:`bas.core.family.LoadPlan`
      (device, compute dtype, ``--quantize``): a family that lists ``quantizations`` loads its
      frozen base quantised where asked; readers of finished runs pass none.
      ``native_resolution``, ``check_resolution`` (before any model loads),
      ``memory_defaults(device, strategy)`` (run options used where the user chose none:
      ``gradient_checkpointing``, ``optimizer``, ``quantize``), ``check_run(device, strategy,
      quantize)`` (refuses ``refused_strategies`` and a quantisation the family does not list or the
      strategy trains through, before any model loads), ``check_quantization(quantize, device)``
      (the family's own quantising library: what the device or installation cannot load; bitsandbytes
      needs CUDA), ``prediction_type`` (run.json's word for the objective).
    - ``conditioning(components, input_ids, size)``: tokenized prompts (one tensor per
      encoder, each padded to its tokenizer's ``model_max_length``) to a
      :class:`bas.core.family.Conditioning`: ``hidden_states``, the sequence the denoiser
      attends to, and ``extra``, every other batch-first input (pooled embeddings, SDXL's
      ``time_ids`` from an :class:`bas.core.family.ImageSize`).  ``sequence_encoder`` says
      whose token positions index that sequence.  ``unconditional`` is guidance's empty branch.
    - ``scale_latents``/``unscale_latents`` (VAE scaling and shift), ``training_noise(scheduler,
      latents, generator)`` -> ``(noise, timesteps, noisy, target)`` (the objective: epsilon,
      v-prediction, or a flow-matching velocity), ``predict(denoiser, latents, t, cond)``
      (spatial in and out, passing ``cond.hidden_states`` itself as ``encoder_hidden_states``),
      ``guided_prediction`` (classifier-free guidance by default), ``noised(scheduler, latents,
      noise, t)`` (a timestep's noisy latents, for the report's maps and editing),
      ``probe_timestep``, ``sampling_scheduler`` (validation's: DDIM for DDPM-type models) and
      ``set_timesteps(scheduler, steps, device, latents)`` (a flow-matching family shifts its
      schedule by the image size).
    - ``attention_layers(components, latent_size)`` -> ``{name: (module, map side)}``,
      ``attention_resolution(available, latent_size, requested)`` (default: a quarter of the
      latent side snapped to a side the model has, at least 4), ``capture_processor(store)``:
      the processor installed on the chosen layers that records fp32 probabilities ``(B, Q, T)``
      of image queries over text tokens.  Maps finer than the loss's side are area-averaged.
    - ``pipeline_class`` (the diffusers pipeline that generates and takes ``load_lora_weights``),
      ``load_pipeline``, ``pipeline_from_components``, ``pipeline_text_encoders``,
      ``prompt_conditioning`` (sampling and ``bas edit`` through the pipeline's own prompt
      encoding), ``schedulers``/``default_scheduler``/``default_guidance``/``default_steps`` (what
      ``bas generate`` samples with) and ``variant_sampling`` (other defaults for a variant, FLUX.1-schnell's 4 steps),
      ``check_sampling`` (sampling options the pipeline ignores), ``lora_targets`` (peft target names,
      or a regular expression, per pipeline component; ``lora_target(component, module)`` narrows them
      to the layers the family's conditioning reads, as SDXL's leaves out text encoder 1's last layer),
      ``lora_scale_argument``, and ``tiny_pipeline`` (``bas tiny-model --family NAME``).
    - files: ``textual_inversion`` (one handle's file for diffusers, from its rows in every
      encoder), ``webui_embedding`` (AUTOMATIC1111/ComfyUI's layout, SDXL's ``clip_l``/``clip_g``),
      ``textual_inversion_code`` (the model card's loading lines), ``kohya_prefixes`` (per
      component: ``lora_unet_``, ``lora_te1_``, ...), ``kohya_base`` (the base model as kohya's
      metadata names it), ``kohya_layers`` (the LoRA's layers as kohya names and shapes them:
      FLUX fuses q/k/v) and ``export_formats``.  ``handles.safetensors`` keys the first
      encoder's rows by the bare token and another encoder's by ``"<component>.<token>"``.

    **A transformer family**: the built-in ``flux`` family (:mod:`bas.plugins.flux`) is the worked
    example, and SD3 would take the same verbs:

    - several tokenizers of different kinds (CLIP's BPE and T5's SentencePiece, ``text_encoder``
      and ``text_encoder_2``, SD3 a third): each is a ``TextEncoder`` with its own max length;
      ``add_tokens`` works on both kinds and the handle rows follow the ids each tokenizer
      gives (T5's tokenizer has 32100 tokens for 32128 rows).  ``sequence_encoder`` names T5,
      whose tokens the joint attention reads; CLIP contributes only its pooled output, in
      ``extra`` (``pooled_projections``).  A CLIP config from before 2023 (``eos_token_id: 2``)
      pools the highest token id, a handle once handles exist: the family points it at the
      end of text, as SDXL's does for its second encoder.
    - packed latents: ``predict`` packs the spatial latents into 2x2 patch tokens, calls the
      transformer (position ids, ``guidance``, ``joint_attention_kwargs``) and unpacks its
      output, so masks and the masked loss stay spatial; the attention maps come out at the
      packed grid (latent side / 2), which ``attention_layers`` declares as their side, and
      ``attention_resolution`` picks a quarter of the latent side, which the loss averages
      them down to.
    - the objective: ``training_noise`` draws logit-normal flow times shifted by the
      scheduler's rule, noises ``(1 - s) x + s noise`` and returns the velocity ``noise - x``;
      ``scale_latents`` applies the VAE's shift and scale factors; ``noised``,
      ``sampling_scheduler`` and ``set_timesteps`` are flow matching's.
    - maps from joint image-text attention: ``capture_processor`` returns a processor for the
      transformer's attention modules that keeps the fused kernel for the output and computes,
      beside it, the image queries' probabilities over the text keys (the text part of the
      joint sequence, first in FLUX), computed on every forward so that gradient
      checkpointing's recomputation matches.
    - LoRA on the transformer (``lora_targets`` a regular expression over its blocks' layers),
      ``lora_scale_argument = "joint_attention_kwargs"``, ``denoiser_name = "transformer"``;
      ``kohya_prefixes`` as kohya's FLUX scripts name them (``lora_unet_``, ``lora_te1_`` for
      CLIP-L) and ``kohya_layers`` to BFL's fused layers.  T5 takes no LoRA (it is quantised and
      trains only its handle rows), so :mod:`bas.exports.formats` needs no rule for T5 module paths
      (they have no ``text_model.`` level); a family that adapts T5 must add one.
    - quantised loading: ``load`` loads the frozen transformer and T5 quantised
      (``quantizations``: bitsandbytes nf4 and int8) when the plan asks, which ``check_run``
      allows only with a strategy that freezes the base and ``check_quantization`` only on CUDA
      with bitsandbytes importable.
    - guidance-distilled sampling: ``unconditional`` returns None and ``guided_prediction``
      makes one forward pass with the guidance embedding instead of two.

    **Provisional**: the ModelFamily protocol grows with each family (plugin API 1).
    """


@hookspec(firstresult=True)
def bas_model_path(name):
    """Return the local folder (a ``str`` or ``Path``) of the model named ``name``, or ``None`` when the
    name is not this plugin's.

    Every place that takes a model (``--model``, :func:`bas.extract`, the families' loaders) asks
    this hook first; the first folder returned wins, and a name no plugin knows is a hub id or a
    folder.  The built-in ``bas-mini`` plugin maps ``bas-mini`` to the model shipped with bas, so
    core never imports a particular model.

    **Provisional** (plugin API 1).
    """


@hookspec
def bas_model_settings(name):
    """Return the ``bas run`` options recommended for the model named ``name`` (a dict, option names
    with underscores: ``{"phase1_lr": 2e-3, "attention_loss_weight": 0.1}``), or ``None`` when the name is
    not this plugin's.

    A model much smaller or larger than Stable Diffusion moves at other learning rates and steps than
    the paper's, which are ``bas run``'s defaults.  Every way to start a run (``bas run``, ``bas batch``,
    ``bas ui``, :func:`bas.extract`) uses these settings for the options the user left out and records
    them in ``run.json`` (``model_settings``); ``bas run`` and ``bas batch`` say so in one line, the page
    starts its fields at them.  An option the user gave always wins, and
    ``--no-model-defaults`` turns them off.  A setting of a plugin that is not on (the attention loss
    turned off) is skipped.  ``"plugins"`` (a list of names) are plugins the model's runs turn on
    (:func:`bas.core.api.run_plugins`), except one the user named or turned off (``--plugin no:NAME``) and
    one the user's weight strategy cannot run (``LossTerm.needs_adapters`` under ``--plugin full``); their
    options may then be recommended too.  The first plugin that knows the name wins.  The built-in ``bas-mini`` plugin
    gives bas-mini's operating point, chosen on its tuning scenes (``benchmarks/README.md``).

    **Provisional** (plugin API 1).
    """


@hookspec
def bas_write_run_files(run, out, info):
    """Write files a finished run keeps besides its weights into ``out``, and return their names
    relative to ``out`` (a list).

    Called once training is done and the handles and weights are saved, before ``run.json``:
    ``run`` is the :class:`bas.core.training.Run`, ``out`` its staging folder (``run.config.out``
    is where it will appear) and ``info`` what ``run.json`` will hold so far.  The names are added
    to ``info["files"]`` and the checksums.  Write each file atomically (:mod:`bas.core.io`).
    The built-in ``model-card`` plugin writes the textual-inversion files and ``README.md``
    (:func:`bas.exports.export.write_run_exports`).

    **Provisional** (plugin API 1).
    """


@hookspec
def bas_register_observers(register):
    """Register step and run observers: ``register(name, factory)``.

    ``factory(config)`` returns an object (or ``None``) with any of ``on_run_start(run)``,
    ``on_phase_start(run, phase)``, ``on_step(run, step)``, ``on_phase_end(run, phase)``,
    ``on_run_end(run)``, ``on_run_failed(run, error)``.  Logging, progress bars, checkpoints and
    validation images are observers.  While a run works, ``run.out`` is its staging folder beside
    ``--out`` (``run.config.out``): what an observer writes there, up to and including
    ``on_run_end`` (training done, the output not yet written), becomes part of the run when it
    is complete, and is never mixed into an older run.  ``on_run_failed`` is called instead of
    ``on_run_end`` when the run stops with an exception (close files and progress bars there).
    ``step`` is a :class:`bas.core.components.StepRecord`.  An observer with
    ``on_images(run, phase, step, images)`` receives the validation samples that the ``report``
    plugin makes, ``{prompt: [PIL images, one per seed]}`` (the ``tensorboard`` plugin logs them).
    Observers run inside the step loop: keep ``on_step`` cheap.

    **Stable** (plugin API 1).
    """


@hookspec
def bas_register_evaluators(register):
    """Register evaluators for ``bas eval``: ``register(name, factory)``; ``--evaluator NAME`` picks them.

    ``factory(config)`` (``config`` is a :class:`bas.core.evaluation.EvalConfig`; plugin options in
    ``config.options``) returns a :class:`bas.core.evaluation.Evaluator`, made once per ``bas eval``
    and cheap to make: models load in its ``load(device)``, called once after every check passed.
    ``bas eval`` calls ``check(run)`` for every run first (raise :class:`bas.core.errors.BasError`
    for what the user must fix: missing class words, a run it cannot measure), then
    ``score(run, samples)`` once per run: ``run`` is a :class:`bas.core.evaluation.EvalRun` (its
    run.json, handles, class words, and ``load_inputs()``: the image and masks it learned from) and
    ``samples`` its generated images (:class:`bas.core.evaluation.Sample`: image, prompt, seed, the
    handles the prompt names).  ``score`` yields one dict per sample, in order: a float per
    :class:`bas.core.evaluation.Metric` the evaluator declares in ``metrics`` and that applies to the
    image (leave a metric out where it does not apply), and any other keys as per-image details.
    ``bas eval`` averages each metric per run with a 95% bootstrap interval.

    Without ``--evaluator``, an evaluator is used for the runs for which its factory's
    ``default_for(run_info)`` (a class method; absent: always) is true.  An evaluator may offer prompt
    template sets in ``templates`` (``{name: ["a photo of {}", ...]}``) for ``--templates NAME``,
    and prefer one with ``default_templates``.

    **Provisional**: the Evaluator contract is new (plugin API 1).
    """


@hookspec
def bas_eval_options():
    """Return a list of ``click.Option`` objects to add to ``bas eval`` (such as ``--clip-model``).

    Their values reach evaluator factories through ``config.options[option.name]``; the Python API
    (:func:`bas.evaluate`) takes them as keyword arguments, with the option's default otherwise.

    **Stable** (plugin API 1).
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

    **Provisional**: the executor contract is new (plugin API 1).
    """


@hookspec
def bas_batch_options():
    """Return a list of ``click.Option`` objects to add to ``bas batch`` (and :func:`bas.batch`).

    Executors take their options this way (``--workers``, ``--ray-address``); the values reach
    the executor's factory in ``config.options[option.name]``.  An option of an executor other
    than the chosen one is refused unless it has its default value.

    **Provisional, with the executors** (plugin API 1).
    """
