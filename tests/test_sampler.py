"""The sampler against diffusers' WanPipeline, its seeds, and `python -m spatialalign_jax.sample` on a store.

Reference: a tiny random diffusers `WanTransformer3DModel` saved to disk; the Flax model is the same
folder through `load_transformer`. diffusers' `WanPipeline` (with the tiny transformer, a tiny VAE
it never runs, no text encoder) samples from our initial noise and our padded embeddings with
`output_type="latent"`, with its `FlowMatchEulerDiscreteScheduler` or flow `UniPCMultistepScheduler`.
"""

import numpy as np
import pytest
import torch

from conv_tiny import TINY_CONFIG, tiny_transformer
from spatialalign_jax import load_transformer
from spatialalign_jax.common.store import Store, create_store
from spatialalign_jax.model.sharding import make_mesh
from spatialalign_jax.sample import sampler
from spatialalign_jax.sample.cli import derived_seed, main, sample_store

LATENT_SHAPE = (4, 3, 4, 6)  # (C, F, H, W): 9 frames of 32 x 48 pixels through the Wan VAE factors
TEXT_LEN = 8  # the padded text length (512 at real scale)
TEXT_DIM = TINY_CONFIG["text_dim"]
# fp32 on both sides: measured max error 4e-7 x max|ref| over 4-20 steps of either solver.
PARITY_RTOL = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_wan") / "transformer"
    tiny_transformer(seed=3, out_channels=TINY_CONFIG["in_channels"]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(model_dir):
    return load_transformer(model_dir)


@pytest.fixture(scope="module")
def embeddings():
    """Two prompts of 5 and 3 tokens and a 6-token negative prompt, zero-padded to TEXT_LEN rows."""
    rng = np.random.default_rng(0)
    text = np.zeros((2, TEXT_LEN, TEXT_DIM), np.float32)
    text[0, :5] = rng.standard_normal((5, TEXT_DIM))
    text[1, :3] = rng.standard_normal((3, TEXT_DIM))
    neg = sampler.pad_text(rng.standard_normal((6, TEXT_DIM)), TEXT_LEN)
    return text, neg


@pytest.fixture
def one_torch_thread():
    # Tiny torch ops on a busy shared machine are ~100x slower with a thread pool than without.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pipeline(model_dir, scheduler):
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel

    vae = AutoencoderKLWan(base_dim=3, z_dim=LATENT_SHAPE[0], dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae.eval(), scheduler=scheduler,
                       transformer=WanTransformer3DModel.from_pretrained(model_dir).eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _scheduler(solver):
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if solver == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=5.0)
    # The scheduler of Wan's diffusers checkpoints (solver_order 2, bh2, predict_x0 by default).
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)


# 5 UniPC steps exercise every order: predictor 1,2,2,2,1 and corrector -,1,2,2,2.
@pytest.mark.parametrize("solver,steps,guidance", [("euler", 4, 5.0), ("unipc", 5, 5.0), ("unipc", 3, 1.0)])
def test_trajectory_matches_wan_pipeline(model_dir, model, embeddings, one_torch_thread, solver, steps, guidance):
    text, neg = embeddings
    seeds = [3, 7]
    ours = np.asarray(sampler.sample(model, text, neg, seeds=seeds, latent_shape=LATENT_SHAPE, num_steps=steps,
                                     guidance=guidance, shift=5.0, solver=solver))
    noise = np.asarray(sampler.initial_noise(seeds, LATENT_SHAPE))
    pipe = _pipeline(model_dir, _scheduler(solver))
    C, F, H, W = LATENT_SHAPE
    ref = pipe(prompt_embeds=torch.from_numpy(text), negative_prompt_embeds=torch.from_numpy(np.stack([neg, neg])),
               latents=torch.from_numpy(noise.copy()), height=H * 8, width=W * 8, num_frames=(F - 1) * 4 + 1,
               num_inference_steps=steps, guidance_scale=guidance, output_type="latent").frames.numpy()
    assert ours.shape == ref.shape == (2, *LATENT_SHAPE) and ours.dtype == np.float32
    err = np.abs(ours - ref).max()
    assert err <= PARITY_RTOL * np.abs(ref).max(), (err, np.abs(ref).max())
    # the run went somewhere: the result is far from the initial noise
    assert np.abs(ours - noise).max() > 0.1


