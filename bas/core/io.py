"""Atomic output: every final name appears only once its content is complete.

Files and folders are written under a temporary name in the same directory and then renamed with
``os.replace``, which is atomic on POSIX and Windows, so an interrupted run never leaves a
truncated file under a name a user or a loader would trust.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file


@contextlib.contextmanager
def atomic_path(final: Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; on success rename it to ``final``.

    On an exception the temporary is removed and ``final`` keeps whatever it held before.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    # mkstemp/mkdtemp create owner-only entries; give the final ones the usual permissions
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, (0o777 if directory else 0o666) & ~umask)
        if directory:
            if final.exists():
                # Move the old folder aside first: a directory cannot be replaced in one rename.
                old = final.with_name(f".{final.name}.old")
                if old.exists():
                    shutil.rmtree(old)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
        else:
            os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def save_image(path: Path, image) -> None:
    """Save a PIL image atomically; the format comes from the final name's suffix."""
    with atomic_path(path) as tmp:
        image.save(tmp, format=Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG"))
