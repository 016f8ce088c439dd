"""The synthetic world on the scoring side: its text encoder, detector and tracker.

``python run_train.py`` runs the SpatialAlign loop in a small synthetic world
(``spatialalign_jax.world``) through the same scoring code as the real loop: the world's videos
are scored by ``scoring.run`` with the world's decoder (``world.render.decode``: latents are pixels), and a colour
segmentation detector and tracker behind the Grounding DINO / SAM 2 interfaces. Its prompts are
embedded by a tiny umT5 (``UMT5EncoderModel``, random weights) with a word-level tokenizer built from
the world's vocabulary, saved once with ``save_pretrained`` and loaded like Wan's umT5.
"""

from __future__ import annotations

import os
from pathlib import Path

# The tiny umT5: small enough to embed every world prompt in seconds on a CPU. Its relative-position
# biases are drawn larger than the default init, so that a word's row carries its neighbours ("on the
# left of" and "to the left of" differ), as a trained encoder's rows do; with the default init a
# random 2-layer encoder's rows are nearly bags of words and "LR" and "RL" prompts look alike.
TEXT_ENCODER = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=16,
                    relative_attention_max_distance=32)
RELATIVE_BIAS_STD = 3.0
TEXT_ENCODER_SEED = 0


def build_text_encoder(out_dir: str | os.PathLike) -> Path:
    """Writes the world's tokenizer and umT5 encoder to ``out_dir`` (``from_pretrained`` loads it)."""
    import torch
    from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

    from spatialalign_jax.world.vocab import words

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in words()] + [(",", -2.0), (".", -2.0)]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    torch.manual_seed(TEXT_ENCODER_SEED)
    model = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **TEXT_ENCODER)).eval()
    for block in model.encoder.block:
        torch.nn.init.normal_(block.layer[0].SelfAttention.relative_attention_bias.weight, std=RELATIVE_BIAS_STD)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def detector_and_tracker():
    from spatialalign_jax.world.detector import ColourDetector, ColourTracker

    return ColourDetector(), ColourTracker()
