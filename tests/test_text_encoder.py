"""umT5 prompt embeddings against diffusers' WanPipeline._get_t5_prompt_embeds (tiny random umT5)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from scoring.text_encoder import UMT5TextEncoder
from tests import tiny_scoring_models as tiny

PROMPTS = [
    "In a park, a dog is on the left of a chair, then the dog runs to the right of the chair.",
    "a cat   is on the top of a  box,\n then the cat jumps to the left of the box.",
    "fox",
    "a teddy bear is on the right of a table &amp; then walks to the top of the table.",
]


@pytest.fixture(scope="module")
def umt5_dir(tmp_path_factory):
    return tiny.umt5(tmp_path_factory.mktemp("umt5"))


def pipeline_embeds(encoder_dir, prompts, tokenizer_dir=None):
    """diffusers' own function, bound to the same tokenizer and encoder loaded independently."""
    from diffusers import WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    fake_pipe = SimpleNamespace(
        tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir or encoder_dir),
        text_encoder=UMT5EncoderModel.from_pretrained(encoder_dir).eval(),
        _execution_device=torch.device("cpu"),
    )
    with torch.no_grad():
        return WanPipeline._get_t5_prompt_embeds(fake_pipe, prompts, max_sequence_length=512).numpy()


def test_matches_wan_pipeline(umt5_dir):
    """Rows equal the pipeline's to 1e-6 (same fp32 ops); the pipeline's rows past len are zero."""
    encoder = UMT5TextEncoder(umt5_dir, device="cpu", batch_size=3)
    got = encoder.encode(PROMPTS)
    ref = pipeline_embeds(umt5_dir, PROMPTS)
    assert ref.shape == (len(PROMPTS), 512, encoder.dim)
    for rows, padded in zip(got, ref):
        n = len(rows)
        assert rows.dtype == np.float32 and rows.shape == (n, 32)
        np.testing.assert_allclose(rows, padded[:n], atol=1e-6, rtol=0)
        assert not np.any(padded[n:]), "the pipeline zero-pads after the true token count"
        assert np.abs(rows).sum(axis=1).min() > 0
    # Lengths are the true token counts: EOS included, cleaning collapsed the white space.
    tokens = encoder.tokenizer("fox")["input_ids"]
    assert len(got[2]) == len(tokens) == 2


def test_batch_size_does_not_change_rows(umt5_dir):
    one = UMT5TextEncoder(umt5_dir, device="cpu", batch_size=1).encode(PROMPTS)
    many = UMT5TextEncoder(umt5_dir, device="cpu", batch_size=8).encode(PROMPTS)
    for a, b in zip(one, many):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_wan_checkpoint_layout_and_errors(tmp_path):
    root = tiny.umt5(tmp_path / "wan", wan_layout=True)
    encoder = UMT5TextEncoder(root, device="cpu")
    ref = pipeline_embeds(root / "text_encoder", PROMPTS[:1], tokenizer_dir=root / "tokenizer")
    rows = encoder.encode(PROMPTS[:1])[0]
    np.testing.assert_allclose(rows, ref[0, : len(rows)], atol=1e-6, rtol=0)
    with pytest.raises(FileNotFoundError, match="no_umt5_here"):
        UMT5TextEncoder(tmp_path / "no_umt5_here", device="cpu")
    # The pipeline's text_encoder/ folder itself: its tokenizer is the sibling tokenizer/ folder.
    direct = UMT5TextEncoder(root / "text_encoder", device="cpu").encode(PROMPTS[:1])[0]
    np.testing.assert_array_equal(direct, rows)
    with pytest.raises(TypeError, match="list of prompts"):
        encoder.encode("a dog")
