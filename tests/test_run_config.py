"""Run configuration: SPEC defaults, YAML + --set overrides, errors naming the key, the shipped configs."""

import json
import warnings
from pathlib import Path

import pytest
import yaml

from spatialalign_jax.model.config import DEFAULT_LORA_TARGETS, LoraConfig, WanConfig
from spatialalign_jax.train.run_config import (DEFAULT_CONFIG_PATH, RunConfig, RunConfigError, TrainSection,
                                         load_run_config)

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "configs" / "wan2.1_t2v_1.3b.yaml"
TINY = REPO / "configs" / "tiny.yaml"


def _write(tmp_path, data, name="run.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_defaults_are_the_spec_reference_values():
    cfg = load_run_config(None, [])
    assert cfg == RunConfig()
    assert (cfg.loss.kind, cfg.loss.beta, cfg.loss.lam, cfg.loss.clip) == ("dpo_zo", 1.0, 0.5, 5.0)
    assert (cfg.loss.timestep, cfg.loss.noise) == ("shared", "independent")
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets) == (16, 16.0, DEFAULT_LORA_TARGETS)
    o = cfg.optim
    assert (o.lr, o.weight_decay, o.b1, o.b2, o.eps, o.warmup_steps, o.total_steps) == (
        1e-4, 0.01, 0.9, 0.999, 1e-8, 300, 3000)
    t = cfg.train
    assert (t.steps, t.per_device_batch, t.grad_accum, t.checkpoint_every) == (2400, 1, 12, 100)
    assert cfg.pairs_per_step(4) == 48 and cfg.pairs_per_micro_step(4) == 4
    assert cfg.data.tau == 0.7 and cfg.data.max_text_len == 512
    assert cfg.model.path is None and cfg.wan_config() == WanConfig()  # random init of the 1.3B shape


def test_reference_config_matches_spec():
    cfg = load_run_config(REFERENCE, [])
    # Only the paths, names and the mesh differ from the SPEC defaults.
    changed = {line.split(":")[0] for line in cfg.diff(RunConfig())}
    assert changed == {"model.path", "run.dir", "run.name", "mesh", "loop.train_csv", "loop.test_csv",
                       "loop.text_encoder", "loop.vae", "loop.detector", "loop.tracker", "loop.scorers"}
    assert not cfg.loop.enabled  # the loop's stages run only when asked for
    assert cfg.mesh == "data=1,fsdp=4" and cfg.data.store == "data/dsr_train"
    assert cfg.pairs_per_step(4) == 48


def test_world_loop_is_the_default():
    assert DEFAULT_CONFIG_PATH == REPO / "configs" / "world.yaml"
    cfg = load_run_config(DEFAULT_CONFIG_PATH, [])
    assert cfg.loop.enabled and cfg.loop.world and cfg.model.path is None  # the world's shipped reference model
    assert cfg.loss.kind == "dpo_zo" and (cfg.loss.beta, cfg.loss.lam, cfg.loss.clip) == (1.0, 0.5, 5.0)  # SPEC
    assert cfg.data.tau == 0.7 and (cfg.lora.rank, cfg.lora.alpha) == (16, 16.0)
    with pytest.raises(RunConfigError, match="multiples of 6"):
        load_run_config(DEFAULT_CONFIG_PATH, ["loop.train_prompts=10"])
    with pytest.raises(RunConfigError, match="loop.solver"):
        load_run_config(DEFAULT_CONFIG_PATH, ["loop.solver=heun"])


def test_tiny_config_is_self_contained():
    cfg = load_run_config(TINY, [])
    assert cfg.model.path is None and cfg.mesh is None and cfg.data.synthetic is not None
    wan = cfg.wan_config()
    assert (wan.num_layers, wan.num_attention_heads, wan.attention_head_dim, wan.text_dim) == (2, 2, 32, 64)
    kw = cfg.data.synthetic_kwargs()
    assert kw["text_dim"] == wan.text_dim and tuple(kw["latent_shape"]) == (16, 3, 8, 8)
    assert kw["samples_per_prompt"] == 4 and kw["num_frames"] == 5  # a make_synthetic_store default
    assert cfg.optim.warmup_steps < cfg.train.steps <= cfg.optim.total_steps


