"""WHIP in, WHEP out, through a real daemon on loopback and real aiortc peers (docs/webrtc.md).

The media goes over ICE host candidates: aioice leaves out 127.0.0.1, so two peers on one machine meet on
its first other interface; without one the media tests skip with that reason.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

aiortc = pytest.importorskip("aiortc", reason="WebRTC tests need aiortc (pip install \"sdbridge[webrtc]\")")
av = pytest.importorskip("av")
httpx = pytest.importorskip("httpx")

from aioice.ice import get_host_addresses  # noqa: E402
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription, VideoStreamTrack  # noqa: E402

from tests.clients import wait_for  # noqa: E402

needs_interface = pytest.mark.skipif(
    not get_host_addresses(use_ipv4=True, use_ipv6=False),
    reason="no non-loopback IPv4 interface: aioice gathers no host candidate on 127.0.0.1, so two local peers "
           "cannot connect")

SIZE = 64
RED = (200, 40, 90)
SDP = {"Content-Type": "application/sdp"}
PARAMS = {"engine": "identity", "width": SIZE, "height": SIZE}


class SolidTrack(VideoStreamTrack):
    """A synthetic camera: solid-colour frames at 30 fps."""

    def __init__(self, rgb: tuple[int, int, int]) -> None:
        super().__init__()
        self.image = np.full((SIZE, SIZE, 3), rgb, np.uint8)

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame.from_ndarray(self.image, format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        return frame


def new_pc() -> RTCPeerConnection:
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))  # no STUN: this network reaches nothing


async def offer_and_post(http: httpx.AsyncClient, pc: RTCPeerConnection, path: str,
                         headers: dict[str, str] | None = None) -> httpx.Response:
    await pc.setLocalDescription(await pc.createOffer())
    response = await http.post(path, content=pc.localDescription.sdp, headers={**SDP, **(headers or {})})
    if response.status_code == 201:
        await pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))
    return response


async def publish(http: httpx.AsyncClient, session: str, rgb: tuple[int, int, int],
                  headers: dict[str, str] | None = None) -> tuple[RTCPeerConnection, httpx.Response]:
    pc = new_pc()
    pc.addTransceiver(SolidTrack(rgb), direction="sendonly")
    return pc, await offer_and_post(http, pc, f"/whip/{session}", headers)


async def view(http: httpx.AsyncClient, session: str) -> tuple[RTCPeerConnection, httpx.Response, asyncio.Future]:
    pc = new_pc()
    pc.addTransceiver("video", direction="recvonly")
    track: asyncio.Future = asyncio.get_running_loop().create_future()
    pc.on("track", lambda t: track.done() or track.set_result(t))
    return pc, await offer_and_post(http, pc, f"/whep/{session}"), track


def client(daemon: Any, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.port}", timeout=30, **kwargs)


def stats(daemon: Any) -> dict[str, Any]:
    return httpx.get(f"http://127.0.0.1:{daemon.port}/stats", timeout=10).json()


@needs_interface
def test_whip_frames_come_back_through_whep_and_delete_releases_the_session(start_daemon) -> None:
    daemon = start_daemon(params=PARAMS)

    async def run() -> None:
        async with client(daemon) as http:
            sender, posted = await publish(http, "stage", RED)
            assert posted.status_code == 201, posted.text
            assert posted.headers["content-type"].startswith("application/sdp")
            assert posted.headers["location"].startswith("/whip/stage/")
            assert "a=candidate:" in posted.text  # non-trickle: the answer carries the candidates
            viewer, watched, track = await view(http, "stage")
            assert watched.status_code == 201, watched.text
            assert watched.headers["location"].startswith("/whep/stage/")
            remote = await asyncio.wait_for(track, 15)
            frames = [await asyncio.wait_for(remote.recv(), 15) for _ in range(10)]
            image = frames[-1].to_ndarray(format="rgb24")
            assert image.shape == (SIZE, SIZE, 3)
            # VP8 at 64x64 and two colour conversions: within a few levels of the colour sent, per channel.
            assert np.abs(image.reshape(-1, 3).mean(axis=0) - RED).max() < 10, image.reshape(-1, 3).mean(axis=0)

            live = stats(daemon)["webrtc"]
            assert (live["peers"], live["whip"], live["whep"]) == (2, 1, 1)
            assert live["frames_in"] > 0 and live["frames_out"] >= 10
            assert {c["state"] for c in live["connections"]} == {"connected"}
            [session] = [s for s in stats(daemon)["sessions"] if s["id"] == "stage"]
            assert session["senders"] == 1 and session["viewers"] == 1 and session["frames_in"] > 0

            assert (await http.delete(posted.headers["location"])).status_code == 200
            assert (await http.delete(watched.headers["location"])).status_code == 200
            assert (await http.delete(watched.headers["location"])).status_code == 404  # once only
            await asyncio.gather(sender.close(), viewer.close())

    asyncio.run(run())
    assert daemon.registry.get("stage") is None  # released as a WebSocket close releases it
    ended = stats(daemon)["webrtc"]
    assert ended["peers"] == 0 and ended["frames_in"] > 0 and ended["frames_out"] >= 10  # totals survive


@needs_interface
def test_an_obs_like_offer_h264_with_audio_and_no_candidates_feeds_the_session(start_daemon) -> None:
    """OBS offers H.264 and Opus; a client may also leave its candidates out (the daemon learns its address
    from its ICE checks). The audio is declined, the H.264 video feeds the session."""
    from aiortc import AudioStreamTrack
    from aiortc.rtcrtpsender import RTCRtpSender

    daemon = start_daemon(params=PARAMS)

    async def run() -> None:
        pc = new_pc()
        pc.addTransceiver(AudioStreamTrack(), direction="sendonly")
        video = pc.addTransceiver(SolidTrack(RED), direction="sendonly")
        video.setCodecPreferences([codec for codec in RTCRtpSender.getCapabilities("video").codecs
                                   if codec.mimeType == "video/H264"])
        await pc.setLocalDescription(await pc.createOffer())
        offer = "\r\n".join(line for line in pc.localDescription.sdp.split("\r\n")
                             if not line.startswith(("a=candidate", "a=end-of-candidates")))
        async with client(daemon) as http:
            posted = await http.post("/whip/obs", content=offer, headers=SDP)
            assert posted.status_code == 201, posted.text
            audio, video_section = posted.text.split("m=video")
            assert "m=audio" in audio and "a=inactive" in audio
            assert "a=recvonly" in video_section and "H264/90000" in video_section and "VP8" not in video_section
            await pc.setRemoteDescription(RTCSessionDescription(posted.text, "answer"))
            assert await asyncio.to_thread(wait_for, lambda: stats(daemon)["webrtc"]["frames_in"] >= 3, 15)
            [session] = [s for s in stats(daemon)["sessions"] if s["id"] == "obs"]
            assert session["frames_in"] >= 3 and session["frames_out"] >= 1
            await http.delete(posted.headers["location"])
        await pc.close()

    asyncio.run(run())


@needs_interface
def test_a_second_camera_in_a_whip_offer_is_answered_inactive_and_queues_nothing(start_daemon, caplog) -> None:
    """aiortc decoded every video section a WHIP offer sent and the daemon read only the first: a second camera's
    frames queued unread, 13 MB/s at 640x480, until the daemon ran out of memory (QA 74 F3)."""
    import logging

    daemon = start_daemon(params=PARAMS)

    async def run() -> None:
        pc = new_pc()
        pc.addTransceiver(SolidTrack(RED), direction="sendonly")
        pc.addTransceiver(SolidTrack((20, 60, 220)), direction="sendonly")
        async with client(daemon) as http:
            with caplog.at_level(logging.INFO, logger="sdbridge.bridge.webrtc"):
                posted = await offer_and_post(http, pc, "/whip/two")
            assert posted.status_code == 201, posted.text
            first, second = posted.text.split("m=video")[1:]
            assert "a=recvonly" in first and "a=inactive" in second
            assert any("2 video sections: the daemon takes the first, the other 1 are answered inactive"
                       in record.getMessage() for record in caplog.records)
            assert await asyncio.to_thread(wait_for, lambda: stats(daemon)["webrtc"]["frames_in"] >= 30, 15)
            [peer] = daemon.webrtc.peers.values()
            kept, other = peer.pc.getTransceivers()
            assert peer.reader.track is kept.receiver.track
            assert other.receiver.track._queue.qsize() == 0  # aiortc's queue of decoded frames nobody reads
            assert (await http.delete(posted.headers["location"])).status_code == 200
        await pc.close()

    asyncio.run(run())


class WideTrack(SolidTrack):
    """A sender the daemon cannot take: 8208x16, past the 8192 pixels a side a session's frame may have."""

    def __init__(self) -> None:
        super().__init__(RED)
        self.image = np.full((16, 8208, 3), RED, np.uint8)


