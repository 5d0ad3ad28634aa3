"""The control plane: a controller's values applied under slew_s, against the loop's clock."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from sdbridge.bridge.control import Control
from sdbridge.params import ParamStore


def test_a_fader_swept_under_slew_moves_the_value_while_the_hand_moves():
    """QA 73 F8: each CC restarted a glide from standstill, so a fader swept over 1 s (a CC every 10 ms) under
    slew_s 0.25 left strength near 0 until the hand stopped. The value follows within about slew_s now. The fader's
    position is read from the same clock as the glide's, so a slow machine moves both alike (the value read is the
    glide's last step, up to a step period, 1/60 s, older)."""
    slew = 0.25

    async def scenario():
        store = ParamStore()
        store.update({"slew_s": slew, "strength": 0.0})
        control = Control(SimpleNamespace(store=store), None)
        loop = asyncio.get_running_loop()
        started = loop.time()
        checks, fader = [], 0.0
        while fader < 1.0:
            elapsed = loop.time() - started
            fader = min(1.0, round(elapsed * 127) / 127)  # a 7-bit fader's steps
            control.apply_live({"strength": fader})
            if (elapsed >= 0.5 and not checks) or fader == 1.0:
                checks.append((elapsed, fader, store.get("strength")))
            await asyncio.sleep(0.01)
        await asyncio.sleep(4 * slew)
        landed = store.get("strength"), control.glider.active
        control.close()
        return checks, landed

    checks, landed = asyncio.run(scenario())
    assert len(checks) == 2
    for elapsed, fader, value in checks:  # half way, and as the hand reaches the top
        assert min(1.0, elapsed - slew) - 0.05 <= value <= fader, (elapsed, fader, value)
    assert landed == (1.0, [])
