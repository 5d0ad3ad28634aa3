import asyncio

from sdbridge.bridge.session import InputFrame, LatestSlot, RateMeter, SessionRegistry, Viewer


def _frame(data: bytes = b"\xff\xd8\xff") -> InputFrame:
    return InputFrame(data=data, payload=memoryview(data), header=None, kind="jpeg")


def test_latest_slot_keeps_newest_and_counts_drops():
    slot: LatestSlot[int] = LatestSlot()
    assert slot.put(1) is False
    assert slot.put(2) is True and slot.put(3) is True
    assert slot.take() == 3 and slot.take() is None
    assert slot.accepted == 3 and slot.dropped == 2


def test_viewer_holds_one_frame_and_sends_control_first():
    async def scenario():
        viewer = Viewer()
        for index in range(5):
            viewer.offer_frame(bytes([index]))
        viewer.offer_control({"type": "error"})
        assert viewer.buffered_frames == 1 and viewer.frames_dropped == 4
        assert await viewer.next() == ("json", {"type": "error"})
        assert await viewer.next() == ("frame", bytes([4]))
        waiter = asyncio.create_task(viewer.next())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        viewer.offer_frame(b"new")
        assert await asyncio.wait_for(waiter, 1) == ("frame", b"new")

    asyncio.run(scenario())


def test_viewer_control_queue_is_bounded():
    async def scenario():
        viewer = Viewer()
        for index in range(1000):
            viewer.offer_control({"n": index})
        assert viewer.control_dropped == 1000 - 64
        assert (await viewer.next())[1] == {"n": 1000 - 64}

    asyncio.run(scenario())


def test_registry_join_by_name_and_release():
    registry = SessionRegistry()
    first = registry.open()
    named = registry.open("stage")
    assert registry.open("stage") is named and first is not named
    named.put_frame(_frame())
    assert registry.wake.is_set()
    registry.release(named)
    assert registry.get("stage") is None


def test_rate_meter():
    meter = RateMeter(window_s=2.0)
    for index in range(20):
        meter.record(latency_ms=float(index), now=100.0 + index * 0.1)
    assert abs(meter.rate(now=102.0) - 10.0) < 0.6
    assert meter.percentile(50) in (9.0, 10.0) and meter.percentile(99) == 19.0