@needs_interface
def test_frames_too_large_for_a_session_are_counted_and_logged_once_not_a_traceback_each(start_daemon,
                                                                                           caplog) -> None:
    """A WHIP sender of frames over 8192 a side logged a 20-line ERROR traceback per frame, forever, and /stats
    did not count them (QA 74 F9)."""
    import logging

    daemon = start_daemon(params=PARAMS)

    async def run() -> None:
        pc = new_pc()
        pc.addTransceiver(WideTrack(), direction="sendonly")
        async with client(daemon) as http:
            posted = await offer_and_post(http, pc, "/whip/wide")
            assert posted.status_code == 201, posted.text
            with caplog.at_level(logging.INFO, logger="sdbridge.bridge.webrtc_peer"):
                assert await asyncio.to_thread(wait_for, lambda: stats(daemon)["webrtc"]["frames_refused"] >= 10, 15)
            live = stats(daemon)["webrtc"]
            assert live["frames_in"] == 0 and [c["state"] for c in live["connections"]] == ["connected"]
            assert (await http.delete(posted.headers["location"])).status_code == 200
        await pc.close()

    asyncio.run(run())
    records = [r for r in caplog.records if r.name == "sdbridge.bridge.webrtc_peer"]
    assert not [r for r in records if r.levelno >= logging.ERROR or r.exc_info]
    assert "a 8208x16 frame is dropped: a session takes at most 8192 pixels a side" in records[0].getMessage()
    assert len(records) <= 3  # the first, then a summary every 5 s (and at the end)
    assert stats(daemon)["webrtc"]["frames_refused"] >= 10  # the total survives the peer


