"""The kernel client the tests execute notebooks with (:func:`conftest.run_notebook`): jupyter_client's
asyncio client, whose channels wait for a message in slices of at most :data:`SLICE_S`.

Why: a headless run of notebook 04 sat idle for ~600 s (the per-cell timeout) twice in fresh-clone CI
runs, then went on and passed. Read from py-spy (every kernel thread idle, nbclient in its event loop) and
nbclient's code (one ``poll(600 s)`` on the shell socket per cell; at the timeout pyzmq polls once more with 0
and nbclient raises only if that finds nothing): the kernel had answered and the poll missed the socket's
wake-up (libzmq signals readiness by an edge of the socket's fd; which operation consumed it was not found).
Each slice here is a fresh poll, which reads the socket's events first: a missed wake-up costs at most one
slice, and a timeout still raises :class:`queue.Empty` when it is due."""

from __future__ import annotations

import math
import time
from queue import Empty

from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.channels import AsyncZMQSocketChannel
from jupyter_client.manager import AsyncKernelManager
from traitlets import DottedObjectName, Type

SLICE_S = 1.0


class SlicedChannel(AsyncZMQSocketChannel):
    """An asyncio channel whose ``get_msg(timeout)`` polls the socket afresh every :data:`SLICE_S`."""

    async def get_msg(self, timeout: float | None = None):  # type: ignore[override]
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = SLICE_S if deadline is None else min(SLICE_S, max(0.0, deadline - time.monotonic()))
            if await self.socket.poll(math.ceil(left * 1000)):
                return await self._recv()
            if deadline is not None and time.monotonic() >= deadline:
                raise Empty


class SlicedKernelClient(AsyncKernelClient):
    shell_channel_class = Type(SlicedChannel)  # type: ignore[assignment]
    iopub_channel_class = Type(SlicedChannel)  # type: ignore[assignment]


class SlicedKernelManager(AsyncKernelManager):
    """nbclient's ``kernel_manager_class``: its clients are :class:`SlicedKernelClient`."""

    client_class = DottedObjectName(f"{__name__}.SlicedKernelClient")
    client_factory = Type(SlicedKernelClient, klass=AsyncKernelClient)
