"""Key layouts and weight reading of the converters, checked against diffusers' own converters."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from converters import io, layouts
from conv_tiny import (TINY_CONFIG, TINY_ORIGINAL_CONFIG, add_random_lora, assert_same_arrays, original_lora_names,
                       peft_lora_state_dict, save_diffusers_lora, state_dict_numpy, tiny_transformer, write_json)


@pytest.fixture(scope="module")
def tiny():
    return tiny_transformer()


@pytest.fixture(scope="module")
def tiny_sd(tiny):
    return state_dict_numpy(tiny)


def _delta(a, b, scale):
    """The weight change of one LoRA module: scale * B @ A."""
    return scale * np.asarray(b, np.float64) @ np.asarray(a, np.float64)


# --- base layouts ----------------------------------------------------------------------------------


def test_original_layout_matches_diffusers_converter(tiny_sd):
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    original = layouts.diffusers_to_original(tiny_sd)
    # Spot checks against the original Wan module names, written out by hand.
    assert "blocks.1.norm3.weight" in original and "blocks.1.cross_attn.o.bias" in original
    assert {"head.modulation", "head.head.weight", "time_projection.1.weight", "blocks.0.modulation",
            "text_embedding.2.bias", "blocks.0.ffn.0.weight"} <= set(original)
    # diffusers' converter turns our original layout back into exactly the model's state dict ...
    ref = convert_wan_transformer_to_diffusers({f"model.diffusion_model.{k}": v for k, v in original.items()})
    assert_same_arrays(ref, tiny_sd)
    # ... and so does ours, with any of the wrapper prefixes.
    for prefix in ("", "model.diffusion_model.", "diffusion_model."):
        assert_same_arrays(layouts.original_to_diffusers({prefix + k: v for k, v in original.items()}), tiny_sd)


def test_original_layout_unknown_key_is_named(tiny_sd):
    original = layouts.diffusers_to_original(tiny_sd)
    original["blocks.0.self_attn.qq.weight"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"unexpected keys.*blocks\.0\.self_attn\.qq\.weight"):
        layouts.original_to_diffusers(original)


def test_original_config_maps_to_diffusers():
    cfg = layouts.original_config_to_diffusers(TINY_ORIGINAL_CONFIG)
    assert {k: cfg[k] for k in TINY_CONFIG if k != "patch_size"} == {k: v for k, v in TINY_CONFIG.items() if k != "patch_size"}
    assert tuple(cfg["patch_size"]) == TINY_CONFIG["patch_size"]
    with pytest.raises(ValueError, match="model_type='i2v'.*only text-to-video"):
        layouts.original_config_to_diffusers({**TINY_ORIGINAL_CONFIG, "model_type": "i2v"})


def test_config_inferred_from_shapes_for_wan_sized_heads():
    # 256-dim model: two heads of 128, as every released Wan2.1 model has.
    model = tiny_transformer(num_attention_heads=2, attention_head_dim=128, ffn_dim=64)
    cfg = layouts.infer_diffusers_config(state_dict_numpy(model))
    want = {**TINY_CONFIG, "attention_head_dim": 128, "ffn_dim": 64, "patch_size": [1, 2, 2]}
    assert {k: cfg[k] for k in want} == want


# --- reading base weights ---------------------------------------------------------------------------


def test_read_diffusers_folder_single_and_sharded(tiny, tiny_sd, tmp_path):
    tiny.save_pretrained(tmp_path / "single")
    tiny.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    for name in ("single", "sharded"):
        base = io.read_base(tmp_path / name)
        assert base.layout == "diffusers" and base.dtype == "float32"
        assert base.config["num_attention_heads"] == TINY_CONFIG["num_attention_heads"]
        assert_same_arrays(base.state_dict, tiny_sd)


def test_read_pipeline_folder_uses_transformer_subfolder(tiny, tiny_sd, tmp_path, caplog):
    tiny.save_pretrained(tmp_path / "pipe" / "transformer")
    write_json(tmp_path / "pipe" / "model_index.json", {"_class_name": "WanPipeline"})
    assert_same_arrays(io.read_base(tmp_path / "pipe").state_dict, tiny_sd)
    # Wan2.2 A14B: two experts; the high-noise one is read, and the log says how to get the other.
    tiny.save_pretrained(tmp_path / "pipe" / "transformer_2")
    with caplog.at_level(logging.WARNING, logger="converters.io"):
        io.read_base(tmp_path / "pipe")
    assert "high-noise expert" in caplog.text and "transformer_2" in caplog.text


def test_unrepresentable_config_is_refused_before_reading_weights(tiny, tmp_path, monkeypatch):
    tiny.save_pretrained(tmp_path / "i2v")
    write_json(tmp_path / "i2v" / "config.json", {**TINY_CONFIG, "image_dim": 1280, "added_kv_proj_dim": 24})
    monkeypatch.setattr(io, "_load_files", lambda files: pytest.fail("weights were read before the config check"))
    with pytest.raises(ValueError, match="image_dim=1280"):
        io.read_base(tmp_path / "i2v")
    write_json(tmp_path / "i2v.json", {**TINY_ORIGINAL_CONFIG, "model_type": "ti2v"})
    with pytest.raises(ValueError, match="model_type='ti2v'.*per-token timesteps"):
        io.read_base(tmp_path / "i2v", config_path=tmp_path / "i2v.json")


def test_missing_shard_is_named(tiny, tmp_path):
    tiny.save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("*-of-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        io.read_base(tmp_path)


def test_missing_source_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.*does not exist"):
        io.read_base(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no weights found"):
        io.read_base(tmp_path / "empty")


def test_read_original_folder_file_and_pickle(tiny_sd, tmp_path):
    original = {k: torch.from_numpy(v) for k, v in layouts.diffusers_to_original(tiny_sd).items()}
    folder = tmp_path / "orig"
    folder.mkdir()
    save_file(original, folder / "diffusion_pytorch_model.safetensors")
    write_json(folder / "config.json", TINY_ORIGINAL_CONFIG)
    base = io.read_base(folder)
    assert base.layout == "original"
    assert {k: base.config[k] for k in TINY_CONFIG if k != "patch_size"} == \
        {k: v for k, v in TINY_CONFIG.items() if k != "patch_size"}
    assert_same_arrays(base.state_dict, tiny_sd)

    # A bare .pth with ComfyUI's prefix, config given separately.
    torch.save({"state_dict": {f"model.diffusion_model.{k}": v for k, v in original.items()}}, tmp_path / "w.pth")
    base = io.read_base(tmp_path / "w.pth", config_path=folder / "config.json")
    assert base.layout == "original"
    assert_same_arrays(base.state_dict, tiny_sd)


def test_bf16_stays_bf16(tiny_sd, tmp_path):
    sd = {k: torch.from_numpy(v).bfloat16() for k, v in tiny_sd.items()}
    save_file(sd, tmp_path / "w.safetensors")
    torch.save(sd, tmp_path / "w.ckpt")
    for name in ("w.safetensors", "w.ckpt"):
        got, _ = io.load_state_file(tmp_path / name)
        k = "blocks.0.attn1.to_q.weight"
        assert str(got[k].dtype) == "bfloat16"
        np.testing.assert_array_equal(got[k].astype(np.float32), sd[k].float().numpy())


def test_pickle_with_non_tensors_is_refused(tmp_path):
    torch.save({"epoch": 3, "weights": {"a": torch.zeros(2)}}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="not tensors"):
        io.load_state_file(tmp_path / "x.pth")


# --- LoRA layouts -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_lora(tmp_path_factory):
    model = tiny_transformer()
    cfg = add_random_lora(model, rank=4, alpha=8.0)
    folder = tmp_path_factory.mktemp("lora")
    path = save_diffusers_lora(model, cfg, folder)
    sd = {k: v.detach().numpy().copy() for k, v in peft_lora_state_dict(model).items()}
    return path, sd


def test_diffusers_lora_file_keeps_alpha(peft_lora):
    from diffusers import WanPipeline

    path, sd = peft_lora
    lora = io.read_lora(path)
    assert (lora.layout, lora.rank, lora.alpha, lora.alpha_source) == (layouts.LAYOUT_DIFFUSERS, 4, 8.0, "adapter metadata")
    # Same tensors as diffusers' own reader of the file.
    ref = WanPipeline.lora_state_dict(str(path))
    assert_same_arrays(lora.weights, {k.removeprefix("transformer."): v.numpy() for k, v in ref.items()})
    assert_same_arrays(lora.weights, sd)
    assert lora.targets == ("blocks.*.attn2.to_k", "blocks.*.attn2.to_v", "condition_embedder.text_embedder.linear_1",
                            "condition_embedder.text_embedder.linear_2")


def test_diffsynth_layout_equals_diffusers_layout(peft_lora, tmp_path):
    _, sd = peft_lora
    diffsynth = original_lora_names(sd, adapter=".default")
    assert "blocks.0.cross_attn.k.lora_A.default.weight" in diffsynth
    save_file({k: torch.from_numpy(v) for k, v in diffsynth.items()}, tmp_path / "ds.safetensors")
    lora = io.read_lora(tmp_path / "ds.safetensors", alpha=8.0)
    assert (lora.layout, lora.rank, lora.alpha) == (layouts.LAYOUT_ORIGINAL, 4, 8.0)
    assert_same_arrays(lora.weights, sd)


def test_kohya_layout_matches_diffusers_conversion(peft_lora, tmp_path):
    """`diffusion_model.` + lora_down/lora_up + .alpha, against diffusers' `lora_state_dict`."""
    from diffusers import WanPipeline

    _, sd = peft_lora
    kohya = {f"diffusion_model.{k}": torch.from_numpy(v)
             for k, v in original_lora_names(sd, ("lora_down", "lora_up")).items()}
    # Per-module alphas, one of them different, so folding into a common alpha is exercised. diffusers'
    # converter accepts no alpha on the text embedder: those modules run at scale 1 there and here.
    for k in list(kohya):
        if k.endswith("lora_down.weight") and ".blocks." in k:
            module = k.removesuffix(".lora_down.weight")
            kohya[f"{module}.alpha"] = torch.tensor(2.0 if "blocks.1.cross_attn.v" in module else 8.0)
    save_file(kohya, tmp_path / "kohya.safetensors")
    lora = io.read_lora(tmp_path / "kohya.safetensors")
    assert (lora.layout, lora.rank, lora.alpha, lora.alpha_source) == (layouts.LAYOUT_ORIGINAL, 4, 8.0, "per-module .alpha keys")

    # diffusers folds alpha into the factors (its LoRA then runs at scale 1); the weight deltas must agree.
    ref = {k.removeprefix("transformer."): v.numpy() for k, v in WanPipeline.lora_state_dict(str(tmp_path / "kohya.safetensors")).items()}
    assert set(ref) == set(lora.weights)
    for m in lora.modules:
        got = _delta(lora.weights[f"{m}.lora_A.weight"], lora.weights[f"{m}.lora_B.weight"], lora.alpha / lora.rank)
        want = _delta(ref[f"{m}.lora_A.weight"], ref[f"{m}.lora_B.weight"], 1.0)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=m)


