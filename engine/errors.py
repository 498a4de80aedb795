"""Errors the engine raises; each message names the problem for a person.

Every public engine call raises only these (or lets a programming error
through); the worker turns them into `EngineError` events.
"""

from __future__ import annotations


class KVScopeError(Exception):
    """Base class: a clear, user-facing problem; the engine stays usable."""


class ModelLoadError(KVScopeError):
    """The model folder or hub id could not be loaded."""


class UnsupportedModelError(KVScopeError):
    """The operation needs plain attention caches with a composable RoPE."""


class InvalidRequestError(KVScopeError):
    """Bad arguments: empty prompt, span out of range, unknown session..."""


class CancelledError(KVScopeError):
    """A generation or prefill was cancelled between steps."""


class SegmentFileError(KVScopeError):
    """A segment or session file is corrupt, tampered or for another model."""


class MemoryBudgetError(KVScopeError):
    """The cache memory budget would be exceeded."""


class BusyError(KVScopeError):
    """The session is generating; the operation was refused."""
