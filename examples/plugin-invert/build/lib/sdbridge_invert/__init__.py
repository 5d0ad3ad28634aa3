"""An example third-party sdbridge plugin: invert the output, blended by ``amount``.

Install it next to sdbridge (``pip install ./examples/plugin-invert``) and restart the daemon;
then ``oscsend 127.0.0.1 9000 /sd/plugin/invert/enabled i 1`` and
``oscsend 127.0.0.1 9000 /sd/plugin/invert/amount f 0.5``.
"""

from __future__ import annotations

import numpy as np

from sdbridge.plugins.base import Plugin, PluginContext, param


class Invert(Plugin):
    name = "invert"
    doc = "Invert the output frame, blended by amount."
    params = (param("invert", "amount", "float", 1.0, "0 leaves the frame, 1 inverts it fully.",
                    minimum=0.0, maximum=1.0),)

    def after(self, ctx: PluginContext) -> np.ndarray:
        assert ctx.output is not None
        amount = float(ctx.params["amount"])
        inverted = 255 - ctx.output
        return (ctx.output * (1.0 - amount) + inverted * amount).round().astype(np.uint8)
