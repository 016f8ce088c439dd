"""umT5 prompt embeddings, computed exactly as diffusers' ``WanPipeline._get_t5_prompt_embeds``.

The pipeline cleans each prompt (``prompt_clean``: ftfy when installed, HTML unescaping, white
space), tokenizes it padded to ``max_sequence_length`` (512 in ``WanPipeline.__call__``) with the
attention mask, runs ``UMT5EncoderModel`` and keeps the first ``len`` rows, ``len`` being the
prompt's true token count (EOS included); the DiT then sees those rows zero-padded to 512. This
module returns the unpadded rows (SPEC section 6: the store keeps rows and length).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from scoring.loading import load_pretrained, load_processor

MAX_SEQUENCE_LENGTH = 512


def _has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name))
               for name in ("tokenizer_config.json", "tokenizer.json", "spiece.model"))


class UMT5TextEncoder:
    """umT5 encoder + tokenizer from a local folder.

    ``model_dir`` is a Wan diffusers checkpoint's root (with ``text_encoder/`` and ``tokenizer/``)
    or a folder holding both the encoder's ``config.json`` and the tokenizer files.
    ``dtype`` is the encoder's precision (float32 by default; the Wan checkpoints ship bfloat16).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int = 8,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    ):
        from transformers import AutoTokenizer, UMT5EncoderModel

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        root = os.fspath(model_dir)
        if os.path.isdir(os.path.join(root, "text_encoder")):  # the pipeline folder
            encoder_dir, tokenizer_dir = os.path.join(root, "text_encoder"), os.path.join(root, "tokenizer")
        else:
            encoder_dir = tokenizer_dir = root
            sibling = os.path.join(os.path.dirname(os.path.abspath(root)), "tokenizer")
            if not _has_tokenizer(root) and os.path.isdir(sibling):  # the pipeline's text_encoder/ itself
                tokenizer_dir = sibling
        self.batch_size = batch_size
        self.max_sequence_length = max_sequence_length
        self.model, self.device, self.dtype = load_pretrained(
            UMT5EncoderModel, encoder_dir, "umT5 text encoder", device, dtype, expect=("umt5",)
        )
        self.tokenizer = load_processor(AutoTokenizer, tokenizer_dir, "umT5 tokenizer")

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    @torch.inference_mode()
    def encode(self, prompts: Sequence[str]) -> list[np.ndarray]:
        """Per prompt, its (len_i, D) float32 embedding rows, ``len_i`` = its true token count."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not a single string")
        rows: list[np.ndarray] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = [prompt_clean(p) for p in prompts[start : start + self.batch_size]]
            tokens = self.tokenizer(
                batch,
                padding="max_length",
                max_length=self.max_sequence_length,
                truncation=True,
                add_special_tokens=True,
                return_attention_mask=True,
                return_tensors="pt",
            )
            mask = tokens.attention_mask
            lengths = mask.gt(0).sum(dim=1).tolist()
            hidden = self.model(tokens.input_ids.to(self.device), mask.to(self.device)).last_hidden_state
            hidden = hidden.float().cpu().numpy()
            rows.extend(h[:n].copy() for h, n in zip(hidden, lengths))
        return rows