def test_torch_noise_reproduces_wan_pipeline_by_seed(model_dir, model, embeddings, one_torch_thread):
    """noise="torch": the same samples as WanPipeline given only the seeds (a torch.Generator each)."""
    text, neg = embeddings
    seeds = [3, 7]
    ours = np.asarray(sampler.sample(model, text, neg, seeds=seeds, latent_shape=LATENT_SHAPE, num_steps=3,
                                     guidance=5.0, shift=5.0, solver="unipc", noise="torch"))
    pipe = _pipeline(model_dir, _scheduler("unipc"))
    C, F, H, W = LATENT_SHAPE
    ref = pipe(prompt_embeds=torch.from_numpy(text), negative_prompt_embeds=torch.from_numpy(np.stack([neg, neg])),
               generator=[torch.Generator().manual_seed(s) for s in seeds], height=H * 8, width=W * 8,
               num_frames=(F - 1) * 4 + 1, num_inference_steps=3, guidance_scale=5.0, output_type="latent").frames.numpy()
    assert np.abs(ours - ref).max() <= PARITY_RTOL * np.abs(ref).max()
    jax_noise = np.asarray(sampler.initial_noise(seeds, LATENT_SHAPE))
    assert not np.allclose(np.asarray(sampler.initial_noise(seeds, LATENT_SHAPE, source="torch")), jax_noise)
    with pytest.raises(ValueError, match="noise source 'numpy' unknown"):
        sampler.initial_noise(seeds, LATENT_SHAPE, source="numpy")


def test_unipc_first_and_last_steps():
    """Order 1 UniPC in flow form is an Euler step; the last step lands on the x0-prediction."""
    plan = sampler.sampling_plan(4, 5.0, "unipc")
    k = plan.coeffs
    s0, s1 = plan.sigmas[:2].astype(np.float64)
    # x + (s1 - s0) v with v = (x - m) / s0 is (s1/s0) x + (1 - s1/s0) m
    assert k["p_ratio"][0] == pytest.approx(s1 / s0, rel=1e-6)
    assert -k["p_m0"][0] == pytest.approx(1 - s1 / s0, rel=1e-5)
    assert k["p_d1"][0] == 0 and k["c_ratio"][0] == 0
    assert k["p_ratio"][-1] == 0 and k["p_m0"][-1] == pytest.approx(-1.0) and k["p_d1"][-1] == 0
    assert all(np.isfinite(v).all() for v in k.values())
    np.testing.assert_array_equal(plan.timesteps, np.array([999, 937, 833, 625], np.float32))


def test_seed_determinism(model, embeddings):
    text, neg = embeddings
    kw = dict(latent_shape=LATENT_SHAPE, num_steps=2, guidance=5.0)
    noise = np.asarray(sampler.initial_noise([11, 4], LATENT_SHAPE))
    import jax

    # the noise is defined from the seed alone
    np.testing.assert_array_equal(noise[1], np.asarray(jax.random.normal(jax.random.key(4), LATENT_SHAPE)))
    a = np.asarray(sampler.sample(model, text, neg, seeds=[11, 4], **kw))
    b = np.asarray(sampler.sample(model, text, neg, seeds=[11, 4], **kw))
    np.testing.assert_array_equal(a, b)
    # a sample does not depend on the batch it is drawn in
    alone = np.asarray(sampler.sample(model, text[1:], neg, seeds=[4], **kw))
    np.testing.assert_allclose(alone[0], a[1], rtol=0, atol=1e-5 * np.abs(a).max())
    other = np.asarray(sampler.sample(model, text[1:], neg, seeds=[5], **kw))
    assert np.abs(other - alone).max() > 0.1


def test_sharded_sampling_matches_single_device(model_dir, model, embeddings):
    import jax

    text, neg = embeddings
    mesh = make_mesh("data=2,fsdp=2", devices=jax.devices()[:4])
    sharded = load_transformer(model_dir, mesh=mesh)
    text4 = np.concatenate([text, text[::-1]])
    seeds = [1, 2, 3, 4]
    kw = dict(latent_shape=LATENT_SHAPE, num_steps=3, guidance=5.0)
    out = sampler.sample(sharded, text4, neg, seeds=seeds, mesh=mesh, **kw)
    assert out.sharding.spec[0] == ("data", "fsdp")
    ref = np.asarray(sampler.sample(model, text4, neg, seeds=seeds, **kw))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    with pytest.raises(ValueError, match="multiple of 4"):
        sampler.sample(sharded, text, neg, seeds=[1, 2], mesh=mesh, **kw)


