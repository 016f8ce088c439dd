"""The converter CLIs end to end: tiny random diffusers models and PEFT LoRAs on disk, converted with
`python -m converters.to_flax` / `to_diffusers` (their `main`), loaded with the user's loaders.

Forward parity tolerance (fp32): max |jax - torch| <= 1e-4 * max |torch|.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from converters import io, layouts, to_diffusers, to_flax
from spatialalign_jax.common import atomic
from conv_tiny import (TINY_CONFIG, TINY_ORIGINAL_CONFIG, add_random_lora, assert_same_arrays, inputs,
                       original_lora_names, save_diffusers_lora, state_dict_numpy, tiny_transformer, torch_forward,
                       write_json)

RTOL = 1e-4


def _rel_err(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def _flax_forward(ckpt, x, t, ctx, use_lora=True):
    from spatialalign_jax import load_transformer

    return np.asarray(load_transformer(ckpt)(x, t, ctx, use_lora=use_lora))


def _read(ckpt):
    from spatialalign_jax.model.checkpoint import read_checkpoint

    return read_checkpoint(ckpt)


def _tensors(sd):
    return {k: torch.from_numpy(v) for k, v in sd.items()}


def _no_leftovers(folder, keep=()):
    left = sorted(p.name for p in folder.iterdir() if p.name not in keep)
    assert left == [], f"partial output left behind: {left}"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Base model folder, a PEFT LoRA (r=4, alpha=8, B non-zero) and its reference outputs."""
    root = tmp_path_factory.mktemp("conv")
    base = tiny_transformer(seed=0)
    base.save_pretrained(root / "base")
    x, t, ctx = inputs()
    ref_base = torch_forward(base, x, t, ctx)
    lora_cfg = add_random_lora(base, rank=4, alpha=8.0)
    lora_file = save_diffusers_lora(base, lora_cfg, root / "lora")
    ref_lora = torch_forward(base, x, t, ctx)
    assert _rel_err(ref_lora, ref_base) > 1e-2  # the LoRA really changes the output
    assert to_flax.main(["--src", str(root / "base"), "--dst", str(root / "ckpt"), "--lora", str(lora_file)]) == 0
    return dict(root=root, base_sd=state_dict_numpy(tiny_transformer(seed=0)), lora_file=lora_file,
                lora_sd={k.removeprefix("transformer."): v.numpy() for k, v in load_file(lora_file).items()},
                x=x, t=t, ctx=ctx, ref_base=ref_base, ref_lora=ref_lora, ckpt=root / "ckpt")


def test_peft_lora_forward_equals_diffusers(work):
    meta, _, _ = _read(work["ckpt"])
    assert meta["lora"]["rank"] == 4 and meta["lora"]["alpha"] == 8.0
    args = (work["x"], work["t"], work["ctx"])
    assert _rel_err(_flax_forward(work["ckpt"], *args), work["ref_lora"]) <= RTOL
    assert _rel_err(_flax_forward(work["ckpt"], *args, use_lora=False), work["ref_base"]) <= RTOL


