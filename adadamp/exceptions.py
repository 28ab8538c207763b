"""Errors that adadamp raises on its own account."""


class ConvergenceError(RuntimeError):
    """The training loss became NaN or infinite.

    Raised by every engine at the update where it happened; the message names
    the update, its batch size and its learning rate, usually the thing to lower.
    """


class MissingExtraError(ImportError):
    """An optional part of adadamp was imported without the packages of its extra.

    The message names the missing packages and the ``pip install`` command
    that adds them.
    """
