"""How much device memory a model will take, known before loading it, so a load that cannot fit is
refused with a sentence instead of taking the running show down with an out-of-memory error.

The old engine keeps serving while the new one loads (sdbridge/bridge/engine_host.py), so the
new weights must fit in what is free *now*. The size comes from the safetensors headers alone
(element counts), read in microseconds without touching a tensor, and is converted to the dtype
the engine will load in.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdbridge.errors import ModelError

# Activations, the compiled graph's workspace and the allocator's slack on top of the weights:
# SD 1.5/2.1 at 512² batch 4 peaks near 1.2 GiB above its weights in fp16.
HEADROOM_BYTES = 1536 * 2**20
HEADROOM_FACTOR = 1.1


def safetensors_elements(file: Path) -> int:
    """Number of elements in a safetensors file, from its JSON header."""
    from sdbridge.engines.models import read_safetensors_header

    _length, header = read_safetensors_header(file)
    total = 0
    for name, entry in header.items():
        if name == "__metadata__" or not isinstance(entry, dict):
            continue
        count = 1
        for dim in entry.get("shape", []):
            count *= int(dim)
        total += count
    return total


def _weight_files(path: Path) -> list[Path]:
    """The files a load reads: one variant per component (an fp16 copy beside a full one counts once)."""
    if path.is_file():
        return [path] if path.suffix.lower() == ".safetensors" else []
    files: list[Path] = []
    for folder in sorted({file.parent for file in path.rglob("*.safetensors")}):
        in_folder = sorted(folder.glob("*.safetensors"))
        full = [file for file in in_folder if ".fp16." not in file.name]
        files.extend(full or in_folder)
    return files


def model_bytes(source: str | Path, dtype: torch.dtype) -> int | None:
    """Bytes the model's weights take once loaded in ``dtype``; None when the source is not local."""
    path = Path(source).expanduser()
    if not path.exists():
        return None
    files = _weight_files(path)
    if not files:
        return None
    element_size = torch.empty((), dtype=dtype).element_size()
    return sum(safetensors_elements(file) for file in files) * element_size


def check_fits(needed: int, free: int, *, what: str, device: str) -> None:
    """Raise ModelError (code out_of_memory) when ``needed`` bytes of weights will not fit in ``free``."""
    required = int(needed * HEADROOM_FACTOR) + HEADROOM_BYTES
    if required > free:
        raise ModelError(f"{what} needs about {required / 2**20:,.0f} MB on {device} (weights "
                         f"{needed / 2**20:,.0f} MB plus working memory) but only {free / 2**20:,.0f} MB are free; "
                         f"the current model keeps serving. Free memory (close other GPU programs, lower "
                         f"width/height) or load a smaller model", code="out_of_memory")


def free_device_bytes(device: torch.device) -> int | None:
    """Free memory on a CUDA device; None where it cannot be known (CPU, MPS)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)
