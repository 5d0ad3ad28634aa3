"""The CLIP tokenizer's vocabulary, built offline from open_clip's BPE file.

A single-file checkpoint carries no tokenizer. The vocabulary is the one OpenAI's CLIP and
open_clip share (49,408 tokens), which open_clip_torch ships as ``bpe_simple_vocab_16e6.txt.gz``.
The Makefile installs that package without its dependencies (its torchvision would replace our
torch), so it is never imported: only its data file is read.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from sdbridge.errors import ModelError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table (as in the CLIP/GPT-2 BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def find_bpe_file() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the CLIP vocabulary for single-file checkpoints comes from open_clip_torch, which is not "
                         "installed: pip install --no-deps open_clip_torch", code="missing_vocabulary")
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    if not path.is_file():
        raise ModelError(f"open_clip is installed but has no {BPE_FILE} at {path}", code="missing_vocabulary")
    return path


def build_vocabulary(bpe_path: Path | None = None) -> tuple[dict[str, int], list[str]]:
    """(token -> id, merges) exactly as CLIP's SimpleTokenizer builds them."""
    lines = gzip.open(bpe_path or find_bpe_file()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # as in CLIP's SimpleTokenizer: 48,894 merges
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [ch + "</w>" for ch in alphabet]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> Path:
    """A CLIPTokenizer folder (vocab.json, merges.txt, configs); SD 2.x pads with "!"."""
    vocab, merges = build_vocabulary()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}),
        encoding="utf-8")
    return folder