def test_musubi_layout_matches_diffusers_conversion(tmp_path, caplog):
    """musubi-tuner's `lora_unet_blocks_0_self_attn_q.lora_down.weight` + `.alpha`, against diffusers'
    `lora_state_dict` (which folds alpha into the factors); all-zero weight diffs are dropped."""
    from diffusers import WanPipeline

    rng = np.random.default_rng(0)
    dim, ffn, rank = 24, 40, 4
    shapes = {f"{a}_{p}": (dim, dim) for a in ("self_attn", "cross_attn") for p in "qkvo"}
    shapes.update(ffn_0=(dim, ffn), ffn_2=(ffn, dim))
    musubi = {}
    for block in range(2):
        for name, (fan_in, fan_out) in shapes.items():
            key = f"lora_unet_blocks_{block}_{name}"
            musubi[f"{key}.lora_down.weight"] = torch.from_numpy(rng.standard_normal((rank, fan_in)).astype(np.float32))
            musubi[f"{key}.lora_up.weight"] = torch.from_numpy(rng.standard_normal((fan_out, rank)).astype(np.float32))
            musubi[f"{key}.alpha"] = torch.tensor(1.0 if name == "ffn_2" else 2.0)
    save_file(musubi, tmp_path / "musubi.safetensors")
    ref = {k.removeprefix("transformer."): v.numpy()
           for k, v in WanPipeline.lora_state_dict(str(tmp_path / "musubi.safetensors")).items()}

    save_file({**musubi, "lora_unet_blocks_0_norm3.diff": torch.zeros(dim)}, tmp_path / "with_diff.safetensors")
    with caplog.at_level(logging.INFO, logger="converters.layouts"):
        lora = io.read_lora(tmp_path / "with_diff.safetensors")
    assert "dropped 1 all-zero weight diffs" in caplog.text
    assert (lora.layout, lora.rank, lora.alpha) == (layouts.LAYOUT_ORIGINAL, rank, 2.0)
    assert set(ref) == set(lora.weights) and len(lora.modules) == 2 * 10
    for m in lora.modules:
        got = _delta(lora.weights[f"{m}.lora_A.weight"], lora.weights[f"{m}.lora_B.weight"], lora.alpha / lora.rank)
        want = _delta(ref[f"{m}.lora_A.weight"], ref[f"{m}.lora_B.weight"], 1.0)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=m)


