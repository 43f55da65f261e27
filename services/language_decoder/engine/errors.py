"""Errors the engine raises to its caller; the decoder servicer maps each to a gRPC status."""

from __future__ import annotations


class EngineError(RuntimeError):
    """Base class of everything the engine raises on purpose."""


class QueueFull(EngineError):
    """The admission queue is full: answer RESOURCE_EXHAUSTED (the client may retry later)."""


class PromptTooLong(EngineError, ValueError):
    """The prompt does not fit the model context (`max_model_len`): answer INVALID_ARGUMENT."""


class RequestFailed(EngineError):
    """The model step carrying this request failed; the request was dropped and its memory freed."""


class EngineClosed(EngineError):
    """The engine was shut down before or while the request ran: answer UNAVAILABLE."""