@needs_interface
def test_a_peer_that_goes_away_is_cleaned_up_and_stop_closes_the_rest(tmp_path) -> None:
    from sdbridge.bridge.server import DaemonThread
    from sdbridge.config import Settings

    settings = Settings(port=0, osc_port=0, oscquery_port=0, feedback_port=0, presets_dir=str(tmp_path))
    settings.params = dict(PARAMS)
    thread = DaemonThread(settings)
    daemon = thread.start()

    async def run() -> None:
        async with client(daemon) as http:
            gone, posted = await publish(http, "a", RED)
            assert posted.status_code == 201, posted.text
            stays, kept = await publish(http, "b", RED)
            assert kept.status_code == 201, kept.text
            await asyncio.to_thread(wait_for, lambda: stats(daemon)["webrtc"]["frames_in"] > 0, 15)
            await gone.close()  # no DELETE: the daemon hears the DTLS close
            assert await asyncio.to_thread(wait_for, lambda: daemon.registry.get("a") is None, 15)
            assert [c["session"] for c in stats(daemon)["webrtc"]["connections"]] == ["b"]
        [peer] = daemon.webrtc.peers.values()
        await asyncio.to_thread(thread.stop)
        assert peer.pc.connectionState == "closed" and daemon.webrtc.peers == {}  # Daemon.stop closed it
        assert daemon.registry.get("b") is None
        await stays.close()

    try:
        asyncio.run(run())
    finally:
        thread.stop()


