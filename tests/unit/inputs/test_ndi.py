"""NDI input: naming a source, and a source that is not there (the real library's discovery, in a namespace).

Receiving frames needs NDI's discovery to find a sender; in a network namespace with only loopback it finds
none (tried: our own NDI output in the same namespace is not listed), so reception is not tested here
(docs/inputs.md says so)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sdbridge.inputs.ndi import matches


def test_a_source_is_named_by_its_full_name_or_its_stream_name() -> None:
    assert matches("STUDIO-PC (TouchDesigner)", "TouchDesigner")
    assert matches("STUDIO-PC (TouchDesigner)", "STUDIO-PC (TouchDesigner)")
    assert matches("STUDIO-PC (TouchDesigner)", None)  # plain ndi: the first source found
    assert not matches("STUDIO-PC (TouchDesigner)", "STUDIO-PC")
    assert not matches("STUDIO-PC (Resolume)", "TouchDesigner")


MISSING_SCRIPT = textwrap.dedent("""
    from sdbridge.inputs.base import InputError, create_input, parse_spec
    source = create_input(parse_spec("ndi:nobody-sends-this"))
    try:
        source.open()
    except InputError as exc:
        print("CODE", exc.code)
        print("MESSAGE", exc)
    finally:
        source.close()
""")


def test_a_source_that_is_not_there_is_an_input_that_waits_for_it() -> None:
    pytest.importorskip("cyndilib")
    unshare = shutil.which("unshare")
    # NDI discovery sends mDNS queries; tests never send multicast, so it runs in a namespace of its own.
    if unshare is None or subprocess.run([unshare, "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -n (root) to keep NDI's mDNS queries off the network")
    root = Path(__file__).resolve().parents[3]
    result = subprocess.run([unshare, "-n", sys.executable, "-c", MISSING_SCRIPT], capture_output=True, text=True,
                            timeout=120, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "CODE input_unavailable" in result.stdout
    assert "MESSAGE no NDI source nobody-sends-this on the network (sources seen: none)" in result.stdout
