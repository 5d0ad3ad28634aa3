"""Textual inversion: real file formats written here, loaded through our code, compared with diffusers'."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sdbridge.engines.models import load_pipeline_parts
from sdbridge.engines.prompt_encode import build_chunks, encode_prompt
from sdbridge.engines.prompt_syntax import parse_prompt
from sdbridge.engines.textual_inversion import EmbeddingError, TextualInversions, read_embedding

CPU = torch.device("cpu")
WIDTH = 32  # the tiny text encoder's


@pytest.fixture
def parts(tiny_model_dir):
    return load_pipeline_parts(str(tiny_model_dir), CPU, torch.float32)  # fresh: embeddings change it


def vectors(count: int, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


def write(path, kind: str, data: torch.Tensor):
    if kind == "a1111_safetensors":
        save_file({"emb_params": data.contiguous()}, str(path))
    elif kind == "diffusers_safetensors":
        save_file({"<learned>": data.contiguous()}, str(path))
    elif kind == "a1111_pt":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": data}, "name": path.stem, "step": 3000,
                    "sd_checkpoint": "abcd1234", "sd_checkpoint_name": "v1-5"}, str(path))
    elif kind == "diffusers_bin":
        torch.save({"<learned>": data}, str(path))
    return path


def encode(parts, text, inversions=None):
    with torch.inference_mode():
        return encode_prompt(text, parts.tokenizer, parts.text_encoder, CPU,
                             expand=inversions.expand if inversions else None)


@pytest.mark.parametrize("kind, suffix", [("a1111_safetensors", ".safetensors"),
                                          ("diffusers_safetensors", ".safetensors"),
                                          ("a1111_pt", ".pt"), ("diffusers_bin", ".bin")])
@pytest.mark.parametrize("count", [1, 3])
def test_formats_read(tmp_path, kind, suffix, count):
    data = vectors(count)
    embedding = read_embedding(write(tmp_path / f"inkstyle{suffix}", kind, data), allow_pickle=True)
    assert embedding.name == "inkstyle" and embedding.count == count and embedding.width == WIDTH
    assert torch.equal(embedding.vectors, data)
    assert embedding.tokens == ["inkstyle"] + [f"inkstyle_{i}" for i in range(1, count)]
    if kind == "a1111_pt":
        assert (embedding.step, embedding.sd_checkpoint, embedding.sd_checkpoint_name) == (3000, "abcd1234", "v1-5")


def test_a_single_vector_of_shape_d(tmp_path):
    save_file({"<learned>": vectors(1)[0].contiguous()}, str(tmp_path / "dot.safetensors"))
    assert read_embedding(tmp_path / "dot.safetensors").vectors.shape == (1, WIDTH)


@pytest.mark.parametrize("count", [1, 3])
def test_parity_with_diffusers_load_textual_inversion(tiny_model_dir, tmp_path, count):
    from diffusers import StableDiffusionPipeline

    path = write(tmp_path / "inkstyle.safetensors", "a1111_safetensors", vectors(count, seed=count))
    ours_parts, their_parts = (load_pipeline_parts(str(tiny_model_dir), CPU, torch.float32) for _ in range(2))
    inversions = TextualInversions(ours_parts.tokenizer, ours_parts.text_encoder)
    inversions.load_file(path)
    pipe = StableDiffusionPipeline(vae=their_parts.vae, text_encoder=their_parts.text_encoder,
                                   tokenizer=their_parts.tokenizer, unet=their_parts.unet,
                                   scheduler=their_parts.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.load_textual_inversion(str(path), token="inkstyle")
    prompt = "a fox, inkstyle, in snow"
    with torch.inference_mode():
        theirs, _ = pipe.encode_prompt(prompt, CPU, 1, False)
    assert torch.equal(encode(ours_parts, prompt, inversions), theirs)
    assert len(ours_parts.tokenizer) == len(their_parts.tokenizer)


def test_trigger_word_changes_the_embeddings(parts, tmp_path):
    before = encode(parts, "a fox, inkstyle")
    inversions = TextualInversions(parts.tokenizer, parts.text_encoder)
    inversions.load_file(write(tmp_path / "inkstyle.safetensors", "a1111_safetensors", vectors(2)))
    after = encode(parts, "a fox, inkstyle", inversions)
    assert not torch.allclose(before, after, atol=1e-3)
    assert torch.equal(encode(parts, "a red fox", inversions), encode(parts, "a red fox"))  # others untouched
    ids = parts.tokenizer.convert_tokens_to_ids(["inkstyle", "inkstyle_1"])
    assert torch.equal(parts.text_encoder.get_input_embeddings().weight[ids], vectors(2))
    assert inversions.expand([320, ids[0], 321]) == [320, *ids, 321]


def test_trigger_ignores_case_as_clip_does(parts, tmp_path):
    inversions = TextualInversions(parts.tokenizer, parts.text_encoder)
    inversions.load_file(write(tmp_path / "InkStyle.safetensors", "a1111_safetensors", vectors(3)))
    assert inversions.a1111_listing()["loaded"]["InkStyle"]["vectors"] == 3
    lower, upper = encode(parts, "a fox, inkstyle", inversions), encode(parts, "a fox, INKSTYLE", inversions)
    assert torch.equal(lower, upper)
    chunk = build_chunks(parse_prompt("inkstyle").pieces, parts.tokenizer, inversions.expand)[0]
    assert chunk.length == 2 + 3  # BOS, the three vectors, EOS


def test_width_mismatch_names_file_and_both_sizes(parts, tmp_path):
    path = write(tmp_path / "sdxl_style.safetensors", "a1111_safetensors", vectors(1, width=16))
    inversions = TextualInversions(parts.tokenizer, parts.text_encoder)
    with pytest.raises(EmbeddingError, match=r"sdxl_style\.safetensors.*width 16.*takes 32") as info:
        inversions.load_file(path)
    assert info.value.code == "embedding_mismatch"
    assert "sdxl_style" not in parts.tokenizer.get_vocab()


def test_pickle_refused_without_allow_pickle(tmp_path):
    path = write(tmp_path / "old.pt", "a1111_pt", vectors(1))
    with pytest.raises(EmbeddingError, match="--allow-pickle") as info:
        read_embedding(path)
    assert info.value.code == "pickle_refused"


def test_pickle_with_code_refused_even_with_allow_pickle(tmp_path):
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.getpid, ())

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"string_to_param": {"*": Evil()}}))
    with pytest.raises(EmbeddingError, match="refused .*: the file holds objects other than tensors"):
        read_embedding(path, allow_pickle=True)


@pytest.mark.parametrize("tensors, message", [
    ({"clip_l": vectors(1, 768), "clip_g": vectors(2, 1280)}, "clip_l has 1 vectors, clip_g 2"),
    ({"emb_params": torch.zeros(2, 2, 2)}, "not a float tensor"),
    ({"emb_params": torch.zeros(2, 32, dtype=torch.int32)}, "not a float tensor"),
])
def test_bad_files(tmp_path, tensors, message):
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(EmbeddingError, match=message):
        read_embedding(tmp_path / "bad.safetensors")


def test_a_vocabulary_word_loads_and_takes_the_words_place(parts, tmp_path):
    """As in A1111, x.safetensors fires on the word x (x</w>); its rows are the tokens <x>, <x_1>, since
    adding x itself would overwrite the letter's own row and split every word holding it."""
    plain_x, plain_xy = encode(parts, "a x"), encode(parts, "a xy")
    word_row = parts.text_encoder.get_input_embeddings().weight[parts.tokenizer.convert_tokens_to_ids("x</w>")].clone()
    inversions = TextualInversions(parts.tokenizer, parts.text_encoder)
    inversions.load_file(write(tmp_path / "x.safetensors", "a1111_safetensors", vectors(2)))
    rows = parts.tokenizer.convert_tokens_to_ids(["<x>", "<x_1>"])
    assert torch.equal(parts.text_encoder.get_input_embeddings().weight[rows], vectors(2))
    assert torch.equal(parts.text_encoder.get_input_embeddings().weight[parts.tokenizer.convert_tokens_to_ids("x</w>")],
                       word_row)
    word = parts.tokenizer("a x,", add_special_tokens=False)["input_ids"]
    assert inversions.expand(word) == [word[0], *rows, word[-1]]
    assert not torch.allclose(encode(parts, "a x", inversions), plain_x, atol=1e-3)
    assert torch.equal(encode(parts, "a xy", inversions), plain_xy)      # x inside a word is not the word x
    assert torch.equal(encode(parts, "a <x>", inversions), encode(parts, "a x", inversions))


