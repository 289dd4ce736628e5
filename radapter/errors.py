"""Exceptions with one-line, actionable messages."""

from __future__ import annotations


def first_line(error: BaseException) -> str:
    """An exception's message as one line (its first), or its type's name when it has none."""
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__


class RAdapterError(Exception):
    """Base class for radapter errors that should reach the user as one clear line."""


class ModelLoadError(RAdapterError):
    """A model name, tag or path could not be turned into a model."""


class CheckpointError(RAdapterError):
    """An adapter file is missing, corrupt, or does not fit the model."""


class PlacementError(RAdapterError):
    """No adapter site matched, or a site cannot carry an adapter."""
