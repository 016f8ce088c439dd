"""Tiny random models of the scoring process, saved in Hugging Face format for the tests.

Each builder seeds torch, builds a model small enough for a CPU test, and ``save_pretrained``s it
(with its processor or tokenizer) into a folder that the code under test loads with
``from_pretrained``, exactly as it loads the real checkpoints. Tokenizers are built offline.
"""

from __future__ import annotations

from pathlib import Path

import torch

# A word-level vocabulary covering the test prompts (Grounding DINO's BERT and CLIP's BPE-free use).
WORDS = [
    "dog", "cat", "fox", "teddy", "bear", "chair", "table", "box", "a", "the", "on", "left", "right",
    "top", "of", "to", "is", "then", "runs", "walks", "jumps", "in", "park", "room", "-", "t", "shirt",
    "natural", "synthetic", "photo", "room", ",",
]


def _bert_tokenizer(folder: Path):
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."] + list(dict.fromkeys(WORDS))
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab_source.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    return BertTokenizer(str(vocab_file))


def grounding_dino(folder: str | Path, image_size: int = 128) -> Path:
    """Grounding DINO (Swin + BERT) with 2 decoder layers; frames are resized to ``image_size``."""
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    folder = Path(folder)
    torch.manual_seed(0)
    tokenizer = _bert_tokenizer(folder)
    backbone = SwinConfig(
        embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, out_indices=[2, 3, 4]
    )
    text = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64,
    )
    config = GroundingDinoConfig(
        backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1, decoder_layers=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
        num_queries=12, max_text_len=32,
    )
    model = GroundingDinoForObjectDetection(config).eval()
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": image_size, "longest_edge": 2 * image_size})
    model.save_pretrained(folder)
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def sam2_video(folder: str | Path, image_size: int = 128) -> Path:
    """SAM 2 video (Hiera backbone) at ``image_size`` input, one memory-attention layer."""
    from transformers import Sam2ImageProcessor, Sam2VideoConfig, Sam2VideoModel, Sam2VideoProcessor
    from transformers.models.sam2.configuration_sam2 import Sam2HieraDetConfig, Sam2VisionConfig
    from transformers.models.sam2_video.configuration_sam2_video import (
        Sam2VideoMaskDecoderConfig,
        Sam2VideoPromptEncoderConfig,
    )
    from transformers.models.sam2_video.video_processing_sam2_video import Sam2VideoVideoProcessor

    folder = Path(folder)
    torch.manual_seed(0)
    s = image_size
    backbone = Sam2HieraDetConfig(
        hidden_size=8, num_attention_heads=1, image_size=[s, s], blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=[8, 16, 32, 64], num_attention_heads_per_stage=[1, 1, 1, 1],
        window_size_per_stage=[8, 4, 4, 4], global_attention_blocks=[3],
        window_positional_embedding_background_size=[4, 4],
    )
    vision = Sam2VisionConfig(
        backbone_config=backbone, backbone_channel_list=[64, 32, 16, 8],
        backbone_feature_sizes=[[s // 4, s // 4], [s // 8, s // 8], [s // 16, s // 16]], fpn_hidden_size=128,
    )
    config = Sam2VideoConfig(
        vision_config=vision,
        # Config objects, not dicts: transformers 5.17 builds both sub-configs of a dict as the prompt encoder's.
        prompt_encoder_config=Sam2VideoPromptEncoderConfig(hidden_size=128, image_size=s, patch_size=16),
        mask_decoder_config=Sam2VideoMaskDecoderConfig(hidden_size=128, mlp_dim=64, num_attention_heads=2,
                                                       iou_head_hidden_dim=32),
        image_size=s, memory_attention_hidden_size=128, memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=64, memory_attention_rope_feat_sizes=[s // 16, s // 16],
        memory_encoder_hidden_size=128, memory_encoder_output_channels=64, mask_downsampler_embed_dim=128,
        memory_fuser_num_layers=1, memory_fuser_embed_dim=128, memory_fuser_intermediate_dim=64,
    )
    model = Sam2VideoModel(config).eval()
    processor = Sam2VideoProcessor(
        image_processor=Sam2ImageProcessor(size={"height": s, "width": s}, mask_size={"height": s // 4, "width": s // 4}),
        video_processor=Sam2VideoVideoProcessor(size={"height": s, "width": s}),
        target_size=s,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# Hydra overrides that shrink Meta's SAM 2.1 hiera-tiny config to a 128 px, ~6M parameter model.
SAM2_PACKAGE_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
SAM2_PACKAGE_OVERRIDES = (
    "++model.image_size=128",
    "++model.image_encoder.trunk.embed_dim=8",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[4,4]",
    "++model.image_encoder.neck.backbone_channel_list=[64,32,16,8]",
    "++model.memory_attention.layer.self_attention.feat_sizes=[8,8]",
    "++model.memory_attention.layer.cross_attention.feat_sizes=[8,8]",
    "++model.memory_attention.num_layers=1",
    "++model.memory_attention.layer.dim_feedforward=64",
)


def sam2_package_checkpoint(folder: str | Path) -> Path:
    """A tiny random checkpoint of Meta's ``sam2`` package (``{"model": state_dict}`` in a .pt file).

    Its object-score head is biased to "object present" so that random masks are not all empty.
    """
    from sam2.build_sam import build_sam2_video_predictor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    predictor = build_sam2_video_predictor(
        SAM2_PACKAGE_CONFIG, None, device="cpu", hydra_overrides_extra=list(SAM2_PACKAGE_OVERRIDES)
    )
    with torch.no_grad():
        predictor.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(10.0)
    path = folder / "tiny_sam2.pt"
    torch.save({"model": predictor.state_dict()}, path)
    return path


def umt5_tokenizer():
    """A word-level SentencePiece-style (Unigram) T5 tokenizer built offline, with letter fallbacks."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -float(i + 1)) for i, w in enumerate(dict.fromkeys(WORDS))]
    vocab += [(c, -100.0) for c in "abcdefghijklmnopqrstuvwxyz,.'-"] + [("\u2581", -50.0)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def umt5(folder: str | Path, wan_layout: bool = False) -> Path:
    """A 2-layer umT5 encoder (d_model 32) and its tokenizer in ``folder`` (or, with ``wan_layout``,
    in ``folder/text_encoder`` and ``folder/tokenizer`` as in a Wan diffusers checkpoint)."""
    from transformers import UMT5Config, UMT5EncoderModel

    folder = Path(folder)
    torch.manual_seed(0)
    tokenizer = umt5_tokenizer()
    config = UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32,
    )
    model = UMT5EncoderModel(config).eval()
    model.save_pretrained(folder / "text_encoder" if wan_layout else folder)
    tokenizer.save_pretrained(folder / "tokenizer" if wan_layout else folder)
    return folder


def wan_vae(folder: str | Path, z_dim: int = 4) -> Path:
    """A Wan VAE (``AutoencoderKLWan``) with base width 8 and non-trivial latent statistics."""
    from diffusers import AutoencoderKLWan

    folder = Path(folder)
    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.1 * (i + 1) - 0.2 for i in range(z_dim)],
        latents_std=[0.5 + 0.25 * i for i in range(z_dim)],
    ).eval()
    vae.save_pretrained(folder)
    return folder


def dinov2(folder: str | Path) -> Path:
    """A one-layer DINOv2 (hidden 32, patch 14)."""
    from transformers import Dinov2Config, Dinov2Model

    folder = Path(folder)
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, patch_size=14, image_size=56)
    Dinov2Model(config).eval().save_pretrained(folder)
    return folder


def clip(folder: str | Path, image_size: int = 32) -> Path:
    """A one-layer CLIP (ViT, patch 8 at ``image_size``) with a character-level BPE tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(0)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz.,'-":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
            image_size=image_size, patch_size=8,
        ),
        projection_dim=16,
    )
    CLIPModel(config).eval().save_pretrained(folder)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
