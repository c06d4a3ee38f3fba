"""Streams under several API-server processes (``--api-server-count N``, or ``--data-parallel-size
N``, which starts N API servers by default).

vLLM's API-server processes all accept connections on the same port, so consecutive requests of
one client land on any of them, while a stream's frames and conversation live in the process
that opened it. Design: the owner process is part of the stream id (``strm-<index>-<random>``);
every process also serves the same app on a private Unix socket (a directory only this user can
enter), and :class:`StreamForwarder`, an ASGI middleware in front of the app, forwards a stream
request that reached the wrong process to its owner over that socket, streaming the answer back
(SSE included) and closing the forwarded request when the client hangs up (the owner then aborts
the generation as for a direct client). One process: no socket, nothing forwarded.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from vllm_plugin import settings
from vllm_plugin.streams.session import stream_owner

if TYPE_CHECKING:
    import uvicorn

logger = logging.getLogger("vllm.dtd_plugin")

_PATH = re.compile(r"^/v1/streams/([^/]+)")
REALTIME_PATH = "/v1/realtime"  # vllm_plugin.streams.realtime.PATH (that module imports this one)
FORWARDED = b"x-dtd-forwarded-from"
# a relayed Realtime socket whose stream was opened for it in its owner (this process was full): the
# owner's session treats it as a new one (closing the socket closes it), not as a resume
OPENED_FOR_SOCKET = b"x-dtd-opened-for-socket"
_HOP = {
    b"host",
    b"connection",
    b"keep-alive",
    b"transfer-encoding",
    b"te",
    b"upgrade",
    b"proxy-connection",
    b"content-length",
}
_SERVER_HEADERS = {b"date", b"server"}  # the forwarding server sends its own


# Not VLLM_*: vLLM 0.32 warns about every VLLM_* variable it does not know, and refuses to start
# with --fail-on-environ-validation (platforms/interface.py validate_environ).
SOCKET_DIR_ENV = "DTD_STREAM_SOCKET_DIR"


def prepare_socket_dir(env=os.environ) -> None:
    """In the process that starts the API servers (the plugin's ``register()`` runs there before
    it spawns them): a fresh private directory (``mkdtemp``: unpredictable, mode 0700) whose path
    the API-server processes inherit."""
    if settings.get(SOCKET_DIR_ENV, env) is None:
        env[SOCKET_DIR_ENV] = path = tempfile.mkdtemp(prefix="vllm-dtd-streams-")
        # removed when this process ends (API servers are multiprocessing children: their atexit
        # handlers never run, so they do not clean up themselves)
        atexit.register(shutil.rmtree, path, ignore_errors=True)


def socket_dir(server_key: str) -> Path:
    """The private directory of this server's peer sockets: the inherited ``mkdtemp`` one, else
    one named after the process that started the API servers (``server_key``). Refuses a
    directory another user made or can enter."""
    given = settings.get(SOCKET_DIR_ENV)
    d = Path(given) if given else Path(tempfile.gettempdir()) / f"vllm-dtd-streams-{os.getuid()}-{server_key}"
    d.mkdir(mode=0o700, exist_ok=True)
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise RuntimeError(f"{d} is not a private directory of this user: refusing to put stream sockets there")
    return d


class Peers:
    """The API-server processes of one server: this one's index, their count, their sockets."""

    def __init__(self, index: int, count: int, server_key: str | None = None):
        self.index, self.count = index, count
        self.dir = socket_dir(server_key or str(os.getppid())) if count > 1 else None
        given = settings.get(SOCKET_DIR_ENV)
        if count <= 1 and given:  # one process: nothing to share
            with contextlib.suppress(OSError):
                os.rmdir(given)
        self._clients: dict[int, object] = {}
        self._server: uvicorn.Server | None = None

    def path(self, index: int) -> str:
        assert self.dir is not None, "peer sockets: several API-server processes only"
        return str(self.dir / f"api{index}.sock")

    async def serve(self, app) -> None:
        """Serve ``app`` on this process's peer socket (lifespan off: the app runs already)."""
        import uvicorn

        class _PeerServer(uvicorn.Server):
            def capture_signals(self):  # the public server owns the signal handlers
                return contextlib.nullcontext()

        path = self.path(self.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by an earlier run of the same pid
        # log_config=None: this Config must not reconfigure the process's logging (vLLM's server owns it)
        config = uvicorn.Config(app, uds=path, lifespan="off", log_config=None, log_level=None)
        config.access_log = False
        self._server = server = _PeerServer(config)
        task = asyncio.get_running_loop().create_task(server.serve())
        for _ in range(200):  # until the socket accepts
            if server.started or task.done():
                break
            await asyncio.sleep(0.05)
        if task.done():
            task.result()
        os.chmod(path, 0o600)
        self._task = task
        logger.info("DTD streams: API server %d of %d, peer socket %s", self.index, self.count, path)

    async def open_elsewhere(self, headers, body: bytes):
        """Open a stream in another process (this one is full); the first answer that is not a
        429, or None. Streams and bytes are capped per process: a full process asks its peers."""
        import httpx

        keep = {k: v for k, v in headers.items() if k.lower().encode() not in _HOP}
        keep[FORWARDED.decode()] = str(self.index)
        for peer in range(self.count):
            if peer == self.index:
                continue
            try:
                resp = await self.client(peer).post("http://dtd-peer/v1/streams", content=body, headers=keep)
            except httpx.TransportError as e:
                logger.warning("DTD streams: API server %d cannot reach API server %d: %s", self.index, peer, e)
                continue
            if resp.status_code != 429:
                return resp
        return None

    def client(self, owner: int):
        import httpx

        if owner not in self._clients:
            # no pool limit: a forwarded SSE answer holds its connection as long as it runs
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=32)
            transport = httpx.AsyncHTTPTransport(uds=self.path(owner), limits=limits)
            self._clients[owner] = httpx.AsyncClient(transport=transport, timeout=None)
        return self._clients[owner]


