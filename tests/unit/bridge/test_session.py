import asyncio

import pytest

from sdbridge.bridge.protocol import FrameHeader, PixelFormat
from sdbridge.bridge.session import (MAX_CONDITION_BYTES, ConditionBudget, InputFrame, LatestSlot, RateMeter,
                                     SessionRegistry, SharedMessage, Viewer, encode_message)
from sdbridge.errors import ProtocolError


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


def test_a_params_flood_joins_one_message_and_never_crowds_out_the_others():
    """A glide pushes params 60-180 times a second: a client reading slower lost the engine and error messages
    among them from its 64-message queue, unreported (QA 50 F1)."""
    async def scenario():
        viewer = Viewer()
        shared = {"strength": 0.0}
        viewer.offer_control({"type": "params", "values": shared})
        viewer.offer_control({"type": "engine", "status": "loading"})
        for step in range(1, 1000):
            viewer.offer_control({"type": "params", "values": {"strength": step / 1000}})
            viewer.offer_control({"type": "stats", "fps": step})
            if step == 500:
                viewer.offer_control({"type": "params", "values": {"seed": 7}})
                viewer.offer_control({"type": "error", "code": "bad_param"})
        viewer.offer_control({"type": "params", "values": {"strength": 1.0}, "id": 3})  # a reply: its own
        received = [(await viewer.next())[1] for _ in range(5)]
        # The pushed state last, after what was queued before its newest values (QA 62 F1); a reply keeps its place.
        assert received == [{"type": "engine", "status": "loading"}, {"type": "error", "code": "bad_param"},
                            {"type": "params", "values": {"strength": 0.999, "seed": 7}}, {"type": "stats", "fps": 999},
                            {"type": "params", "values": {"strength": 1.0}, "id": 3}]
        assert viewer.control_dropped == 0 and shared == {"strength": 0.0}  # other viewers' message untouched
        assert viewer.buffered_frames == 0 and not viewer._control

    asyncio.run(scenario())


def test_a_reply_queued_after_a_params_push_goes_before_the_newer_values_joined_to_it():
    """A push joined the one still queued in its place: a `get` reply queued between them, with older values, went
    after the newer ones, and the client kept the older (QA 62 F1: 0.5 shown, 0.9 in use)."""
    async def scenario():
        viewer = Viewer()
        viewer.offer_control({"type": "params", "values": {"strength": 0.5}})
        viewer.offer_control({"type": "params", "values": {"strength": 0.5}, "id": 1})
        viewer.offer_control({"type": "params", "values": {"strength": 0.9}})
        received = [(await viewer.next())[1] for _ in range(2)]
        assert received == [{"type": "params", "values": {"strength": 0.5}, "id": 1},
                            {"type": "params", "values": {"strength": 0.9}}]
        assert not viewer._control

    asyncio.run(scenario())


def test_a_rate_keeps_only_the_times_in_its_window():
    """rate() counted every one of 4096 kept times: 0.1 ms a session, 45-93 ms a telemetry tick at 450 (QA 62 F5)."""
    meter = RateMeter(window_s=2.0)
    for index in range(4096):
        meter.record(now=index / 60)
    now = 4095 / 60
    assert meter.rate(now=now) == 121 / 2.0
    assert len(meter._times) == 121


def test_a_message_offered_to_many_viewers_is_serialized_once(monkeypatch):
    """Each stats subscriber's send loop dumped the stats again: sessions x subscribers a tick (QA 53 F10)."""
    import json

    dumped = []
    real = json.dumps
    monkeypatch.setattr(json, "dumps", lambda value, **kwargs: dumped.append(value) or real(value, **kwargs))
    message = SharedMessage({"type": "stats", "sessions": [{"id": str(n)} for n in range(3)]})

    async def scenario():
        viewers = [Viewer(str(n)) for n in range(50)]
        for viewer in viewers:
            viewer.offer_control(message)
        return [encode_message((await viewer.next())[1]) for viewer in viewers]

    texts = asyncio.run(scenario())
    assert len(dumped) == 1 and set(texts) == {real(message, separators=(",", ":"))}
    assert encode_message({"type": "error"}) == '{"type":"error"}'


