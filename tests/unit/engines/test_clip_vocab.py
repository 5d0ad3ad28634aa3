import pytest

from sdbridge.engines.clip_vocab import write_clip_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path_factory.mktemp("tok")))


def test_well_known_clip_ids(tokenizer):
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_pads_to_77(tokenizer):
    ids = tokenizer("hello", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[-1] == 49407