def test_converted_checkpoint_loads_onto_the_device_and_checks_shapes(work, tmp_path):
    """Without a mesh the weights still land on the device (Orbax alone would hand back numpy arrays),
    and a config that no longer fits the stored weights is an error, not a silent pad or cut."""
    import shutil

    import jax
    from flax import nnx

    from spatialalign_jax import load_transformer
    from spatialalign_jax.model.checkpoint import META_FILE

    leaves = jax.tree.leaves(nnx.state(load_transformer(work["ckpt"])))
    assert leaves and all(isinstance(v, jax.Array) for v in leaves)
    edited = tmp_path / "edited"
    shutil.copytree(work["ckpt"], edited)
    meta = json.loads((edited / META_FILE).read_text())
    meta["config"]["ffn_dim"] += 8
    (edited / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not fit the config"):
        load_transformer(edited)


def _check_diffusers_loads_export(work, path, *, alpha, rank):
    """The exported file's adapter metadata, and diffusers' forward with it loaded: the trained model's."""
    from diffusers import WanTransformer3DModel
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        md = json.loads(f.metadata()[io.LORA_METADATA_KEY])
    assert md["transformer.lora_alpha"] == alpha and md["transformer.r"] == rank
    model = WanTransformer3DModel.from_pretrained(work["root"] / "base")
    model.load_lora_adapter(str(path), prefix="transformer", use_safetensors=True)
    assert _rel_err(torch_forward(model, work["x"], work["t"], work["ctx"]), work["ref_lora"]) <= 1e-6


def _plain_mode(path) -> bool:
    """Readable as a file written with open() is (safetensors' own writer makes files owner-only)."""
    from spatialalign_jax.common.atomic import PLAIN_FILE_MODE

    return path.stat().st_mode & 0o777 == PLAIN_FILE_MODE


def test_export_round_trip(work, tmp_path):
    # The destination's parent folders are created, as for the README's `--dst export/lora`.
    assert to_diffusers.main(["--src", str(work["ckpt"]), "--dst", str(tmp_path / "export" / "out")]) == 0
    out = tmp_path / "export" / "out" / "pytorch_lora_weights.safetensors"
    assert _plain_mode(out)
    assert_same_arrays({k: v.numpy() for k, v in load_file(out).items()}, load_file(work["lora_file"]))
    _check_diffusers_loads_export(work, out, alpha=8, rank=4)

    # Back into Flax from the exported file: the same checkpoint.
    assert to_flax.main(["--src", str(work["root"] / "base"), "--dst", str(tmp_path / "again"), "--lora", str(out)]) == 0
    _, base1, lora1 = _read(work["ckpt"])
    _, base2, lora2 = _read(tmp_path / "again")
    assert_same_arrays(lora2, lora1)
    assert_same_arrays(base2, base1)

    with pytest.raises(SystemExit):
        to_diffusers.main(["--src", str(work["ckpt"]), "--dst", str(tmp_path / "m"), "--merge", "--fold-alpha"])

    # --fold-alpha: alpha = rank in the metadata, alpha / rank in lora_B; the same model in diffusers,
    # so a loader that ignores the metadata (it takes alpha = rank) gets it too.
    folded = tmp_path / "folded.safetensors"
    assert to_diffusers.main(["--src", str(work["ckpt"]), "--dst", str(folded), "--fold-alpha"]) == 0
    _check_diffusers_loads_export(work, folded, alpha=4, rank=4)


@pytest.mark.parametrize("shard", [None, "30KB"])
def test_merge_equals_unmerged(work, tmp_path, shard):
    from diffusers import WanTransformer3DModel

    argv = ["--src", str(work["ckpt"]), "--dst", str(tmp_path / "merged"), "--merge"]
    assert to_diffusers.main(argv + (["--max-shard-size", shard] if shard else [])) == 0
    assert (tmp_path / "merged" / to_diffusers.WEIGHTS_INDEX_NAME).exists() == bool(shard)
    assert all(_plain_mode(f) for f in (tmp_path / "merged").glob("*.safetensors"))
    merged = WanTransformer3DModel.from_pretrained(tmp_path / "merged")
    assert _rel_err(torch_forward(merged, work["x"], work["t"], work["ctx"]), work["ref_lora"]) <= 1e-5


def test_diffsynth_and_original_lora_layouts_give_the_same_model(work, tmp_path):
    _, _, want = _read(work["ckpt"])
    diffsynth = original_lora_names(_tensors(work["lora_sd"]), adapter=".default")
    save_file(diffsynth, tmp_path / "diffsynth.safetensors")
    kohya = {f"diffusion_model.{k}": v for k, v in original_lora_names(_tensors(work["lora_sd"]), ("lora_down", "lora_up")).items()}
    kohya.update({k.replace(".lora_down.weight", ".alpha"): torch.tensor(8.0) for k in list(kohya) if "lora_down" in k})
    save_file(kohya, tmp_path / "kohya.safetensors")
    cases = {"diffsynth": ["--lora", str(tmp_path / "diffsynth.safetensors"), "--lora-alpha", "8"],
             "kohya": ["--lora", str(tmp_path / "kohya.safetensors")]}
    for name, extra in cases.items():
        assert to_flax.main(["--src", str(work["root"] / "base"), "--dst", str(tmp_path / name)] + extra) == 0
        meta, _, got = _read(tmp_path / name)
        assert (meta["lora"]["rank"], meta["lora"]["alpha"]) == (4, 8.0), name
        assert_same_arrays(got, want)


@pytest.mark.parametrize("suffix", [".pth", ".ckpt"])
def test_pickled_lora(work, tmp_path, suffix):
    _, _, want = _read(work["ckpt"])
    torch.save({"state_dict": {f"transformer.{k}": torch.from_numpy(v) for k, v in work["lora_sd"].items()}},
               tmp_path / f"lora{suffix}")
    argv = ["--src", str(work["root"] / "base"), "--dst", str(tmp_path / "ck"), "--lora", str(tmp_path / f"lora{suffix}"),
            "--lora-alpha", "8"]
    assert to_flax.main(argv) == 0
    assert_same_arrays(_read(tmp_path / "ck")[2], want)


def test_original_layout_base_gives_the_same_model(work, tmp_path):
    _, want, _ = _read(work["ckpt"])
    original = {k: torch.from_numpy(v) for k, v in layouts.diffusers_to_original(work["base_sd"]).items()}
    folder = tmp_path / "orig"
    folder.mkdir()
    save_file(original, folder / "diffusion_pytorch_model.safetensors")
    write_json(folder / "config.json", TINY_ORIGINAL_CONFIG)
    torch.save({f"model.diffusion_model.{k}": v for k, v in original.items()}, tmp_path / "wan.pth")
    for name, argv in {"folder": ["--src", str(folder)],
                       "pth": ["--src", str(tmp_path / "wan.pth"), "--config", str(folder / "config.json")]}.items():
        assert to_flax.main(argv + ["--dst", str(tmp_path / f"ck_{name}")]) == 0
        meta, got, _ = _read(tmp_path / f"ck_{name}")
        assert meta["lora"] is None
        assert_same_arrays(got, want)


def test_bfloat16_storage(work, tmp_path):
    assert to_flax.main(["--src", str(work["root"] / "base"), "--dst", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    _, base, _ = _read(tmp_path / "bf16")
    assert str(base["blocks.attn1.to_q.kernel"].dtype) == "bfloat16"
    # diffusers keeps these in fp32 whatever the model dtype; so does the checkpoint.
    assert str(base["scale_shift_table"].dtype) == "float32"
    _, want, _ = _read(work["ckpt"])
    k = "blocks.attn1.to_q.kernel"
    np.testing.assert_allclose(base[k].astype(np.float32), want[k], rtol=2 ** -8)


def test_exported_lora_loads_unchanged_in_wan_pipeline(tmp_path):
    """`WanPipeline.load_lora_weights` on our export, in a tiny pipeline saved and loaded from disk."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

    words = ["a", "cat", "left", "of", "dog", "the"]
    tokenizer = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
                            + [("\u2581" + w, -float(i + 1)) for i, w in enumerate(words)], extra_ids=0)
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=TINY_CONFIG["text_dim"], d_kv=8,
                                               d_ff=32, num_layers=1, num_heads=2, relative_attention_num_buckets=8))
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    transformer = tiny_transformer(seed=3, out_channels=4)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), transformer=transformer)
    pipe.save_pretrained(tmp_path / "pipe")

    peft_model = tiny_transformer(seed=3, out_channels=4)
    lora_cfg = add_random_lora(peft_model, rank=4, alpha=8.0, seed=5)
    lora_file = save_diffusers_lora(peft_model, lora_cfg, tmp_path / "lora")
    x, t, ctx = inputs()
    ref = torch_forward(peft_model, x, t, ctx)

    # The pipeline folder goes in as SRC: its transformer/ is converted.
    assert to_flax.main(["--src", str(tmp_path / "pipe"), "--dst", str(tmp_path / "ck"), "--lora", str(lora_file)]) == 0
    assert _rel_err(_flax_forward(tmp_path / "ck", x, t, ctx), ref) <= RTOL
    assert to_diffusers.main(["--src", str(tmp_path / "ck"), "--dst", str(tmp_path / "export.safetensors")]) == 0

    pipe = WanPipeline.from_pretrained(tmp_path / "pipe")
    pipe.load_lora_weights(str(tmp_path / "export.safetensors"))
    assert _rel_err(torch_forward(pipe.transformer, x, t, ctx), ref) <= 1e-6
    video = pipe("a cat left of the dog", height=16, width=16, num_frames=5, num_inference_steps=2,
                 max_sequence_length=8, output_type="np", generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, 5, 16, 16, 3) and np.isfinite(video).all()


# --- bad input --------------------------------------------------------------------------------------


def _write_folder(folder, sd, config=None):
    folder.mkdir()
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()},
              folder / "diffusion_pytorch_model.safetensors")
    write_json(folder / "config.json", config or {"_class_name": "WanTransformer3DModel", **TINY_CONFIG})


def _fails(capsys, tmp_path, argv, *patterns, cli=to_flax):
    dst = tmp_path / "dst"
    assert cli.main(argv + ["--dst", str(dst)]) == 1
    err = capsys.readouterr().err
    for p in patterns:
        assert p in err, f"{p!r} not in: {err}"
    assert not dst.exists()
    return err


def test_bad_inputs_give_their_message(work, tmp_path, capsys):
    base, sd = str(work["root"] / "base"), work["base_sd"]
    z = np.zeros((4, 24), np.float32)

    _fails(capsys, tmp_path, ["--src", str(tmp_path / "missing")], "missing", "does not exist")
    _fails(capsys, tmp_path, ["--src", base, "--lora", str(tmp_path / "nolora.safetensors")],
           "LoRA file", "nolora.safetensors", "does not exist")

    _write_folder(tmp_path / "extra", {**sd, "blocks.0.attn1.to_z.weight": z})
    _fails(capsys, tmp_path, ["--src", str(tmp_path / "extra")], "unexpected key", "blocks.0.attn1.to_z.weight")

    _write_folder(tmp_path / "lacking", {k: v for k, v in sd.items() if k != "blocks.1.attn2.to_v.bias"})
    _fails(capsys, tmp_path, ["--src", str(tmp_path / "lacking")], "missing key", "blocks.1.attn2.to_v.bias")

    _write_folder(tmp_path / "shape", sd, {**TINY_CONFIG, "ffn_dim": 48})
    _fails(capsys, tmp_path, ["--src", str(tmp_path / "shape")], "shape mismatch", "ffn.net.0.proj")

    _write_folder(tmp_path / "i2v", sd, {**TINY_CONFIG, "image_dim": 1280, "added_kv_proj_dim": 24})
    _fails(capsys, tmp_path, ["--src", str(tmp_path / "i2v")], "image_dim")

    orig = tmp_path / "orig_i2v"
    orig.mkdir()
    save_file({k: torch.from_numpy(v) for k, v in layouts.diffusers_to_original(sd).items()},
              orig / "model.safetensors")
    write_json(orig / "config.json", {**TINY_ORIGINAL_CONFIG, "model_type": "i2v"})
    _fails(capsys, tmp_path, ["--src", str(orig)], "model_type='i2v'", "text-to-video")

    save_file({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "bare.safetensors")
    _fails(capsys, tmp_path, ["--src", str(tmp_path / "bare.safetensors")], "cannot infer", "config.json")

    # An interrupted download: the weights file cut short, a LoRA file of junk.
    _write_folder(tmp_path / "trunc", sd)
    weights = next((tmp_path / "trunc").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:2000])
    _fails(capsys, tmp_path, ["--src", str(tmp_path / "trunc")], weights.name, "truncated or corrupt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    _fails(capsys, tmp_path, ["--src", base, "--lora", str(tmp_path / "junk.safetensors")], "truncated or corrupt")
    junk = {"zip.pt": b"PK\x03\x04" + b"\x00" * 60, "noise.pt": np.random.default_rng(0).bytes(200),
            "lfs.pt": b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 12\n"}
    for name, data in junk.items():
        (tmp_path / name).write_bytes(data)
        _fails(capsys, tmp_path, ["--src", base, "--lora", str(tmp_path / name)], name, "truncated or corrupt")
    # A failed conversion leaves no folders behind, not even the destination's new parents.
    assert to_flax.main(["--src", str(tmp_path / "missing"), "--dst", str(tmp_path / "new" / "deep" / "ck")]) == 1
    assert not (tmp_path / "new").exists()
    capsys.readouterr()

    model = tiny_transformer()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shard = sorted((tmp_path / "sharded").glob("*-of-*.safetensors"))[-1]
    shard.unlink()
    _fails(capsys, tmp_path, ["--src", str(tmp_path / "sharded")], shard.name, "missing")

    save_file({"lora_unet_down_blocks_0_attentions_0.lora_down.weight": torch.zeros(4, 24)}, tmp_path / "sd.safetensors")
    _fails(capsys, tmp_path, ["--src", base, "--lora", str(tmp_path / "sd.safetensors")],
           "unknown LoRA layout", "down_blocks_0_attentions_0.lora_down.weight", "Accepted layouts")

    save_file({"transformer.blocks.7.attn2.to_k.lora_A.weight": torch.zeros(4, 24),
               "transformer.blocks.7.attn2.to_k.lora_B.weight": torch.zeros(24, 4)}, tmp_path / "deep.safetensors")
    _fails(capsys, tmp_path, ["--src", base, "--lora", str(tmp_path / "deep.safetensors")],
           "blocks the model does not have", "blocks.7.attn2.to_k")

    save_file({"transformer.patch_embedding.lora_A.weight": torch.zeros(4, 16),
               "transformer.patch_embedding.lora_B.weight": torch.zeros(24, 4)}, tmp_path / "conv.safetensors")
    _fails(capsys, tmp_path, ["--src", base, "--lora", str(tmp_path / "conv.safetensors")], "patch_embedding",
           "not a linear layer")

    # (Existing destinations: test_existing_destination_one_rule.)
    for cli, argv, message in [(to_flax, ["--lora-alpha", "-4"], "expected a number > 0"),
                               (to_diffusers, ["--merge", "--max-shard-size", "10XB"], "such as 5GB")]:
        with pytest.raises(SystemExit):
            cli.main(["--src", base, "--dst", str(tmp_path / "x"), *argv])
        assert message in capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    assert to_flax.main(["--src", base, "--dst", str(tmp_path / "afile" / "ck")]) == 1
    assert "is a file" in capsys.readouterr().err

    # to_diffusers: missing checkpoint, a checkpoint without LoRA.
    _fails(capsys, tmp_path, ["--src", str(tmp_path / "nock")], "not a converted checkpoint", cli=to_diffusers)
    assert to_flax.main(["--src", base, "--dst", str(tmp_path / "checkpoints" / "nolora_ck")]) == 0
    _fails(capsys, tmp_path, ["--src", str(tmp_path / "checkpoints" / "nolora_ck")], "holds no LoRA", "--merge", cli=to_diffusers)


@pytest.mark.parametrize("output", ["to_flax", "lora_folder", "lora_file", "merge"])
def test_existing_destination_one_rule(work, tmp_path, capsys, output):
    """Every converter output follows one rule: a missing destination or an empty folder is written; anything
    else there is refused without --overwrite (the message names the flag, nothing is touched) and replaced
    whole with it."""
    src = ["--src", str(work["root"] / "base")] if output == "to_flax" else ["--src", str(work["ckpt"])]
    cli, extra = (to_flax, []) if output == "to_flax" else (to_diffusers, ["--merge"] if output == "merge" else [])
    dst = tmp_path / ("out.safetensors" if output == "lora_file" else "out")

    def run(*flags):
        return cli.main(src + ["--dst", str(dst)] + extra + list(flags))

    def check_written():
        if output == "to_flax":
            assert _read(dst)[0]["lora"] is None
        elif output == "lora_folder":
            assert sorted(p.name for p in dst.iterdir()) == [io.LORA_WEIGHTS]
            assert_same_arrays({k: v.numpy() for k, v in load_file(dst / io.LORA_WEIGHTS).items()},
                               load_file(work["lora_file"]))
        elif output == "lora_file":
            assert dst.is_file() and set(load_file(dst)) == set(load_file(work["lora_file"]))
        else:
            assert (dst / to_diffusers.CONFIG_NAME).is_file()

    dst.mkdir()  # an empty folder is as good as none
    assert run() == 0, capsys.readouterr().err
    check_written()
    _no_leftovers(tmp_path, keep=[dst.name])

    # Something there already: the output just written, or a folder of unrelated files.
    for existing in ("output", "stranger"):
        if existing == "stranger":
            atomic._remove(dst)
            dst.mkdir()
            (dst / "notes.txt").write_text("mine")
        before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
        assert run() == 1
        err = capsys.readouterr().err
        assert "already exists" in err and "pass --overwrite to replace all of it" in err, err
        assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before  # untouched
        assert run("--overwrite") == 0, capsys.readouterr().err
        check_written()  # replaced whole: the stranger's file is gone with the rest
        _no_leftovers(tmp_path, keep=[dst.name])


def test_failed_conversion_leaves_nothing(work, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    out = tmp_path / "out"
    out.mkdir()
    real_wait = ocp.StandardCheckpointer.wait_until_finished

    def wait_then_crash(self):
        real_wait(self)  # the parameters are on disk ...
        raise OSError("disk full")  # ... and then the write fails before the metadata

    monkeypatch.setattr(ocp.StandardCheckpointer, "wait_until_finished", wait_then_crash)
    with pytest.raises(OSError, match="disk full"):
        to_flax.convert(work["root"] / "base", out / "ck", lora=work["lora_file"])
    _no_leftovers(out)
    monkeypatch.undo()

    def write_half(folder, config, sd, **kw):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt  # Ctrl-C halfway through the write

    monkeypatch.setattr(to_diffusers, "write_diffusers_folder", write_half)
    with pytest.raises(KeyboardInterrupt):
        to_diffusers.export_merged(work["ckpt"], out / "merged")
    _no_leftovers(out)


def test_lora_on_every_linear_and_some_blocks_only(work, tmp_path):
    """A LoRA as found in the wild: every attention/FFN/embedding linear, plus FFN LoRA on block 1 only."""
    linears = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
               "attn2.to_out.0"]
    targets = [f"blocks.{i}.{m}" for i in range(TINY_CONFIG["num_layers"]) for m in linears]
    targets += ["blocks.1.ffn.net.0.proj", "blocks.1.ffn.net.2", "condition_embedder.time_embedder.linear_1",
                "condition_embedder.time_embedder.linear_2", "condition_embedder.time_proj",
                "condition_embedder.text_embedder.linear_1", "condition_embedder.text_embedder.linear_2", "proj_out"]
    model = tiny_transformer(seed=0)
    lora_cfg = add_random_lora(model, rank=3, alpha=5.0, targets=targets, seed=7)
    lora_file = save_diffusers_lora(model, lora_cfg, tmp_path / "lora")
    ref = torch_forward(model, work["x"], work["t"], work["ctx"])
    assert to_flax.main(["--src", str(work["root"] / "base"), "--dst", str(tmp_path / "ck"), "--lora", str(lora_file)]) == 0
    assert _rel_err(_flax_forward(tmp_path / "ck", work["x"], work["t"], work["ctx"]), ref) <= RTOL
    # Exported again, the blocks the LoRA left out carry zero factors: the same model in diffusers.
    from diffusers import WanTransformer3DModel

    assert to_diffusers.main(["--src", str(tmp_path / "ck"), "--dst", str(tmp_path / "out.safetensors")]) == 0
    again = WanTransformer3DModel.from_pretrained(work["root"] / "base")
    again.load_lora_adapter(str(tmp_path / "out.safetensors"), prefix="transformer", use_safetensors=True)
    assert _rel_err(torch_forward(again, work["x"], work["t"], work["ctx"]), ref) <= 1e-6


def test_lora_only_checkpoint_exports(work, tmp_path, capsys):
    """Training writes LoRA-only checkpoints: they export as a LoRA file and merge into their base model."""
    from spatialalign_jax.model.checkpoint import lora_config_from_meta, save_checkpoint
    from spatialalign_jax.model.config import WanConfig

    meta, _, lora = _read(work["ckpt"])
    save_checkpoint(tmp_path / "lora_only", WanConfig.from_diffusers(meta["config"]), None,
                    lora_config_from_meta(meta), lora)
    assert to_diffusers.main(["--src", str(tmp_path / "lora_only"), "--dst", str(tmp_path / "x.safetensors")]) == 0
    assert_same_arrays({k: v.numpy() for k, v in load_file(tmp_path / "x.safetensors").items()},
                        load_file(work["lora_file"]))
    _fails(capsys, tmp_path, ["--src", str(tmp_path / "lora_only"), "--merge"], "LoRA weights only", cli=to_diffusers)
    _fails(capsys, tmp_path, ["--src", str(tmp_path / "lora_only"), "--merge", "--base", str(tmp_path / "lora_only")],
           "holds LoRA weights only; pass the base model", cli=to_diffusers)
    # --merge into the base it names: --base, or the base path a training run records in its meta
    from diffusers import WanTransformer3DModel

    assert to_diffusers.main(["--src", str(tmp_path / "lora_only"), "--dst", str(tmp_path / "merged"), "--merge",
                              "--base", str(work["root"] / "base")]) == 0
    merged = WanTransformer3DModel.from_pretrained(tmp_path / "merged")
    assert _rel_err(torch_forward(merged, work["x"], work["t"], work["ctx"]), work["ref_lora"]) <= 1e-5
    save_checkpoint(tmp_path / "trained", WanConfig.from_diffusers(meta["config"]), None,
                    lora_config_from_meta(meta), lora, extra_meta={"base": str(work["ckpt"])})
    assert to_diffusers.main(["--src", str(tmp_path / "trained"), "--dst", str(tmp_path / "merged2"), "--merge"]) == 0
    merged = WanTransformer3DModel.from_pretrained(tmp_path / "merged2")
    assert _rel_err(torch_forward(merged, work["x"], work["t"], work["ctx"]), work["ref_lora"]) <= 1e-5