def test_a_wrong_token_gets_401_and_the_right_one_is_answered(start_daemon) -> None:
    token = "a-long-stage-token-0123456789"
    daemon = start_daemon(params=PARAMS, token=token)

    async def run() -> None:
        async with client(daemon) as http:
            pc, refused = await publish(http, "stage", RED, {"Authorization": "Bearer wrong-token-0123456789"})
            assert refused.status_code == 401
            assert daemon.registry.get("stage") is None
            await pc.close()
            pc, answered = await publish(http, "stage", RED, {"Authorization": f"Bearer {token}"})
            assert answered.status_code == 201, answered.text
            deleted = await http.delete(answered.headers["location"], headers={"Authorization": f"Bearer {token}"})
            assert deleted.status_code == 200
            await pc.close()

    asyncio.run(run())


# A well-formed offer whose only video codec is AV1, which aiortc does not have.
AV1_ONLY = ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n"
            "m=video 9 UDP/TLS/RTP/SAVPF 45\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sendonly\r\na=rtcp-mux\r\n"
            "a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\na=fingerprint:sha-256 "
            + ":".join(["AB"] * 32) + "\r\na=setup:actpass\r\na=rtpmap:45 AV1/90000\r\n")
AUDIO_ONLY = ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
              "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=sendonly\r\na=rtpmap:111 opus/48000/2\r\n")


def test_bad_requests_get_a_status_and_a_sentence(start_daemon) -> None:
    daemon = start_daemon(params=PARAMS)
    base = f"http://127.0.0.1:{daemon.port}"
    with httpx.Client(base_url=base, timeout=10) as http:
        wrong_type = http.post("/whip/stage", content=AUDIO_ONLY, headers={"Content-Type": "text/plain"})
        assert wrong_type.status_code == 415 and "application/sdp" in wrong_type.json()["message"]
        garbage = http.post("/whip/stage", content=b"hello", headers=SDP)
        assert garbage.status_code == 400 and "'hello'" in garbage.json()["message"]
        audio = http.post("/whip/stage", content=AUDIO_ONLY, headers=SDP)
        assert audio.status_code == 400 and "no video m-line" in audio.json()["message"]
        av1 = http.post("/whip/stage", content=AV1_ONLY, headers=SDP)
        assert av1.status_code == 400 and "cannot be answered" in av1.json()["message"]
        assert "VP8, H.264" in av1.json()["message"]
        too_big = http.post("/whip/stage", content=b"v=0\r\n" + b"a=x\r\n" * 20000, headers=SDP)
        assert too_big.status_code == 413
        # A port that str.isdigit() takes and int() does not: was a 500 and a traceback (QA 74 F4).
        superscript = http.post("/whip/stage", content=AV1_ONLY.replace("m=video 9 ", "m=video ² "), headers=SDP)
        assert superscript.status_code == 400 and superscript.json()["code"] == "bad_sdp", superscript.text
        assert "'m=video ² UDP/TLS/RTP/SAVPF 45'" in superscript.json()["message"]
        # 560 sections in 62 KB, under the size cap: aiortc answered them on the loop for ~2 s (QA 74 F6).
        many = AV1_ONLY + "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 VP8/90000\r\n" * 559
        crowded = http.post("/whep/stage", content=many, headers=SDP)
        assert crowded.status_code == 400 and crowded.json()["code"] == "too_many_media", crowded.text
        assert "560 media sections (m= lines), at most 8" in crowded.json()["message"]
        bad_name = http.post("/whep/no%20spaces", content=AUDIO_ONLY, headers=SDP)
        assert bad_name.status_code == 400 and bad_name.json()["code"] == "bad_session"
        # A dot segment would give a Location clients resolve away (/whip/../ID -> /ID): never a session (QA 6).
        for dots in ("%2e", "%2e%2e"):
            refused = http.post(f"/whip/{dots}", content=AUDIO_ONLY, headers=SDP)
            assert refused.status_code == 400 and refused.json()["code"] == "bad_session", refused.text
        unknown = http.delete("/whip/stage/nosuchresource")
        assert unknown.status_code == 404 and "/whip/stage/nosuchresource" in unknown.json()["message"]
        # Any other method or path under /whip and /whep: the same error body, not FastAPI's {"detail": ...}.
        for method, path, status, allow in [("GET", "/whip/stage", 405, "POST"),
                                            ("OPTIONS", "/whep/stage", 405, "POST"),
                                            ("POST", "/whip/stage/id", 405, "DELETE, PATCH"),
                                            ("POST", "/whip/", 404, None), ("DELETE", "/whep/a/b/c", 404, None)]:
            other = http.request(method, path, content=AUDIO_ONLY, headers=SDP)
            assert other.status_code == status and other.json()["type"] == "error", (method, path, other.text)
            assert other.headers.get("allow") == allow and path in other.json()["message"]
        patch = http.patch("/whip/stage/nosuchresource", content=b"a=candidate", headers=SDP)
        assert patch.status_code == 405 and "trickle" in patch.json()["message"]
        assert patch.headers["allow"] == "DELETE"
    assert daemon.registry.get("stage") is None and daemon.webrtc.stats()["peers"] == 0


