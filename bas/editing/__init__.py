"""Local editing by example (``bas edit``, :func:`bas.edit`): :mod:`.edit`."""
