"""ASGI middleware adding the request's DTD stats as a response header.

    --middleware vllm_plugin.entrypoints.middleware.DTDStatsMiddleware   (python -m vllm_plugin.serve adds it)

Header ``x-dtd-stats``: ``{"videos": [{"total", "kept", "drop_ratio", "tokens_per_step",
"kept_per_step", "mask_sha256"}, ...]}`` for every request whose prompt had videos processed with
DTD.
"""

from __future__ import annotations

from vllm_plugin.entrypoints import request_stats

HEADER = b"x-dtd-stats"


class DTDStatsMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        holder: list = []
        token = request_stats.REQUEST_STATS.set(holder)

        async def send_with_stats(message):
            if message.get("type") == "http.response.start" and holder:
                headers = list(message.get("headers", [])) + [(HEADER, request_stats.header_value(holder).encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_stats)
        finally:
            request_stats.REQUEST_STATS.reset(token)