async def _json(send, status: int, message: str) -> None:
    kind = {404: "NotFoundError", 413: "PayloadTooLargeError"}.get(status, "ServiceUnavailableError")
    body = json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _limited(receive, max_body: int):
    """``receive`` that ends a request whose body grows past ``max_body`` (as a client hang-up)."""
    seen = 0

    async def wrapped():
        nonlocal seen
        msg = await receive()
        if msg["type"] == "http.request":
            seen += len(msg.get("body", b""))
            if seen > max_body:
                return {"type": "http.disconnect"}
        return msg

    return wrapped


def _sendable_close_code(code: int | None) -> int:
    """The owner's close code as the relay may send it on: 1005 (none given) and 1006 (no close frame:
    the owner's process died) are reserved for what a peer observed, never sent (1011 then)."""
    if code is None or code == 1005:
        return 1000
    if code in (1004, 1006, 1015) or not 1000 <= code < 5000:
        return 1011
    return code


def _full(svc, peers: Peers) -> bool:
    """Whether this process holds all the streams it may while it has peers (they may have room)."""
    return peers.count > 1 and svc is not None and len(svc.manager) >= svc.manager.limits.max_streams


class StreamForwarder:
    """ASGI middleware in front of the stream routes: a body larger than an append may be is
    refused before it is read (413; FastAPI would parse all of it first), and a
    ``/v1/streams/<id>...`` request whose stream lives in another API-server process is sent
    there. Everything else passes through untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket" and scope.get("path") == REALTIME_PATH:
            return await self._realtime(scope, receive, send)
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v1/streams"):
            return await self.app(scope, receive, send)
        svc = getattr(getattr(scope.get("app"), "state", None), "dtd_streams", None)
        if svc is None:
            return await self.app(scope, receive, send)
        length = next((v for k, v in scope["headers"] if k.lower() == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > svc.max_body_bytes):
            return await _json(send, 413, f"request body larger than {svc.max_body_bytes} bytes")
        receive = _limited(receive, svc.max_body_bytes)
        m = _PATH.match(scope["path"])
        peers: Peers | None = getattr(svc, "peers", None)
        if m is None or peers is None or peers.count <= 1:
            return await self.app(scope, receive, send)
        owner = stream_owner(m.group(1))
        if owner is None or owner == peers.index:
            return await self.app(scope, receive, send)
        if owner >= peers.count or any(k == FORWARDED for k, _ in scope["headers"]):
            return await _json(send, 404, "no such stream (unknown id, closed, or expired after being idle)")
        await self._forward(peers, owner, scope, receive, send, svc.max_body_bytes)

    async def _realtime(self, scope, receive, send) -> None:
        """A Realtime socket resuming a stream (``?stream_id=``) of another API-server process is
        relayed there, message by message, both ways; so is a new socket reaching a process that holds
        all the streams it may, to a peer with room (:meth:`_realtime_elsewhere`); everything else is
        this process's."""
        svc = getattr(getattr(scope.get("app"), "state", None), "dtd_streams", None)
        peers: Peers | None = getattr(svc, "peers", None)
        sid = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("stream_id", [None])[0]
        owner = stream_owner(sid) if sid else None
        forwarded = any(k == FORWARDED for k, _ in scope["headers"])
        if sid is None and not forwarded and peers is not None and _full(svc, peers):  # a new socket: a peer's
            return await self._realtime_elsewhere(peers, scope, receive, send)
        if (
            peers is None
            or peers.count <= 1
            or owner is None
            or owner == peers.index
            or owner >= peers.count
            or forwarded
        ):
            return await self.app(scope, receive, send)
        await self._forward_socket(peers, owner, scope, receive, send)

    async def _realtime_elsewhere(self, peers: Peers, scope, receive, send) -> None:
        """A new Realtime socket reaching a process that holds all the streams it may: a peer with room
        opens the stream (with the server's defaults, as the socket's own would be) and the socket is
        relayed there; no peer has room: this process answers (429 as an error event)."""
        headers = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in scope["headers"]
            if k.lower() not in _HOP and not k.lower().startswith(b"sec-websocket")
        }
        headers["content-type"] = "application/json"
        resp = await peers.open_elsewhere(headers, b"{}")
        if resp is None or resp.status_code != 200:
            return await self.app(scope, receive, send)
        sid = resp.json()["id"]
        owner = stream_owner(sid)
        if owner is None:
            return await self.app(scope, receive, send)
        qs = scope.get("query_string", b"").decode("latin-1")
        scope = {
            **scope,
            "query_string": ((qs + "&") if qs else "").encode("latin-1") + f"stream_id={sid}".encode(),
            "headers": [*scope["headers"], (OPENED_FOR_SOCKET, b"1")],
        }
        await self._forward_socket(peers, owner, scope, receive, send)

    async def _forward_socket(self, peers: Peers, owner: int, scope, receive, send) -> None:
        from websockets.asyncio.client import unix_connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake

        if (await receive())["type"] != "websocket.connect":
            return
        qs = scope.get("query_string", b"").decode("latin-1")
        url = "ws://dtd-peer" + scope["path"] + (f"?{qs}" if qs else "")
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k.lower() not in _HOP and not k.lower().startswith(b"sec-websocket")
        ]
        headers.append((FORWARDED.decode(), str(peers.index)))
        try:
            peer = await unix_connect(peers.path(owner), url, additional_headers=headers, max_size=None)
        except (OSError, InvalidHandshake) as e:
            logger.warning("DTD streams: API server %d cannot reach API server %d: %s", peers.index, owner, e)
            await send({"type": "websocket.close", "code": 1011})  # before accepting: the handshake is refused
            return

        async def up():  # client -> owner
            while True:
                msg = await receive()
                if msg["type"] == "websocket.disconnect":
                    return
                await peer.send(msg["text"] if msg.get("text") is not None else msg.get("bytes") or b"")

        async def down():  # owner -> client
            with contextlib.suppress(ConnectionClosed):
                async for msg in peer:
                    key = "text" if isinstance(msg, str) else "bytes"
                    await send({"type": "websocket.send", key: msg})
            await send({"type": "websocket.close", "code": _sendable_close_code(peer.close_code)})

        accept = {"type": "websocket.accept"}
        if "realtime" in scope.get("subprotocols", ()):  # as the owner's route answers it (OpenAI's browser SDK)
            accept["subprotocol"] = "realtime"
        tasks: list[asyncio.Future] = []
        try:  # whatever happens from here (a client gone at the handshake too), the owner sees the client leave
            await send(accept)
            tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            try:
                await peer.close()  # the owner sees the client leave: its socket's end (response aborted, ...)
            finally:
                for t in tasks:  # a side that failed (a peer gone mid-send): the relay's end, not an error to log
                    if t.done() and not t.cancelled():
                        t.exception()

    async def _forward(self, peers: Peers, owner: int, scope, receive, send, max_body: int) -> None:
        body = bytearray()
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":  # the client left (or the body passed the limit)
                return
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP]
        headers.append((FORWARDED, str(peers.index).encode()))
        qs = scope.get("query_string", b"").decode("latin-1")
        url = (
            "http://dtd-peer"
            + scope.get("raw_path", scope["path"].encode()).decode("latin-1")
            + (f"?{qs}" if qs else "")
        )
        client = peers.client(owner)

        async def relay():
            import httpx

            req = client.build_request(scope["method"], url, headers=headers, content=bytes(body))
            try:
                resp = await client.send(req, stream=True)
            except httpx.TransportError as e:
                logger.warning("DTD streams: API server %d cannot reach API server %d: %s", peers.index, owner, e)
                return await _json(send, 503, f"the API-server process holding this stream is not reachable ({e})")
            try:
                out = [
                    (k, v)
                    for k, v in resp.headers.raw
                    if k.lower() not in (_HOP | _SERVER_HEADERS) - {b"content-length"}
                ]
                out.append((b"x-dtd-stream-owner", str(owner).encode()))
                await send({"type": "http.response.start", "status": resp.status_code, "headers": out})
                async for chunk in resp.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                await resp.aclose()

        async def hang_up():
            while (await receive())["type"] != "http.disconnect":
                pass

        work = asyncio.ensure_future(relay())
        watch = asyncio.ensure_future(hang_up())
        try:
            done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (work, watch):
                t.cancel()  # a hang-up closes the forwarded request: the owner aborts its generation
        if work in done:
            work.result()