def test_yaml_file_and_overrides(tmp_path):
    path = _write(tmp_path, {"train": {"steps": 7, "seed": 3}, "loss": {"kind": "dpo"},
                             "model": {"config": {"num_layers": 2}}})
    cfg = load_run_config(path, ["train.steps=10", "loss.kind=dpo_sft", "optim.lr=3e-4", "loss.clip=null",
                                 "model.config.eps=1e-5", "lora.targets=[blocks.*.attn2.to_k]",
                                 "mesh=data=2,fsdp=4", "train={grad_accum: 4}"])
    assert cfg.train.steps == 10 and cfg.train.seed == 3 and cfg.train.grad_accum == 4
    assert cfg.loss.kind == "dpo_sft" and cfg.loss.clip is None
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)  # "3e-4" is a YAML string: coerced
    assert cfg.model.config == {"num_layers": 2, "eps": 1e-5}
    assert cfg.lora.targets == ("blocks.*.attn2.to_k",)
    assert cfg.mesh == "data=2,fsdp=4"
    assert cfg.wan_config().num_layers == 2 and cfg.wan_config().eps == 1e-5
    assert cfg.lora_config() == LoraConfig(rank=16, alpha=16.0, targets=("blocks.*.attn2.to_k",))


def test_floats_written_without_a_dot_are_numbers(tmp_path):
    path = _write(tmp_path, "optim:\n  lr: 1e-4\n  eps: 1e-8\nmodel:\n  config: {eps: 1e-6}\n")
    cfg = load_run_config(path, [])
    assert cfg.optim.lr == 1e-4 and cfg.optim.eps == 1e-8 and cfg.model.config["eps"] == 1e-6


def test_round_trip_through_dict_yaml_and_json(tmp_path):
    cfg = load_run_config(TINY, ["loss.kind=dpo", "optim.grad_clip=1.0"])
    d = cfg.to_dict()
    assert RunConfig.from_dict(json.loads(json.dumps(d))) == cfg
    cfg.save_yaml(tmp_path / "sub" / "config.yaml")
    assert load_run_config(tmp_path / "sub" / "config.yaml", []) == cfg
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name != "config.yaml"]  # no temp file left
    assert RunConfig.from_dict({"train": {"steps": 5}}).train == TrainSection(steps=5)
    assert cfg.diff(cfg) == []


def test_step_config_maps_loss_and_optim():
    cfg = load_run_config(None, ["loss.timestep=per_pair", "loss.noise=shared", "loss.kind=dpo",
                                 "optim.grad_clip=2.0", "optim.lr=5e-5"])
    step = cfg.step_config()
    assert step.kind == "dpo" and step.per_pair_timestep and step.shared_noise
    assert step.grad_clip == 2.0 and step.lr == 5e-5 and step.warmup_steps == 300 and step.total_steps == 3000


