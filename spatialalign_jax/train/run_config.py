"""The configuration of a training run: one frozen, validated tree with the SPEC reference values as
defaults, read from YAML and amended by ``--set key=value`` overrides.

A YAML file names sections and fields (anything left out keeps its default)::

    model: {path: null, config: {num_layers: 2}, dtype: float32, remat: none}
    train: {steps: 30, grad_accum: 2}
    mesh: data=2,fsdp=4

Overrides use dotted keys; values are parsed as YAML (``--set train.steps=10``,
``--set loss.clip=null``, ``--set data.synthetic.num_prompts=8``). A key inside a dict-valued field
(``model.config``, ``data.synthetic``) sets one entry of it; a whole section given as a mapping
(``--set "train={steps: 5, seed: 1}"``) sets the fields it names. Float fields also take strings
that read as floats, because YAML 1.1 reads ``1e-4`` (no dot) as a string.

Unknown keys, wrong types and invalid values raise ``RunConfigError`` naming the key, its source
(file or override) and the valid choices. Relative paths are relative to the working directory.

The sections and their checks are in `run_sections.py`, the typed-value machinery they share in
`config_fields.py`; this module is the tree: `RunConfig`, reading YAML, ``--set`` and building.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from spatialalign_jax.common.atomic import write_text_atomic
from spatialalign_jax.model.config import LoraConfig, WanConfig

from .config_fields import RunConfigError, _coerce, _default_of, _fail, _flatten, _is_dict_field
from .run_sections import (  # noqa: F401  (the sections are importable from here too)
    DTYPES, NOISE_MODES, SECTIONS, TIMESTEP_MODES, TOP_LEVEL_FIELDS, DataSection, LoraSection, LossSection,
    LoopSection, ModelSection, OptimSection, RunSection, TrainSection)
from .step import StepConfig as _STEP

# What `python run_train.py` runs when given no config: the synthetic-world loop (configs/ at the
# repository root).
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[2] / "configs" / "world.yaml"


@dataclass(frozen=True)
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=DataSection)
    run: RunSection = field(default_factory=RunSection)
    loop: LoopSection = field(default_factory=LoopSection)
    mesh: str | None = None  # "data=D,fsdp=F"; null: all devices on fsdp

    def __post_init__(self) -> None:
        for name in SECTIONS:
            getattr(self, name).validate()
        if self.mesh is not None:
            from spatialalign_jax.model.sharding import parse_mesh

            try:
                parse_mesh(self.mesh)
            except ValueError as e:
                _fail("mesh", str(e))
        self._check_synthetic_matches_model()

    def _check_synthetic_matches_model(self) -> None:
        """A synthetic store must fit the randomly initialised model it feeds."""
        if self.data.synthetic is None or self.model.path is not None:
            return
        cfg = self.wan_config()
        kw = self.data.synthetic_kwargs()
        shape = tuple(kw["latent_shape"])
        if len(shape) != 4:
            _fail("data.synthetic.latent_shape", f"must be (channels, frames, height, width), got {list(shape)}")
        if kw["text_dim"] != cfg.text_dim:
            _fail("data.synthetic.text_dim", f"{kw['text_dim']} differs from the model's text_dim {cfg.text_dim}")
        if shape[0] != cfg.in_channels:
            _fail("data.synthetic.latent_shape",
                  f"has {shape[0]} channels but the model takes in_channels={cfg.in_channels}")
        if any(n % p for n, p in zip(shape[1:], cfg.patch_size)):
            _fail("data.synthetic.latent_shape",
                  f"frames/height/width {list(shape[1:])} are not multiples of the patch size {list(cfg.patch_size)}")

    # -- conversions -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain lists/dicts/scalars (YAML/JSON-ready); ``from_dict`` reads it back."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunConfig":
        """Builds from a (possibly partial) nested mapping; missing fields keep their defaults."""
        sources: dict[str, str] = {}
        return _build(_merged(_defaults(), d, "the config mapping", sources), sources)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save_yaml(self, path: str | os.PathLike) -> None:
        """Writes the config as YAML atomically (temp file + rename)."""
        write_text_atomic(path, self.to_yaml())

    def diff(self, other: "RunConfig") -> list[str]:
        """``"key: this -> other"`` for every dotted field that differs (e.g. to report on resume)."""
        a, b = _flatten(self.to_dict()), _flatten(other.to_dict())
        return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]

    # -- the objects the trainer builds from it ----------------------------------------------------

    def wan_config(self) -> WanConfig:
        """The transformer's architecture: ``model.config`` for a random init, else read from ``model.path``."""
        if self.model.path is None:
            return WanConfig.from_diffusers(self.model.config)
        from spatialalign_jax.model.checkpoint import is_checkpoint, read_checkpoint_meta

        path = Path(self.model.path)
        if is_checkpoint(path):
            return WanConfig.from_diffusers(read_checkpoint_meta(path)["config"])
        config_file = path / "config.json" if path.is_dir() else path.parent / "config.json"
        if not config_file.is_file():
            raise RunConfigError(
                f"model.path={self.model.path!r}: no config.json or converted checkpoint there, so the architecture "
                "cannot be read without loading the weights; load it with spatialalign_jax.load_transformer(path) "
                "and use model.cfg, or convert it with `python -m converters.to_flax`")
        from converters.io import is_original_config
        from converters.layouts import original_config_to_diffusers

        config = json.loads(config_file.read_text())
        return WanConfig.from_diffusers(original_config_to_diffusers(config) if is_original_config(config) else config)

    def lora_config(self) -> LoraConfig:
        return LoraConfig(rank=self.lora.rank, alpha=self.lora.alpha, targets=self.lora.targets)

    def step_config(self) -> _STEP:
        """The loss and optimiser settings as ``spatialalign_jax.train.step.StepConfig``."""
        loss, opt = self.loss, self.optim
        return _STEP(
            kind=loss.kind, beta=loss.beta, lam=loss.lam, clip=loss.clip, lam_sft=loss.lam_sft,
            per_pair_timestep=loss.timestep == "per_pair", shared_noise=loss.noise == "shared",
            lr=opt.lr, weight_decay=opt.weight_decay, b1=opt.b1, b2=opt.b2, eps=opt.eps,
            warmup_steps=opt.warmup_steps, total_steps=opt.total_steps, grad_clip=opt.grad_clip)

    def pairs_per_micro_step(self, num_devices: int) -> int:
        """Pairs in one micro-step over all devices (the sampler's global batch size)."""
        return self.train.per_device_batch * num_devices

    def pairs_per_step(self, num_devices: int) -> int:
        """The effective batch of one optimiser step (48 in the reference run: 4 x 1 x 12)."""
        return self.pairs_per_micro_step(num_devices) * self.train.grad_accum


