"""bas: extract several concepts from one image into a text-to-image diffusion model (Break-A-Scene)."""

__version__ = "0.1.0"

from bas.core.hookspecs import hookimpl  # noqa: E402


def extract(*args, **kwargs):
    """Extract concepts from one image; see :func:`bas.core.api.extract`."""
    from bas.core.api import extract as _extract

    return _extract(*args, **kwargs)


def generate(*args, **kwargs):
    """Generate images with a run's handles; see :func:`bas.core.api.generate`."""
    from bas.core.api import generate as _generate

    return _generate(*args, **kwargs)


__all__ = ["extract", "generate", "hookimpl", "__version__"]
