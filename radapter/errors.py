"""Exceptions with one-line, actionable messages."""

from __future__ import annotations


class RAdapterError(Exception):
    """Base class for radapter errors that should reach the user as one clear line."""


class ModelLoadError(RAdapterError):
    """A model name, tag or path could not be turned into a model."""


class CheckpointError(RAdapterError):
    """An adapter file is missing, corrupt, or does not fit the model."""


class PlacementError(RAdapterError):
    """No adapter site matched, or a site cannot carry an adapter."""
