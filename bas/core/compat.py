"""Where the supported versions of diffusers, transformers and peft differ, and what bas does about it.

bas supports a range of each library (``pyproject.toml``), tested at both ends: the newest with the
whole suite, the oldest (diffusers 0.30.3, transformers 4.44.2, peft 0.12.0) with the tests marked
``old_stack``. Every difference between them that bas's own code meets is absorbed here, so the rest
of bas is written once against one behaviour.
"""

from __future__ import annotations

from pathlib import Path

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def load_lora_folder(pipe, folder: Path) -> None:
    """``pipe.load_lora_weights`` of a folder bas wrote. diffusers before 0.31 refuses a folder without
    ``weight_name`` when ``HF_HUB_OFFLINE`` is set; naming the file works in every version."""
    pipe.load_lora_weights(str(folder), weight_name=LORA_WEIGHT_NAME)


def sentencepiece_model_class():
    """SentencePiece's ``ModelProto`` message class. sentencepiece and transformers 4.x each ship a
    generated module for ``sentencepiece_model.proto``, and protobuf refuses to register the file
    twice: use the one already registered, else register sentencepiece's."""
    from google.protobuf import descriptor_pool, message_factory

    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName("sentencepiece_model.proto")
    except KeyError:
        from sentencepiece import sentencepiece_model_pb2

        return sentencepiece_model_pb2.ModelProto
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("sentencepiece.ModelProto"))


def diffusers_dtype(dtype) -> dict:
    """The ``from_pretrained`` argument that sets a diffusers model's or pipeline's dtype: ``dtype`` where
    diffusers has it (it deprecates ``torch_dtype`` there), ``torch_dtype`` before."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else {"torch_dtype": dtype}


def transformers_dtype(dtype) -> dict:
    """The ``from_pretrained`` argument that sets a transformers model's dtype: ``dtype`` from 4.56,
    ``torch_dtype`` before."""
    import transformers
    from packaging.version import Version

    return {"dtype": dtype} if Version(transformers.__version__) >= Version("4.56") else {"torch_dtype": dtype}


def resize_token_embeddings(model, size: int) -> None:
    """``model.resize_token_embeddings(size)`` with the new rows left as they come (bas overwrites them):
    ``mean_resizing=False`` where transformers has it (4.46 on; it would otherwise spend time on a
    covariance of the whole matrix), nothing before, where new rows were never mean-initialised."""
    import inspect

    if "mean_resizing" in inspect.signature(model.resize_token_embeddings).parameters:
        model.resize_token_embeddings(size, mean_resizing=False)
    else:
        model.resize_token_embeddings(size)


def quiet_libraries() -> None:
    """Library chatter (deprecation notes, load bars) drowns bas's own progress and errors: the command line and
    batch workers silence it."""
    import logging
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    diffusers_logging.set_verbosity_error()
    for name in ("bitsandbytes", "transformers", "diffusers", "peft", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.formatwarning = lambda message, category, *a, **k: f"Warning: {message}\n"