def test_a_peer_that_never_connects_is_ended(start_daemon) -> None:
    daemon = start_daemon(params=PARAMS)
    daemon.webrtc.connect_timeout_s = 1.0

    async def run() -> None:
        async with client(daemon) as http:
            viewer = new_pc()
            viewer.addTransceiver("video", direction="recvonly")
            await viewer.setLocalDescription(await viewer.createOffer())
            # No candidate and no end-of-candidates: the daemon's ICE has no pair to check and waits for more.
            offer = "\r\n".join(line for line in viewer.localDescription.sdp.split("\r\n")
                                 if not line.startswith(("a=candidate", "a=end-of-candidates")))
            posted = await http.post("/whep/nobody", content=offer, headers=SDP)
            assert posted.status_code == 201, posted.text
            await viewer.close()  # before it took the answer: no ICE check ever reaches the daemon
            started = time.monotonic()
            assert daemon.registry.get("nobody") is not None
            assert await asyncio.to_thread(wait_for, lambda: daemon.registry.get("nobody") is None, 10)
            assert 0.8 < time.monotonic() - started < 5  # the watchdog's 1 s, not ICE's own failure
            assert stats(daemon)["webrtc"]["peers"] == 0

    asyncio.run(run())


def test_past_the_cap_a_peer_gets_503(start_daemon) -> None:
    daemon = start_daemon(params=PARAMS)
    daemon.webrtc.max_peers = 1

    async def run() -> None:
        async with client(daemon) as http:
            first, answered = await publish(http, "one", RED)
            assert answered.status_code == 201, answered.text
            second, refused = await publish(http, "two", RED)
            assert refused.status_code == 503 and "at most 1" in refused.json()["message"]
            assert daemon.registry.get("two") is None
            await asyncio.gather(first.close(), second.close())

    asyncio.run(run())
    assert stats(daemon)["webrtc"]["refused"] == 1


def test_without_aiortc_the_routes_answer_501(start_daemon, monkeypatch) -> None:
    import sys

    daemon = start_daemon(params=PARAMS)

    async def make_offer() -> str:
        pc = new_pc()
        pc.addTransceiver(SolidTrack(RED), direction="sendonly")
        await pc.setLocalDescription(await pc.createOffer())
        await pc.close()
        return pc.localDescription.sdp

    offer = asyncio.run(make_offer())
    monkeypatch.delitem(sys.modules, "sdbridge.bridge.webrtc_peer", raising=False)
    monkeypatch.setitem(sys.modules, "aiortc", None)  # what `import aiortc` meets where it is not installed
    refused = httpx.post(f"http://127.0.0.1:{daemon.port}/whip/stage", content=offer, headers=SDP, timeout=10)
    assert refused.status_code == 501 and "pip install \"sdbridge[webrtc]\"" in refused.json()["message"]
    assert daemon.registry.get("stage") is None


