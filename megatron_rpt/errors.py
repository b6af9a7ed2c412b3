"""The one base class of errors a user can fix: the command lines print them as one line.

Owns :class:`UserError`. A bad config value, a damaged checkpoint, an existing output directory
or a run that diverged is not a bug in megatron-rpt, so its message (the condition, both values
and the fix) is the whole report: ``python -m megatron_rpt.trainer``, ``python -m megatron_rpt.eval``
and the tools print ``error: <message>`` and exit non-zero instead of a traceback. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user gave (config, flag, file, data) or the run's own state is unusable."""


class TrainingDiverged(UserError):
    """The loss or gradient norm stopped being finite; the run stopped without saving that state."""
