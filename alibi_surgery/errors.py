"""The exception types the CLI turns into one line on stderr and a non-zero exit status.

* :class:`UsageError`: bad input (a path, a model, a prompt, an option): exit status 2.
* :class:`WriteError`: a file or directory could not be written (permissions, a full disk, a file-size limit):
  exit status 1. The message names the path; in training it also names the newest complete checkpoint.
* :class:`RankFailed`: one rank of a distributed run (``torchrun``) failed; every rank raises it, naming the rank and
  its error: exit status 1.

A run that stops part-way (a write failure or Ctrl-C during ``repair``) carries ``last_checkpoint`` (a path or None)
on the exception, set by :func:`mark_resumable`; the CLI then names the ``--resume`` command that continues it.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input from the user: a path, a model, a prompt, an option. The message is one line and names the problem."""


class WriteError(RuntimeError):
    """Output could not be written. The message is one line: what was being written, the path, and the OS's reason."""


class RankFailed(RuntimeError):
    """A rank of a distributed run failed (:func:`~alibi_surgery.distributed.rank_guard`). One line: what failed,
    on which rank of how many, and that rank's error."""


def mark_resumable(exc: BaseException, last_checkpoint) -> BaseException:
    """Record on ``exc`` that the run can continue with ``--resume`` (from ``last_checkpoint``, None: from the
    start). Returns ``exc`` so that ``raise mark_resumable(exc, ckpt)`` reads naturally."""
    exc.last_checkpoint = last_checkpoint
    return exc