def test_sampler_bad_inputs(model, embeddings):
    text, neg = embeddings
    kw = dict(latent_shape=LATENT_SHAPE, num_steps=2)
    with pytest.raises(ValueError, match="unknown solver 'heun'"):
        sampler.sample(model, text, neg, seeds=[0, 1], solver="heun", **kw)
    with pytest.raises(ValueError, match="negative prompt"):
        sampler.sample(model, text, None, seeds=[0, 1], **kw)
    with pytest.raises(ValueError, match="seeds must lie in"):
        sampler.sample(model, text, neg, seeds=[0, -1], **kw)
    with pytest.raises(ValueError, match="one row per seed"):
        sampler.sample(model, text, neg, seeds=[0], **kw)
    with pytest.raises(ValueError, match="16 channels"):
        sampler.sample(model, text, neg, seeds=[0, 1], latent_shape=(16, 3, 4, 6), num_steps=2)
    with pytest.raises(ValueError, match="patch size"):
        sampler.sample(model, text, neg, seeds=[0, 1], latent_shape=(4, 3, 5, 6), num_steps=2)
    with pytest.raises(ValueError, match="text_emb must be"):
        sampler.sample(model, text[..., :8], neg, seeds=[0, 1], **kw)
    with pytest.raises(ValueError, match="neg_emb must be"):
        sampler.sample(model, text, neg[:4], seeds=[0, 1], **kw)
    assert sampler.latent_shape_for(81, 480, 832) == (16, 21, 60, 104)
    with pytest.raises(ValueError, match="4k\\+1"):
        sampler.latent_shape_for(80, 480, 832)


# -- the CLI on a store ---------------------------------------------------------------------------------------


def _prompts(n):
    splits = ["train", "train", "test", "train"]
    return [{"type": "LR", "prompt_id": f"p{i}", "scene": "a field", "initial_SR": "left", "final_SR": "right",
             "animal": "cat", "object": "box", "prompt": f"prompt {i}", "split": splits[i % 4]} for i in range(n)]


def _store(path, *, num_prompts=3, latent_shape=LATENT_SHAPE, text_dim=TEXT_DIM, encode=True, negative=True):
    store = create_store(path, _prompts(num_prompts), samples_per_prompt=2, latent_shape=latent_shape, num_frames=9,
                         text_dim=text_dim, max_text_len=TEXT_LEN)
    rng = np.random.default_rng(1)
    if encode:
        for p in range(num_prompts):
            store.write_text_embedding(p, rng.standard_normal((2 + p, text_dim)).astype(np.float32))
    if negative:
        store.write_negative_text_embedding(rng.standard_normal((5, text_dim)).astype(np.float32))
    return store


def _cli(model_dir, store_path, *extra):
    return main(["--model", str(model_dir), "--store", str(store_path), "--steps", "2", "--dtype", "float32",
                 "--no-progress", *extra])