@pytest.fixture(scope="module")
def clip_parts(tmp_path_factory):
    """CLIP's real BPE vocabulary (clip_vocab) before a tiny random text encoder: words split as in SD."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdbridge.engines.clip_vocab import write_clip_tokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path_factory.mktemp("clip") / "tokenizer"))
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=37, num_hidden_layers=1,
                            num_attention_heads=4, max_position_embeddings=77)
    torch.manual_seed(0)
    return tokenizer, CLIPTextModel(config).eval()


def spelled(tokenizer, text: str) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_triggers_match_the_names_own_tokens_in_clips_vocabulary(clip_parts, tmp_path):
    """A1111 matches an embedding where the prompt's ids hold the name's own ids: myemb (mye mb</w>) does
    not fire inside myembroidery (mye mb ro i dery</w>); style, a vocabulary word, fires on style."""
    tokenizer, text_encoder = clip_parts
    inversions = TextualInversions(tokenizer, text_encoder)
    inversions.load_file(write(tmp_path / "myemb.safetensors", "a1111_safetensors", vectors(1)))
    inversions.load_file(write(tmp_path / "style.safetensors", "a1111_safetensors", vectors(3, seed=1)))
    assert spelled(tokenizer, "myemb") == ["myemb"] and spelled(tokenizer, "myembroidery")[:2] == ["mye", "mb"]
    myemb = tokenizer.convert_tokens_to_ids("myemb")
    style = tokenizer.convert_tokens_to_ids(["<style>", "<style_1>", "<style_2>"])

    def expanded(text: str) -> list[int]:
        return inversions.expand(tokenizer(text, add_special_tokens=False)["input_ids"])

    for text in ("myembroidery", "tomyemb", "stylesheet", "styles", "a red fox"):
        assert expanded(text) == tokenizer(text, add_special_tokens=False)["input_ids"], text
    assert expanded("MyEmb, myemb") == [myemb, tokenizer.convert_tokens_to_ids(",</w>"), myemb]
    assert expanded("myemb2")[0] == myemb             # mye mb</w> 2</w>: the name's ids, then 2, as in A1111
    assert expanded("in style") == [tokenizer.convert_tokens_to_ids("in</w>"), *style]
    assert expanded("(style)").embeddings == [(1, 3)]


def test_folder_scan_listing_and_rescan(parts, tmp_path):
    folder = tmp_path / "embeddings"
    (folder / "sub").mkdir(parents=True)
    write(folder / "inkstyle.safetensors", "a1111_safetensors", vectors(2))
    write(folder / "sub" / "wide.safetensors", "a1111_safetensors", vectors(1, width=16))
    write(folder / "old.pt", "a1111_pt", vectors(1))
    (folder / "broken.safetensors").write_bytes(b"not safetensors")
    inversions = TextualInversions(parts.tokenizer, parts.text_encoder)
    assert inversions.load_folder(folder) == ["inkstyle"]
    listing = inversions.a1111_listing()
    assert listing == {
        "loaded": {"inkstyle": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 32,
                                "vectors": 2}},
        "skipped": {"wide": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 16,
                             "vectors": 1}}}
    assert set(inversions.failed) == {"old", "broken"}
    version = inversions.version
    assert inversions.load_folder(folder) == [] and inversions.version == version  # nothing new
    write(folder / "paper.safetensors", "diffusers_safetensors", vectors(1, seed=5))
    write(folder / "inkstyle.safetensors", "a1111_safetensors", vectors(2, seed=9))  # changed on disk
    assert inversions.load_folder(folder, allow_pickle=True) == ["inkstyle", "old", "paper"]
    assert inversions.version > version
    ids = parts.tokenizer.convert_tokens_to_ids(["inkstyle", "inkstyle_1"])
    assert torch.equal(parts.text_encoder.get_input_embeddings().weight[ids], vectors(2, seed=9))
    assert inversions.a1111_listing()["loaded"]["old"]["step"] == 3000


@pytest.mark.parametrize("words, lengths", [(72, [77]), (73, [75, 5]), (74, [76, 5])])
def test_a_multi_vector_embedding_never_straddles_chunks(parts, tmp_path, words, lengths):
    """As A1111's tokenize_line: an embedding that does not fit in what is left of the chunk closes it
    (padded) and starts the next one; 72 words + 3 vectors fill one chunk exactly."""
    inversions = TextualInversions(parts.tokenizer, parts.text_encoder)
    inversions.load_file(write(tmp_path / "inkstyle.safetensors", "a1111_safetensors", vectors(3)))
    ids = parts.tokenizer.convert_tokens_to_ids(["inkstyle", "inkstyle_1", "inkstyle_2"])
    prompt = "a " * words + "(inkstyle:1.2)"
    chunks = build_chunks(parse_prompt(prompt).pieces, parts.tokenizer, inversions.expand)
    assert [chunk.length for chunk in chunks] == lengths
    last = chunks[-1]
    assert last.tokens[last.length - 4:last.length - 1] == ids
    assert last.multipliers[last.length - 4:last.length - 1] == [1.2] * 3
    if len(chunks) == 2:
        # The second chunk is the embedding alone, so it encodes as the prompt "(inkstyle:1.2)" does.
        assert torch.equal(encode(parts, prompt, inversions)[:, 77:], encode(parts, "(inkstyle:1.2)", inversions))


def test_an_a1111_pt_takes_its_one_entry_whatever_its_key(tmp_path):
    """A1111 takes string_to_param's single entry (next(iter(...))); a key other than '*' was refused (QA 24)."""
    data = vectors(2)
    path = tmp_path / "tokened.pt"
    torch.save({"string_to_token": {"<tok>": 265}, "string_to_param": {"<tok>": data}, "step": 10}, str(path))
    embedding = read_embedding(path, allow_pickle=True)
    assert torch.equal(embedding.vectors, data) and embedding.step == 10
    torch.save({"string_to_param": {"a": data, "b": data}}, str(tmp_path / "two.pt"))
    with pytest.raises(EmbeddingError, match="string_to_param has 2 entries"):
        read_embedding(tmp_path / "two.pt", allow_pickle=True)


