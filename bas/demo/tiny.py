"""Tiny random pipelines, built and saved offline: tests, ``bas tiny-model`` and ``bas demo --model`` use them.

Each model family builds its own (``ModelFamily.tiny_pipeline``: the ``sd`` family's has SD 2.x's
structure, the ``sdxl`` family's SDXL's) at a size that trains in milliseconds per step on a CPU;
they show plumbing, not fidelity.  This module writes the byte-level BPE vocabulary their
tokenizers share (whole-word tokens for a few dozen words, so prompts and ``--init-token`` behave
as with a real CLIP vocabulary) and saves a family's tiny pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

from bas.core import io
from bas.core.errors import BasError

# Words that become single tokens, so prompts and --init-token behave like a real CLIP vocabulary.
WORDS = (
    "a an the of and at in on with photo picture image object thing toy animal person dog cat bird bear "
    "chicken creature ball cube box circle square triangle star red green blue yellow orange purple pink "
    "white black grey brown striped dotted beach snow forest city background sitting standing big small"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-unicode table (from the GPT-2/CLIP BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The pieces CLIP's BPE makes of ``word`` with merge ``ranks`` (lowest rank merges first)."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pair = min(zip(pieces, pieces[1:]), key=lambda p: ranks.get(p, float("inf")))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(pieces):
            if i < len(pieces) - 1 and (pieces[i], pieces[i + 1]) == pair:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def write_tokenizer(directory: Path, words=WORDS) -> None:
    """vocab.json + merges.txt of a small CLIP BPE: every byte, and whole-word tokens for ``words``."""
    chars = list(_bytes_to_unicode().values())
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for piece in pieces[1:]:
            merge = f"{left} {piece}"
            left = left + piece
            if merge not in merges:
                merges.append(merge)
            if left not in vocab:
                vocab.append(left)
    for word in words:  # a later word's merges can split an earlier one: join what the BPE leaves, in order
        pieces = _bpe(word, {tuple(m.split()): i for i, m in enumerate(merges)})
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in vocab:
                vocab.append(pieces[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def build_tiny_pipeline(seed: int = 0, prediction_type: str = "epsilon", sample_size: int = 16, family=None):
    """A tiny random pipeline in memory, ``family``'s (a :class:`bas.core.family.ModelFamily`), else the
    default family's (Stable Diffusion's layout); ``sample_size`` is the latent side (x8 for pixels)."""
    return resolve_tiny_family(family).tiny_pipeline(seed, prediction_type, sample_size)


def resolve_tiny_family(family):
    if family is not None:
        return family
    from bas.core.family import default_family
    from bas.core.plugins import Plugins

    return default_family(Plugins())


def check_model_target(directory: Path, overwrite: bool) -> None:
    """Where ``save_tiny_model`` may write, with the guards of ``bas run --out``: never the root, home
    or current folder, a file or one of bas's own names (:func:`bas.core.runfolder.check_target`); a
    folder that holds anything is replaced only when it is a model folder (``model_index.json``) and
    ``overwrite`` is given, never a folder of something else."""
    from bas.core.runfolder import check_target

    check_target(directory, kind="model", option="DIRECTORY")
    directory = Path(directory)
    if directory.is_symlink():
        raise BasError(
            f"DIRECTORY {directory} is a link; bas tiny-model replaces its folder as a whole, so pass the folder it points to or a new one."
        )
    if not directory.is_dir() or not any(directory.iterdir()):
        return
    if not (directory / "model_index.json").is_file():
        raise BasError(
            f"DIRECTORY {directory} holds files and is not a model folder (it has no model_index.json), and bas tiny-model "
            "replaces its folder as a whole; choose a new or empty folder."
        )
    if not overwrite:
        raise BasError(f"DIRECTORY {directory} already holds a model; pass --overwrite to replace it, or choose another folder.")


def save_tiny_model(directory: Path, seed: int = 0, prediction_type: str = "epsilon", family=None, overwrite: bool = False) -> Path:
    """Write a tiny pipeline in diffusers format (safetensors) to ``directory``, atomically: ``family``'s,
    else the default family's.  An existing model there is replaced only with ``overwrite``, anything
    else never (:func:`check_model_target`)."""
    from bas.exports.formats import save_pipeline

    check_model_target(directory, overwrite)
    pipe = build_tiny_pipeline(seed=seed, prediction_type=prediction_type, family=family)
    directory = Path(directory)
    with io.atomic_path(directory, directory=True) as tmp:
        save_pipeline(pipe, tmp)  # loadable by transformers 4.x too
    return directory
