"""Exceptions of the index store; each carries a one-line message meant for the user."""

from __future__ import annotations

from radapter.errors import RAdapterError


class IndexStoreError(RAdapterError):
    """Base class: something about an index folder or a build is wrong."""


class IndexNotFoundError(IndexStoreError):
    """The folder holds no (complete) index."""


class IndexMismatchError(IndexStoreError):
    """A query was made with another base model, adapter or alpha than the index was built with."""


class IndexBuildError(IndexStoreError):
    """A build or an incremental add could not be carried out (the previous index is intact)."""


class CollectionError(IndexStoreError):
    """A collection spec cannot be read (unknown kind, missing file, no items)."""
