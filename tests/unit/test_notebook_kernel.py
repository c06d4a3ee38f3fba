"""The kernel client that executes the notebooks in tests (``tests/notebook_kernel.py``): a wake-up the
socket missed costs one slice of a poll, not the cell's whole timeout; timeouts stay timeouts."""

import asyncio
import time
from queue import Empty

import pytest
import zmq
import zmq.asyncio
from jupyter_client.session import Session
from notebook_kernel import SLICE_S, SlicedChannel, SlicedKernelClient, SlicedKernelManager


async def _pair():
    ctx = zmq.asyncio.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    port = a.bind_to_random_port("tcp://127.0.0.1")
    b.connect(f"tcp://127.0.0.1:{port}")
    session = Session(key=b"")
    return a, b, session


def test_a_missed_wake_up_costs_one_slice_not_the_whole_timeout():
    async def run():
        a, b, session = await _pair()
        channel = SlicedChannel(b, session)
        real_poll, calls = b.poll, []

        async def deaf_once(timeout=None, flags=zmq.POLLIN):
            calls.append(timeout)
            if len(calls) == 1:  # the first poll never wakes: it sleeps its whole timeout and sees nothing
                await asyncio.sleep(timeout / 1000)
                return 0
            return await real_poll(timeout, flags)

        b.poll = deaf_once
        session.send(a, "execute_reply", {"status": "ok"})
        t0 = time.monotonic()
        msg = await asyncio.wait_for(channel.get_msg(timeout=600), 10)  # (fails in 10 s, not 600)
        took = time.monotonic() - t0
        a.close(0)
        b.close(0)
        return msg, took, calls

    msg, took, calls = asyncio.run(run())
    assert msg["msg_type"] == "execute_reply" and msg["content"] == {"status": "ok"}
    assert took < SLICE_S + 1.0 and calls[0] <= SLICE_S * 1000  # not the 600 s asked for


@pytest.mark.parametrize("timeout", [0, 0.3, 2.5])
def test_a_timeout_with_no_message_still_raises_empty_when_due(timeout):
    async def run():
        a, b, session = await _pair()
        t0 = time.monotonic()
        with pytest.raises(Empty):
            await SlicedChannel(b, session).get_msg(timeout=timeout)
        a.close(0)
        b.close(0)
        return time.monotonic() - t0

    took = asyncio.run(run())
    assert timeout - 0.05 <= took < timeout + 0.5


def test_without_a_timeout_it_waits_past_many_slices_for_the_message():
    async def run():
        a, b, session = await _pair()

        async def later():
            await asyncio.sleep(2.5 * SLICE_S)
            session.send(a, "status", {"execution_state": "idle"})

        sender = asyncio.ensure_future(later())
        msg = await SlicedChannel(b, session).get_msg()
        await sender
        a.close(0)
        b.close(0)
        return msg

    assert asyncio.run(run())["content"] == {"execution_state": "idle"}


def test_the_manager_hands_out_clients_with_sliced_channels():
    km = SlicedKernelManager()
    kc = km.client()
    assert isinstance(kc, SlicedKernelClient)
    assert kc.shell_channel_class is SlicedChannel and kc.iopub_channel_class is SlicedChannel