def test_dropped_messages_are_counted_in_the_session_s_stats(caplog):
    async def scenario():
        registry = SessionRegistry()
        session = registry.open("stage")
        viewer = Viewer("stage#1")
        session.viewers.add(viewer)
        for index in range(70):
            viewer.offer_control({"type": "error", "n": index})
        assert session.stats()["viewer_control_dropped"] == 6
    with caplog.at_level("WARNING"):
        asyncio.run(scenario())
    assert [record.getMessage() for record in caplog.records].count(
        "viewer stage#1 reads its messages too slowly: the oldest are dropped (/stats: viewer_control_dropped)") == 1


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


def _condition(channel: int, size: int, frame_id: int = 1) -> InputFrame:
    data = bytes(size)  # zeroed pages: a 64 MiB frame costs nothing until read
    header = FrameHeader(version=1, pixel_format=PixelFormat.RGBA8, flags=0, channel=channel,
                         reply_format=PixelFormat.JPEG, frame_id=frame_id, client_ts_us=0, width=0, height=0,
                         payload_length=size)
    return InputFrame(data=data, payload=memoryview(data), header=header, kind="header")


def test_condition_frames_are_held_within_a_budget_over_all_sessions():
    """Each session's budget alone let N clients hold N x 256 MiB (QA 51 F5)."""
    registry = SessionRegistry()
    registry.conditions = ConditionBudget(limit=3000)
    first, second = registry.open("a"), registry.open("b")
    first.put_frame(_condition(1, 2000))
    with pytest.raises(ProtocolError, match="past 3000 bytes .* over all sessions \\(2000 held\\): send smaller") \
            as refused:
        second.put_frame(_condition(1, 1500))
    assert refused.value.code == "bad_frame" and not second.conditions
    second.put_frame(_condition(1, 1000))
    first.put_frame(_condition(1, 500, frame_id=2))  # a newer frame replaces its channel's in the count
    assert registry.conditions.held == 1500
    registry.release(first)  # closed: its bytes go back
    assert registry.conditions.held == 1000
    first.put_frame(_condition(2, 2500))  # a late frame of the closed session counts in its own budget only
    second.put_frame(_condition(2, 2000))
    assert registry.conditions.held == 3000


def test_condition_frames_are_held_within_a_byte_budget_per_session():
    """QA 9: 255 channels of 4 MB frames per session filled 2.6 GB. The four channels a slot can read (3
    ControlNets, the IP-Adapter), each a 4096x4095 RGBA raw pass, fit; a fifth is refused and nothing is lost."""
    registry = SessionRegistry()
    session = registry.open("stage")
    largest = 4096 * 4095 * 4 + 32  # the biggest raw frame under the WebSocket's 64 MiB message limit
    for channel in (1, 2, 3, 4):
        session.put_frame(_condition(channel, largest))
    assert session.stats()["condition_bytes"] == 4 * largest <= MAX_CONDITION_BYTES
    with pytest.raises(ProtocolError) as refused:
        session.put_frame(_condition(5, largest, frame_id=9))
    assert refused.value.code == "bad_frame"
    assert f"condition frame of {largest} bytes on channel 5" in str(refused.value)
    assert f"at most {MAX_CONDITION_BYTES}" in str(refused.value)
    assert set(session.conditions) == {1, 2, 3, 4} and all(slot.pending for slot in session.conditions.values())
    # A newer frame on a channel replaces its older one in the count: a stream of passes goes on.
    session.put_frame(_condition(4, largest, frame_id=10))
    session.put_frame(_condition(4, 1000, frame_id=11))
    session.put_frame(_condition(5, largest - 1000, frame_id=12))  # the room channel 4 gave back
    assert session.stats()["condition_bytes"] == 4 * largest
    assert session.conditions[4].take().frame_id == 11 and session.conditions[4].dropped == 2
    # The image itself (channel 0) is never counted.
    session.put_frame(_condition(0, largest, frame_id=13))
    assert session.input.take().frame_id == 13
