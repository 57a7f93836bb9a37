"""The command line of the schedule (:mod:`bas.core.training`): ``bas run`` and ``bas masks``, in :mod:`.command`.

The schedule itself is core; this package is what turns a command line into its config."""