@pytest.mark.parametrize("override, fragments", [
    ("train.stepz=1", ["train.stepz", "--set train.stepz=1", "valid keys: steps, per_device_batch"]),
    ("bogus=1", ["'bogus'", "valid top-level keys: model, lora, loss, optim, train, data, run, loop, mesh"]),
    ("train.steps=abc", ["train.steps", "expected an integer", "'abc'"]),
    ("train.steps=1.5", ["train.steps", "expected an integer"]),
    ("train.steps=0", ["train.steps", "must be >= 1"]),
    ("optim.lr=fast", ["optim.lr", "expected a number"]),
    ("loss.kind=foo", ["loss.kind", "--set loss.kind=foo", "unknown loss kind 'foo'", "dpo_zo"]),
    ("loss.timestep=each", ["loss.timestep", "'shared', 'per_pair'"]),
    ("loss.noise=same", ["loss.noise", "'independent', 'shared'"]),
    ("model.config.num_layres=2", ["model.config", "num_layres", "num_layers"]),
    ("model.config.num_layers=two", ["model.config.num_layers", "expected an integer"]),
    ("model.config.patch_size=[1,2]", ["model.config.patch_size", "a list of 3 integers"]),
    ("model.remat=most", ["model.remat", "'full'"]),
    ("model.attention=flash", ["model.attention", "'blockwise'"]),
    ("model.dtype=int8", ["model.dtype", "'bfloat16'"]),
    ("optim.warmup_steps=5000", ["optim.total_steps", "must exceed optim.warmup_steps=5000"]),
    ("optim.b2=1.0", ["optim.b2", "[0, 1)"]),
    ("mesh=data=x", ["mesh", "data=D,fsdp=F"]),
    ("mesh=tensor=2", ["mesh", "tensor"]),
    ("mesh.data=2", ["mesh.data", "single value"]),
    ("run.name=2024", ["run.name", "expected a string", "quote it"]),
    ("lora.targets=[1]", ["lora.targets", "a list of strings"]),
    ("lora.targets=[]", ["lora.targets", "is empty"]),
    ("lora.rank=0", ["lora.rank", ">= 1"]),
    ("data.tau=1.5", ["data.tau", "(0, 1]"]),
    ("data.split=eval", ["data.split", "['train', 'test'] or null", "'eval'"]),
    ("data.synthetic.foo=1", ["data.synthetic", "'foo'", "num_prompts"]),
    ("data.synthetic.text_dim=8", ["data.synthetic.text_dim", "text_dim 4096"]),
    ("data.synthetic.latent_shape=5", ["data.synthetic.latent_shape", "a list of whole numbers"]),
    ("data.synthetic.num_prompts=abc", ["data.synthetic.num_prompts", "a whole number >= 0", "'abc'"]),
    ("optim.lr=nan", ["optim.lr", "finite"]),
    ("loss.beta=.inf", ["loss.beta", "finite"]),
    ("train.steps.x=1", ["train.steps", "single value"]),
    ("train=5", ["train", "mapping of its fields"]),
    ("noequals", ["expected key=value"]),
])
def test_bad_overrides_name_the_key(override, fragments):
    with pytest.raises(RunConfigError) as e:
        load_run_config(None, [override])
    for fragment in fragments:
        assert fragment in str(e.value), (fragment, str(e.value))


def test_mesh_flag_is_named_as_itself():
    """run_train's --mesh overrides --set mesh=... and its errors say --mesh."""
    assert load_run_config(None, ["mesh=data=1,fsdp=1"], mesh="data=2,fsdp=4").mesh == "data=2,fsdp=4"
    with pytest.raises(RunConfigError, match=r"mesh \(from --mesh data=x\): "):
        load_run_config(None, [], mesh="data=x")


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_run_config(tmp_path / "missing.yaml", [])
    with pytest.raises(RunConfigError, match="not valid YAML"):
        load_run_config(_write(tmp_path, "train: [unclosed"), [])
    with pytest.raises(RunConfigError, match="top level must be a mapping"):
        load_run_config(_write(tmp_path, "- a\n- b\n"), [])
    bad = _write(tmp_path, {"optim": {"lr": 1e-4, "weight_decy": 0.1}})
    with pytest.raises(RunConfigError) as e:
        load_run_config(bad, [])
    assert "optim.weight_decy" in str(e.value) and str(bad) in str(e.value) and "weight_decay" in str(e.value)
    with pytest.raises(RunConfigError, match=r"data.synthetic.latent_shape.*in_channels=16"):
        load_run_config(_write(tmp_path, {"model": {"config": {"text_dim": 32}},
                                          "data": {"synthetic": {"latent_shape": [4, 1, 8, 8]}}}), [])
    assert load_run_config(_write(tmp_path, ""), []) == RunConfig()  # an empty file is all defaults


def test_warnings(tmp_path):
    with pytest.warns(UserWarning, match="exceeds optim.total_steps"):
        load_run_config(None, ["train.steps=4000"])
    with pytest.warns(UserWarning, match="model.config is ignored"):
        load_run_config(TINY, [f"model.path={tmp_path}"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_run_config(REFERENCE, [])


def test_wan_config_from_model_path(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(WanConfig(num_layers=3, text_dim=64).to_diffusers()))
    cfg = load_run_config(None, [f"model.path={folder}"])
    assert cfg.wan_config() == WanConfig(num_layers=3, text_dim=64)
    with pytest.raises(RunConfigError, match="no config.json"):
        load_run_config(None, [f"model.path={tmp_path / 'nothing'}"]).wan_config()