class StunResponder:
    """A STUN server of one method: every Binding request is answered with ``mapped`` as the address it came
    from, as a server behind a NAT's public side would see it (RFC 5389)."""

    def __init__(self, host: str, mapped: tuple[str, int]) -> None:
        import socket
        import threading

        self.mapped = mapped
        self.requests: list[tuple[str, int]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.2)
        self.address = self.sock.getsockname()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-stun", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        from aioice import stun

        while not self._stop.is_set():
            try:
                data, source = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            request = stun.parse_message(data)
            if request.message_method != stun.Method.BINDING or request.message_class != stun.Class.REQUEST:
                continue
            self.requests.append(source)
            response = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.RESPONSE,
                                    transaction_id=request.transaction_id)
            response.attributes["XOR-MAPPED-ADDRESS"] = self.mapped
            self.sock.sendto(bytes(response), source)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@needs_interface
def test_an_ice_server_gives_the_answer_a_server_reflexive_candidate(start_daemon) -> None:
    """--ice-server stun:HOST:PORT: the daemon asks it for its public address and offers that to the peer
    (what a remote OBS behind another NAT needs), and /stats names the server."""
    host = get_host_addresses(use_ipv4=True, use_ipv6=False)[0]
    stun_server = StunResponder(host, ("203.0.113.7", 40000))
    try:
        daemon = start_daemon(params=PARAMS, ice_servers=[f"stun:{host}:{stun_server.address[1]}"])

        async def run() -> None:
            async with client(daemon) as http:
                sender, posted = await publish(http, "remote", RED)
                assert posted.status_code == 201, posted.text
                srflx = [line for line in posted.text.splitlines() if "typ srflx" in line]
                assert srflx and all(" 203.0.113.7 40000 " in line for line in srflx), posted.text
                await http.delete(posted.headers["location"])
                await sender.close()

        asyncio.run(run())
        assert stun_server.requests  # the daemon's gatherer asked
        assert stats(daemon)["webrtc"]["ice_servers"] == [f"stun:{host}:{stun_server.address[1]}"]
    finally:
        stun_server.close()


@needs_interface
def test_peers_that_come_and_go_leave_no_threads_or_files_behind(start_daemon) -> None:
    """A show's night of OBS restarts and viewers joining: each WHIP/WHEP pair carries frames, then is DELETEd (every
    other round) or just closed (ICE tells the daemon). After a first round (codec libraries, executor threads
    warm), eight more leave the process's threads and open files where they were, and no peer behind."""
    import os
    import threading

    daemon = start_daemon(params=PARAMS)

    def counts() -> tuple[int, int]:
        # Threads of bounded pools (the loops' executors, the worker's codec pool) start on demand and stay: not
        # per peer. aiortc's encoder and decoder threads are per peer, and counted.
        pools = ("asyncio_", "sdbridge-codec_")
        threads = [t for t in threading.enumerate() if not t.name.startswith(pools)]
        return len(threads), len(os.listdir("/proc/self/fd"))

    async def round_trip(http: httpx.AsyncClient, index: int) -> None:
        sender, posted = await publish(http, "churn", RED)
        assert posted.status_code == 201, posted.text
        viewer, watched, track = await view(http, "churn")
        assert watched.status_code == 201, watched.text
        remote = await asyncio.wait_for(track, 15)
        await asyncio.wait_for(remote.recv(), 15)  # a frame went all the way round
        if index % 2 == 0:
            for response in (posted, watched):
                assert (await http.delete(response.headers["location"])).status_code == 200
        await asyncio.gather(sender.close(), viewer.close())

    async def run(rounds: range) -> None:
        async with client(daemon) as http:
            for index in rounds:
                await round_trip(http, index)

    asyncio.run(run(range(1)))
    assert wait_for(lambda: stats(daemon)["webrtc"]["peers"] == 0, 15)
    before = counts()
    asyncio.run(run(range(1, 9)))
    assert wait_for(lambda: stats(daemon)["webrtc"]["peers"] == 0, 15), stats(daemon)["webrtc"]
    assert wait_for(lambda: counts() <= before, 10), (counts(), before, sorted(t.name for t in threading.enumerate()))
    assert daemon.registry.get("churn") is None
