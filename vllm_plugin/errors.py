"""The plugin's own exceptions: domain code (streams, memory policies, options) raises these and
knows nothing of HTTP; the routes map them to statuses in one table
(:data:`vllm_plugin.streams.routes.HTTP_STATUS`). No vLLM import.

* :class:`InvalidRequest` — something the client sent cannot be used (400); :class:`InvalidOption`
  names the option (``field``, as data: ``fps``, ``memory.max_keyframes``, ``dtd_criterion``...);
* :class:`NotFound` — :class:`StreamNotFound`, :class:`ModelNotFound` (404);
* :class:`StreamFull` — a stream holds what it may (409);
* :class:`TooLarge` — one request carries more than any retry could take (413);
* :class:`RateLimited` — retry in a moment (429), :class:`TooManyStreams` among them;
* :class:`Unavailable` — the server cannot do it now (503).
"""

from __future__ import annotations


class DTDError(Exception):
    """Base of the plugin's errors. The message is written for the client."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidRequest(DTDError, ValueError):
    """Something the client sent cannot be used. ``field``: the request field to blame, when there
    is one (``frames[3]``, ``timestamps``, ``messages``)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class InvalidOption(InvalidRequest):
    """An option with a value it cannot take. ``field``: the option as the client spelled it."""

    def __init__(self, field: str, message: str):
        super().__init__(message, field)


class NotFound(DTDError):
    """Nothing of that name here."""


class StreamNotFound(NotFound):
    """No such stream: unknown id, closed, or expired after being idle."""


class ModelNotFound(NotFound):
    """The request names a model this server does not serve."""


class StreamFull(DTDError):
    """A stream holds all it may (frames, bytes, video items): it frees frames as questions take them
    and its conversation re-anchors."""


class TooLarge(DTDError):
    """One request carries more than the server takes at once: sending it again will not help."""


class RateLimited(DTDError):
    """Not now: the same request may succeed in a moment (``retry_after_s``)."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooManyStreams(RateLimited):
    """This server (or API-server process) holds as many streams as it may."""


class Unavailable(DTDError):
    """The server cannot do it now (an engine or analysis failure); nothing was changed."""
