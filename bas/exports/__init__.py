"""Exports of a finished run (``bas export``, :func:`bas.export`): :mod:`.export` writes diffusers,
AUTOMATIC1111 and ComfyUI layouts and the model card; :mod:`.formats` the LoRA and pipeline files
other tools and older library versions read.

Named ``exports`` (the nouns) because :func:`bas.export` is the function."""
