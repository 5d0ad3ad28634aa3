"""bridge/link.py's sampling task against a stand-in for aalink's Link object: a real one joins the network's Link
session by multicast, which unit tests must not do. The store and the BeatClock are the real ones."""

from __future__ import annotations

import asyncio

from sdbridge.bridge.beat_clock import BeatClock
from sdbridge.bridge.link import SAMPLE_S, LinkSync
from sdbridge.params import ParamStore


class PeerSession:
    """What LinkSync reads and writes on aalink's Link: the session's beat, tempo and peer count."""

    def __init__(self, tempo: float) -> None:
        self.beat, self.tempo, self.num_peers = 0.0, tempo, 1


async def _run(sync: LinkSync, seconds: float) -> None:
    task = asyncio.create_task(sync._follow())
    try:
        await asyncio.sleep(seconds)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_a_peer_beyond_bpm_s_maximum_sets_the_clamped_bpm_once_and_bpm_set_later_still_leads():
    # QA 73 F9: a 400 bpm session against bpm's 300 maximum re-set bpm at every sample (100 a second), each a
    # counted set, so an on-beat recall that carried bpm dropped it.
    store = ParamStore()
    sync = LinkSync(store, BeatClock(0.0))
    sync.link = PeerSession(400.0)

    async def scenario() -> None:
        await _run(sync, SAMPLE_S * 30)
        assert store.get("bpm") == 300.0
        assert store.set_counts(["bpm"]) == {"bpm": 1}
        store.update({"bpm": 90.0})  # a person's set: the session follows it
        await _run(sync, SAMPLE_S * 30)
        assert sync.link.tempo == 90.0 and store.get("bpm") == 90.0
        assert store.set_counts(["bpm"]) == {"bpm": 2}

    asyncio.run(scenario())


def test_a_peer_s_tempo_change_within_range_becomes_bpm():
    store = ParamStore()
    sync = LinkSync(store, BeatClock(0.0))
    sync.link = PeerSession(float(store.get("bpm")))

    async def scenario() -> None:
        await _run(sync, SAMPLE_S * 10)
        sync.link.tempo = 133.0
        await _run(sync, SAMPLE_S * 10)
        assert store.get("bpm") == 133.0 and store.set_counts(["bpm"]) == {"bpm": 1}

    asyncio.run(scenario())