def test_float8_and_bfloat16_safetensors_read_in_a_fresh_interpreter(tmp_path):
    """fp8 tensors (ComfyUI's `*_fp8_e4m3fn` checkpoints) are upcast to float32 as torch does; bf16
    reads without anything having imported ml_dtypes first."""
    import subprocess
    import sys

    w = torch.randn(8, 6).to(torch.float8_e4m3fn)
    b = torch.randn(6).bfloat16()
    save_file({"w": w, "b": b}, tmp_path / "f8.safetensors")
    code = ("import sys, numpy as np; from converters.io import load_state_file; "
            "sd, _ = load_state_file(sys.argv[1]); np.savez(sys.argv[2], w=sd['w'], b=sd['b'].astype(np.float32)); "
            "print(sd['w'].dtype, sd['b'].dtype)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "f8.safetensors"), str(tmp_path / "out.npz")],
                         capture_output=True, text=True, cwd=str(Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["float32", "bfloat16"]
    got = np.load(tmp_path / "out.npz")
    np.testing.assert_array_equal(got["w"], w.float().numpy())
    np.testing.assert_array_equal(got["b"], b.float().numpy())


def test_mixed_ranks_are_padded_exactly():
    rng = np.random.default_rng(0)
    a4, b4 = rng.standard_normal((4, 24)), rng.standard_normal((24, 4))
    a2, b2 = rng.standard_normal((2, 24)), rng.standard_normal((24, 2))
    sd = {"blocks.0.attn2.to_k.lora_A.weight": a4, "blocks.0.attn2.to_k.lora_B.weight": b4,
          "blocks.0.attn2.to_v.lora_A.weight": a2, "blocks.0.attn2.to_v.lora_B.weight": b2}
    md = {"transformer.lora_alpha": 8, "transformer.r": 4, "transformer.alpha_pattern": {"blocks.0.attn2.to_v": 1}}
    lora = layouts.normalize_lora(sd, metadata=md)
    assert (lora.rank, lora.alpha) == (4, 8.0)
    w = lora.weights
    np.testing.assert_allclose(_delta(w["blocks.0.attn2.to_k.lora_A.weight"], w["blocks.0.attn2.to_k.lora_B.weight"], 2.0),
                               _delta(a4, b4, 8 / 4), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_delta(w["blocks.0.attn2.to_v.lora_A.weight"], w["blocks.0.attn2.to_v.lora_B.weight"], 2.0),
                               _delta(a2, b2, 1 / 2), rtol=1e-5, atol=1e-5)


def test_rslora_keeps_peft_scale():
    """An rsLoRA adapter (scale alpha / sqrt(r)) loads as the plain LoRA whose delta PEFT itself computes."""
    import peft

    torch.manual_seed(0)
    model = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(24, 24)),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_rslora=True))
    layer = model.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    want = layer.get_delta_weight("default").detach().numpy()
    a, b = layer.lora_A["default"].weight.detach().numpy(), layer.lora_B["default"].weight.detach().numpy()
    sd = {"blocks.0.attn2.to_k.lora_A.weight": a, "blocks.0.attn2.to_k.lora_B.weight": b}
    lora = layouts.normalize_lora(sd, metadata={"transformer.lora_alpha": 8, "transformer.r": 4,
                                                "transformer.use_rslora": True})
    w = lora.weights
    got = _delta(w["blocks.0.attn2.to_k.lora_A.weight"], w["blocks.0.attn2.to_k.lora_B.weight"], lora.alpha / lora.rank)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_no_alpha_means_alpha_equals_rank_and_says_so(peft_lora, tmp_path, caplog):
    _, sd = peft_lora
    save_file({f"transformer.{k}": torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "bare.safetensors")
    with caplog.at_level(logging.INFO):
        lora = io.read_lora(tmp_path / "bare.safetensors")
    assert (lora.rank, lora.alpha) == (4, 4.0)
    assert "alpha = rank" in caplog.text
    assert io.read_lora(tmp_path / "bare.safetensors", alpha=8.0).alpha == 8.0


@pytest.mark.parametrize("suffix", [".pth", ".ckpt"])
def test_pickled_lora(peft_lora, tmp_path, suffix):
    _, sd = peft_lora
    wrapped = {"state_dict": original_lora_names({k: torch.from_numpy(v) for k, v in sd.items()}, adapter=".default")}
    torch.save(wrapped, tmp_path / f"lora{suffix}")
    lora = io.read_lora(tmp_path / f"lora{suffix}", alpha=8.0)
    assert_same_arrays(lora.weights, sd)


def test_unknown_lora_layouts_list_keys_and_accepted_layouts():
    z = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"(?s)unknown LoRA layout.*down_blocks_0_attentions_0\.lora_down\.weight.*Accepted layouts.*diffusers/PEFT"):
        layouts.normalize_lora({"lora_unet_down_blocks_0_attentions_0.lora_down.weight": z})
    with pytest.raises(ValueError, match=r"not implement.*blocks\.0\.norm3\.diff"):
        layouts.normalize_lora({"diffusion_model.blocks.0.norm3.diff": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match=r"only all-zero weight diffs"):
        layouts.normalize_lora({"diffusion_model.blocks.0.norm3.diff": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"unknown LoRA layout.*'lora_unet_blocks_0_foo\.lora_down\.weight'"):
        layouts.normalize_lora({"lora_unet_blocks_0_foo.lora_down.weight": z, "lora_unet_blocks_0_foo.lora_up.weight": z.T})
    with pytest.raises(ValueError, match=r"(?s)unknown LoRA layout.*'blocks\.0\.attn9\.to_k\.lora_A\.weight'.*Accepted layouts"):
        layouts.normalize_lora({"blocks.0.attn9.to_k.lora_A.weight": z, "blocks.0.attn9.to_k.lora_B.weight": z.T})
    with pytest.raises(ValueError, match=r"not implement.*lora_B\.bias"):
        layouts.normalize_lora({"blocks.0.attn2.to_k.lora_B.bias": z})
    with pytest.raises(ValueError, match=r"without both A.*blocks\.0\.attn2\.to_k"):
        layouts.normalize_lora({"blocks.0.attn2.to_k.lora_A.weight": z})
    with pytest.raises(ValueError, match=r"shapes A \(2, 3\), B \(2, 3\)"):
        layouts.normalize_lora({"blocks.0.attn2.to_k.lora_A.weight": z, "blocks.0.attn2.to_k.lora_B.weight": z})


def test_missing_lora_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"LoRA file .*missing\.safetensors.*does not exist"):
        io.read_lora(tmp_path / "missing.safetensors")


# --- atomic output ----------------------------------------------------------------------------------


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with io.atomic_output(dst) as tmp:
            tmp.mkdir()
            (tmp / "half-written").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    with io.atomic_output(dst) as tmp:
        tmp.mkdir()
        (tmp / "v1").write_text("1")
    with pytest.raises(FileExistsError, match="--overwrite"):
        with io.atomic_output(dst):
            pass
    with io.atomic_output(dst, overwrite=True) as tmp:
        tmp.mkdir()
        (tmp / "v2").write_text("2")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in dst.iterdir()] == ["v2"]