def test_an_sdxl_embeddings_shape_is_both_widths_as_a1111_lists_it(tmp_path):
    path = tmp_path / "xl.safetensors"
    save_file({"clip_l": vectors(2, 32), "clip_g": vectors(2, 64)}, str(path))
    assert read_embedding(path).a1111()["shape"] == 96   # A1111: clip_g's width + clip_l's (2048 for real files)
    save_file({"emb_params": vectors(2, 32)}, str(tmp_path / "sd.safetensors"))
    assert read_embedding(tmp_path / "sd.safetensors").a1111()["shape"] == 32


def test_an_sdxl_rescan_reloads_a_file_whose_clip_g_table_alone_changed(tiny_sdxl_dir, tmp_path):
    """QA 72 F8: the rescan compared clip_l only, so a file retrained on clip_g kept its old clip_g rows."""
    sdxl = load_pipeline_parts(str(tiny_sdxl_dir), CPU, torch.float32)
    inversions = TextualInversions(sdxl.tokenizer, sdxl.text_encoder, sdxl.tokenizer_2, sdxl.text_encoder_2)
    folder = tmp_path / "embeddings"
    folder.mkdir()
    width_g = sdxl.text_encoder_2.get_input_embeddings().weight.shape[1]
    clip_l = vectors(2, 32)
    save_file({"clip_l": clip_l, "clip_g": torch.zeros(2, width_g)}, str(folder / "myemb.safetensors"))
    assert inversions.load_folder(folder) == ["myemb"]
    version = inversions.version
    assert inversions.load_folder(folder) == [] and inversions.version == version  # unchanged: skipped
    save_file({"clip_l": clip_l, "clip_g": torch.ones(2, width_g)}, str(folder / "myemb.safetensors"))
    assert inversions.load_folder(folder) == ["myemb"]
    assert inversions.version > version
    rows = sdxl.tokenizer_2.convert_tokens_to_ids(["myemb", "myemb_1"])
    assert torch.equal(sdxl.text_encoder_2.get_input_embeddings().weight[rows], torch.ones(2, width_g))