def test_cli_fills_resumes_and_shards(tmp_path, model_dir, model, capsys):
    path = tmp_path / "store"
    _store(path)
    # shard 0/2 holds prompts 0 and 2; first only slot 0, in batches of 2 (one padded)
    assert _cli(model_dir, path, "--shard", "0/2", "--samples-per-prompt", "1", "--batch", "2") == 0
    seeds = Store.open(path).read_seeds()
    assert (seeds[[0, 2], 0] >= 0).all() and (seeds[:, 1] == -1).all() and seeds[1, 0] == -1
    assert _cli(model_dir, path, "--shard", "0/2", "--batch", "2") == 0
    assert "sampled 2 latents over 2 prompts (skipped 2 already sampled)" in capsys.readouterr().out
    assert _cli(model_dir, path, "--shard", "1/2") == 0
    store = Store.open(path)
    seeds = store.read_seeds()
    # train prompts get derived seeds, the test prompt (p2) seeds 0..S-1
    assert seeds.tolist() == [[derived_seed(0, "p0", 0), derived_seed(0, "p0", 1)],
                              [derived_seed(0, "p1", 0), derived_seed(0, "p1", 1)], [0, 1]]
    before = store.array("latents").read().result()
    # everything sampled: a rerun writes nothing
    assert _cli(model_dir, path) == 0
    assert "nothing to sample" in capsys.readouterr().out
    np.testing.assert_array_equal(store.array("latents").read().result(), before)
    assert sample_store(Store.open(path, mode="r+"), model, num_steps=2, progress=False).written == 0

    # a stored sample is what the sampler gives for that prompt's padded text and seed
    text = sampler.pad_text(store.read_text_embedding(1), TEXT_LEN)[None]
    neg = sampler.pad_text(store.read_negative_text_embedding(), TEXT_LEN)
    latents, seed = store.read_latents(1, 1)
    want = np.asarray(sampler.sample(model, text, neg, seeds=[seed], latent_shape=LATENT_SHAPE, num_steps=2))[0]
    np.testing.assert_allclose(latents, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_cli_explicit_seeds(tmp_path, model_dir, capsys):
    path = tmp_path / "store"
    _store(path, num_prompts=1)
    assert _cli(model_dir, path, "--seeds", "42", "--guidance", "1") == 0
    assert Store.open(path).read_seeds().tolist() == [[42, -1]]
    # --noise torch reaches the sampler: a different start, so a different sample for the same seed
    path2 = tmp_path / "store2"
    _store(path2, num_prompts=1)
    assert _cli(model_dir, path2, "--seeds", "42", "--guidance", "1", "--noise", "torch") == 0
    assert not np.allclose(Store.open(path2).read_latents(0, 0)[0], Store.open(path).read_latents(0, 0)[0])
    # the store remembers: more samples with other settings are refused, naming them
    assert _cli(model_dir, path2, "--seeds", "42,43", "--guidance", "1") == 2
    err = capsys.readouterr().err
    assert "noise 'torch' there, 'jax' now" in err and "sampling.json" in err
    assert Store.open(path2).read_seeds().tolist() == [[42, -1]]
    assert _cli(model_dir, path2, "--seeds", "42,43", "--guidance", "1", "--noise", "torch") == 0


def test_cli_bad_inputs(tmp_path, model_dir, capsys):
    def error_of(store_path, *extra):
        assert _cli(model_dir, store_path, *extra) == 2
        return capsys.readouterr().err

    _store(tmp_path / "unencoded", encode=False)
    err = error_of(tmp_path / "unencoded")
    assert "no text embedding" in err and "'p0'" in err and "python -m scoring encode-prompts" in err
    _store(tmp_path / "no_neg", negative=False)
    err = error_of(tmp_path / "no_neg")
    assert "negative-prompt embedding" in err and "encode-prompts" in err
    _store(tmp_path / "wide", latent_shape=(16, 3, 4, 6))
    err = error_of(tmp_path / "wide")
    assert "16-channel latents" in err and "takes 4 channels" in err
    _store(tmp_path / "text", text_dim=32)
    assert "32-d text embeddings" in error_of(tmp_path / "text")
    assert "3 seeds given" in error_of(tmp_path / "text", "--seeds", "1,2,3")
    assert "seeds must lie in" in error_of(tmp_path / "text", "--seeds", "-4")
    assert "--mesh 'data=3'" in error_of(tmp_path / "text", "--mesh", "data=3")
    assert "--steps (0)" in error_of(tmp_path / "text", "--steps", "0")
    assert "--shift must be > 0" in error_of(tmp_path / "text", "--shift", "0")
    assert "--guidance must be a finite number" in error_of(tmp_path / "text", "--guidance", "nan")
    _store(tmp_path / "train_only", num_prompts=2)
    assert "has no prompt of that split (its prompts are in ['train'])" in error_of(tmp_path / "train_only", "--split",
                                                                                    "test")
    assert "is not a store" in error_of(tmp_path / "missing")
    assert main(["--model", str(tmp_path / "nope"), "--store", str(tmp_path / "text")]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "does not exist" in err
    with pytest.raises(SystemExit):
        main(["--model", str(model_dir), "--store", str(tmp_path / "text"), "--shard", "2/2"])
    assert "need n >= 1 and 0 <= i < n" in capsys.readouterr().err
