"""Errors a user can act on, each with the exit code the CLI returns for it."""

from __future__ import annotations


class OnnxoptError(Exception):
    """Base class: one clear message, no traceback needed to understand it."""

    exit_code = 2


class InputError(OnnxoptError):
    """Bad input or usage: unreadable model, bad data, unknown pass or option."""

    exit_code = 2


class PassError(OnnxoptError):
    """A pass raised or broke a contract; the message names the pass."""

    exit_code = 2


class ValidationFailed(OnnxoptError):
    """The rewritten model left the tolerance against the original."""

    exit_code = 1