# -- loading ----------------------------------------------------------------------------------------


def load_run_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (), *,
                    mesh: str | None = None) -> RunConfig:
    """The run config of the YAML file ``path`` (None: the SPEC defaults) with ``key=value`` overrides, then
    ``mesh`` (run_train's ``--mesh``) over them."""
    tree = _defaults()
    sources: dict[str, str] = {}
    if path is not None:
        tree = _merged(tree, _read_yaml(path), str(path), sources)
    for item in overrides:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise RunConfigError(f"override {item!r}: expected key=value, e.g. train.steps=10")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise RunConfigError(f"override {item!r}: the value is not valid YAML: {e}") from None
        _set_dotted(tree, key, value, f"--set {item}", sources)
    if mesh is not None:
        _set_dotted(tree, "mesh", mesh, f"--mesh {mesh}", sources)
    cfg = _build(tree, sources)
    if cfg.model.path is not None and cfg.model.config:
        warnings.warn(f"model.config is ignored: model.path={cfg.model.path!r} brings its own architecture",
                      stacklevel=2)
    if cfg.train.steps > cfg.optim.total_steps:
        warnings.warn(f"train.steps={cfg.train.steps} exceeds optim.total_steps={cfg.optim.total_steps}: the "
                      "learning rate stays 0 after the cosine ends", stacklevel=2)
    return cfg


