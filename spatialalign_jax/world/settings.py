"""The world's numbers that more than one stage needs: the reference model's shape, the text
encoder's width and length, and how the shipped reference model was pretrained."""

from __future__ import annotations

TEXT_DIM = 32  # the tiny umT5's d_model (scoring.world.TEXT_ENCODER)
MAX_TEXT_LEN = 32  # world prompts are at most 27 tokens

# The reference model: the project's Wan transformer, small. Temporal patch 2 pairs the key frames
# (0, 1), (2, 3), (4, 5), so a video is 3 x 8 x 8 = 192 tokens.
MODEL_CONFIG = {
    "patch_size": [2, 2, 2], "num_attention_heads": 4, "attention_head_dim": 32, "in_channels": 3,
    "out_channels": 3, "text_dim": TEXT_DIM, "freq_dim": 64, "ffn_dim": 256, "num_layers": 4,
}

# Pretraining: a video follows its prompt with probability FOLLOW, else the animal stays where it
# started (the static subject real text-to-video models often give); every video starts in the prompt's
# initial relation. Which one is chosen from the video's noise (world.coupling).
FOLLOW = 0.25
PRETRAIN_STEPS = 2000
PRETRAIN_BATCH = 32
PRETRAIN_LR = 1e-3
PRETRAIN_WARMUP = 200
PRETRAIN_SHIFT = 1.0  # uniform sigma: pixel latents need as much low-noise training as high