def _read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run config {str(path)!r} does not exist (see configs/ for examples)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RunConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise RunConfigError(f"{path}: the top level must be a mapping of sections "
                             f"({', '.join(list(SECTIONS) + list(TOP_LEVEL_FIELDS))}), got {type(data).__name__}")
    return dict(data)


def _defaults() -> dict[str, Any]:
    """The default tree, as plain nested dicts (built without validation-heavy construction)."""
    tree: dict[str, Any] = {name: {f.name: _default_of(f) for f in dataclasses.fields(cls)}
                            for name, cls in SECTIONS.items()}
    tree["mesh"] = None
    return tree


def _valid_keys(prefix: str) -> str:
    if not prefix:
        return ", ".join(list(SECTIONS) + list(TOP_LEVEL_FIELDS))
    return ", ".join(f.name for f in dataclasses.fields(SECTIONS[prefix]))


def _merged(tree: dict[str, Any], update: Mapping[str, Any], source: str,
            sources: dict[str, str] | None = None) -> dict[str, Any]:
    """``tree`` with ``update``'s sections merged field by field (field values replace)."""
    tree = copy.deepcopy(tree)
    sources = {} if sources is None else sources
    for key, value in update.items():
        _set_dotted(tree, str(key), value, source, sources)
    return tree


def _set_dotted(tree: dict[str, Any], key: str, value: Any, source: str, sources: dict[str, str]) -> None:
    parts = key.split(".")
    head = parts[0]
    if head in TOP_LEVEL_FIELDS:
        if len(parts) > 1:
            _fail(key, f"{head!r} is a single value, not a section", source)
        tree[head], sources[head] = value, source
        return
    if head not in SECTIONS:
        _fail(key, f"unknown key {head!r}; valid top-level keys: {_valid_keys('')}", source)
    section = tree[head]
    if len(parts) == 1:
        if not isinstance(value, Mapping):
            _fail(key, f"a section must be given as a mapping of its fields ({_valid_keys(head)}), "
                  f"got {value!r}", source)
        for name, v in value.items():
            _set_dotted(tree, f"{head}.{name}", v, source, sources)
        return
    name = parts[1]
    if name not in section:
        _fail(key, f"unknown key {name!r} in section {head!r}; valid keys: {_valid_keys(head)}", source)
    field_key = f"{head}.{name}"
    if len(parts) == 2:
        section[name], sources[field_key] = value, source
        return
    if not _is_dict_field(SECTIONS[head], name):
        _fail(key, f"{field_key!r} is a single value; set it as {field_key}=VALUE", source)
    node = section[name]
    if node is None:
        node = section[name] = {}
    elif not isinstance(node, dict):
        _fail(key, f"{field_key!r} holds {node!r}, not a mapping", sources.get(field_key))
    for part in parts[2:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    sources[field_key] = source


def _build(tree: Mapping[str, Any], sources: Mapping[str, str]) -> RunConfig:
    kwargs: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        values = tree[name]
        kwargs[name] = cls(**{f: _coerce(values[f], hints[f], f"{name}.{f}", sources.get(f"{name}.{f}"))
                              for f in hints})
    kwargs["mesh"] = _coerce(tree["mesh"], str | None, "mesh", sources.get("mesh"))
    try:
        return RunConfig(**kwargs)
    except RunConfigError as e:
        if e.key is None or e.source is not None:
            raise
        # Value checks run on the built config; name where the offending key was set.
        parts = e.key.split(".")
        source = next((sources[k] for k in (".".join(parts[:n]) for n in range(len(parts), 0, -1))
                       if k in sources), None)
        if source is None:
            raise
        _fail(e.key, e.detail or str(e), source)


