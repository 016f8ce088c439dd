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
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from spatialalign_jax.common.atomic import write_text_atomic
from spatialalign_jax.common.store import SPLITS
from spatialalign_jax.model.config import DEFAULT_LORA_TARGETS, LoraConfig, WanConfig

from .losses import check_kind
from .pairs import TAU_TRAIN
from .step import StepConfig as _STEP

# The smoke run `python run_train.py` uses when given no config (configs/ at the repository root).
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"

DTYPES = ("float32", "bfloat16", "float16")
TIMESTEP_MODES = ("shared", "per_pair")  # one timestep index per batch (SPEC) or per pair
NOISE_MODES = ("independent", "shared")  # winner and loser noise: independent (SPEC) or the same draw


class RunConfigError(ValueError):
    """A run configuration that cannot be used; the message names the key, where it was set and the fix."""

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None,
                 detail: str | None = None) -> None:
        super().__init__(message)
        self.key, self.source, self.detail = key, source, detail


def _fail(key: str, message: str, source: str | None = None) -> typing.NoReturn:
    where = f" (from {source})" if source else ""
    raise RunConfigError(f"{key}{where}: {message}", key=key, source=source, detail=message)


def _one_of(key: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        _fail(key, f"{value!r} is not valid; choose one of {', '.join(map(repr, choices))}")


def _at_least(key: str, value: float, low: float, *, strict: bool = False) -> None:
    if not math.isfinite(value):  # NaN compares false with everything: it would pass the bound below
        _fail(key, f"must be a finite number, got {value!r}")
    if value < low or (strict and value == low):
        _fail(key, f"must be {'>' if strict else '>='} {low}, got {value!r}")


# -- sections ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSection:
    path: str | None = None  # diffusers transformer folder, original Wan checkpoint or converted checkpoint
    config: dict[str, Any] = field(default_factory=dict)  # WanConfig fields for a random init (path null)
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "bfloat16"  # frozen base weights; LoRA weights are always fp32
    attention: str = "auto"
    remat: str = "attention_kernel"
    scan_unroll: int = 1  # blocks per scan iteration (1: one compiled block; num_layers: fully unrolled)
    init_seed: int = 0  # random base weights (path null) and LoRA A matrices

    def __post_init__(self) -> None:
        # WanConfig does not check types itself: check and normalise here (YAML reads 1e-6 as a string).
        hints = typing.get_type_hints(WanConfig)
        config = {name: _coerce(value, hints[name], f"model.config.{name}", None) if name in hints else value
                  for name, value in dict(self.config).items()}
        object.__setattr__(self, "config", config)

    def validate(self) -> None:
        from spatialalign_jax.model.attention import IMPLEMENTATIONS
        from spatialalign_jax.model.transformer import REMAT_POLICIES

        if self.path is not None and not self.path:
            _fail("model.path", "is empty; give a checkpoint path or null for a random init")
        _one_of("model.dtype", self.dtype, DTYPES)
        _one_of("model.param_dtype", self.param_dtype, DTYPES)
        _one_of("model.attention", self.attention, IMPLEMENTATIONS)
        _one_of("model.remat", self.remat, tuple(REMAT_POLICIES))
        _at_least("model.scan_unroll", self.scan_unroll, 1)
        try:
            WanConfig.from_diffusers(self.config)
        except (TypeError, ValueError) as e:
            _fail("model.config", str(e))


@dataclass(frozen=True)
class LoraSection:
    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS

    def validate(self) -> None:
        _at_least("lora.rank", self.rank, 1)
        _at_least("lora.alpha", self.alpha, 0, strict=True)
        if not self.targets:
            _fail("lora.targets", "is empty: LoRA needs at least one target module (e.g. 'blocks.*.attn2.to_k')")


@dataclass(frozen=True)
class LossSection:
    # The SPEC values live once, in StepConfig's defaults.
    kind: str = _STEP.kind
    beta: float = _STEP.beta
    lam: float = _STEP.lam  # weight of the zeroth-order regulariser
    clip: float | None = _STEP.clip  # margin clip; null disables it
    lam_sft: float = _STEP.lam_sft  # weight of the winner reconstruction term of dpo_sft
    timestep: str = "shared"
    noise: str = "independent"

    def validate(self) -> None:
        try:
            check_kind(self.kind)
        except ValueError as e:
            _fail("loss.kind", str(e))
        _at_least("loss.beta", self.beta, 0, strict=True)
        _at_least("loss.lam", self.lam, 0)
        if self.clip is not None:
            _at_least("loss.clip", self.clip, 0, strict=True)
        _at_least("loss.lam_sft", self.lam_sft, 0)
        _one_of("loss.timestep", self.timestep, TIMESTEP_MODES)
        _one_of("loss.noise", self.noise, NOISE_MODES)


@dataclass(frozen=True)
class OptimSection:
    lr: float = _STEP.lr
    weight_decay: float = _STEP.weight_decay
    b1: float = _STEP.b1
    b2: float = _STEP.b2
    eps: float = _STEP.eps
    warmup_steps: int = _STEP.warmup_steps
    total_steps: int = _STEP.total_steps  # nominal length of the cosine; training may stop earlier (train.steps)
    grad_clip: float | None = _STEP.grad_clip  # global-norm clip; null: none

    def validate(self) -> None:
        _at_least("optim.lr", self.lr, 0, strict=True)
        _at_least("optim.weight_decay", self.weight_decay, 0)
        for name in ("b1", "b2"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                _fail(f"optim.{name}", f"must be in [0, 1), got {value!r}")
        _at_least("optim.eps", self.eps, 0, strict=True)
        _at_least("optim.warmup_steps", self.warmup_steps, 0)
        if self.total_steps <= self.warmup_steps:
            _fail("optim.total_steps", f"{self.total_steps} must exceed optim.warmup_steps={self.warmup_steps} "
                  "(the cosine decays over the steps after the warm-up)")
        if self.grad_clip is not None:
            _at_least("optim.grad_clip", self.grad_clip, 0, strict=True)


@dataclass(frozen=True)
class TrainSection:
    steps: int = 2400  # optimiser steps to run
    per_device_batch: int = 1  # pairs per device per micro-step
    grad_accum: int = 12  # micro-steps per optimiser step
    seed: int = 0  # pair draws, noise and timesteps
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 1
    prefetch: int = 2  # optimiser steps' worth of batches read ahead in a background thread

    def validate(self) -> None:
        for name in ("steps", "per_device_batch", "grad_accum", "checkpoint_every", "keep_checkpoints",
                     "log_every", "prefetch"):
            _at_least(f"train.{name}", getattr(self, name), 1)
        _at_least("train.seed", self.seed, 0)


def _synthetic_store_params() -> dict[str, inspect.Parameter]:
    from .pairs import make_synthetic_store

    params = dict(inspect.signature(make_synthetic_store).parameters)
    params.pop("path")
    return params


@dataclass(frozen=True)
class DataSection:
    store: str = "data/dsr_train"
    tau: float = TAU_TRAIN  # winner threshold on the DSR-Score
    max_text_len: int = 512  # rows the text embeddings are padded to
    split: str | None = "train"  # prompts of this split of the prompt table; null: all
    # make_synthetic_store keyword arguments: when set and `store` does not exist, the trainer builds it.
    synthetic: dict[str, Any] | None = None

    def validate(self) -> None:
        if not self.store:
            _fail("data.store", "is empty; give the path of the dataset store")
        if not 0 < self.tau <= 1:
            _fail("data.tau", f"must be in (0, 1], got {self.tau!r}")
        _at_least("data.max_text_len", self.max_text_len, 1)
        if self.split is not None and self.split not in SPLITS:
            _fail("data.split", f"must be one of {list(SPLITS)} or null (every prompt), got {self.split!r}")
        if self.synthetic is not None:
            known = _synthetic_store_params()
            unknown = sorted(set(self.synthetic) - set(known))
            if unknown:
                _fail("data.synthetic", f"unknown keys {unknown}; valid keys: {', '.join(known)}")
            for name, value in self.synthetic.items():  # whole numbers; latent_shape a list of them
                ints = value if name == "latent_shape" else [value]
                if (not isinstance(ints, (list, tuple)) or not ints
                        or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in ints)):
                    kind = "a list of whole numbers" if name == "latent_shape" else "a whole number >= 0"
                    _fail(f"data.synthetic.{name}", f"must be {kind}, got {value!r}")

    def synthetic_kwargs(self) -> dict[str, Any]:
        """The synthetic store's full arguments: ``data.synthetic`` over make_synthetic_store's defaults."""
        if self.synthetic is None:
            return {}
        defaults = {k: p.default for k, p in _synthetic_store_params().items()}
        return {**defaults, **self.synthetic}


@dataclass(frozen=True)
class RunSection:
    dir: str = "runs/spatialalign"  # checkpoints, metrics, TensorBoard events, the saved config
    name: str = "spatialalign"

    def validate(self) -> None:
        if not self.dir:
            _fail("run.dir", "is empty; give the run's output folder")
        if not self.name:
            _fail("run.name", "is empty")


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "lora": LoraSection,
    "loss": LossSection,
    "optim": OptimSection,
    "train": TrainSection,
    "data": DataSection,
    "run": RunSection,
}
TOP_LEVEL_FIELDS = ("mesh",)


@dataclass(frozen=True)
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=DataSection)
    run: RunSection = field(default_factory=RunSection)
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


def _default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


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


def _is_dict_field(cls: type, name: str) -> bool:
    hint = typing.get_type_hints(cls)[name]
    return any(typing.get_origin(t) is dict or t is dict for t in _union_members(hint))


def _union_members(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


_NO_MATCH = object()


def _match(value: Any, t: Any) -> Any:
    """``value`` normalised to the type ``t`` (ints to floats, lists to tuples), or ``_NO_MATCH``."""
    origin = typing.get_origin(t) or t
    if origin in (typing.Union, types.UnionType):
        for member in typing.get_args(t):
            out = _match(value, member)
            if out is not _NO_MATCH:
                return out
        return _NO_MATCH
    if t is type(None):
        return None if value is None else _NO_MATCH
    if t is Any:
        return value
    if t is bool:
        return value if isinstance(value, bool) else _NO_MATCH
    if t is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO_MATCH
    if t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                return float(value)
            except ValueError:
                return _NO_MATCH
        return _NO_MATCH
    if t is str:
        return value if isinstance(value, str) else _NO_MATCH
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return _NO_MATCH
        args = typing.get_args(t)
        element_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(element_types) != len(value):
            return _NO_MATCH
        out = tuple(_match(v, et) for v, et in zip(value, element_types))
        return _NO_MATCH if any(o is _NO_MATCH for o in out) else out
    if origin is dict:
        ok = isinstance(value, Mapping) and all(isinstance(k, str) for k in value)
        return dict(value) if ok else _NO_MATCH
    raise TypeError(f"run_config cannot check values of type {t!r}")


def _coerce(value: Any, hint: Any, key: str, source: str | None) -> Any:
    """``value`` checked against the field's type hint and normalised; a mismatch names the key."""
    out = _match(value, hint)
    if out is not _NO_MATCH:
        return out
    if value is None:
        _fail(key, f"must not be null; expected {_type_name(hint)}", source)
    tip = (" (quote it to make a number a string)"
           if str in _union_members(hint) and isinstance(value, (int, float)) else "")
    _fail(key, f"expected {_type_name(hint)}, got {type(value).__name__} {value!r}{tip}", source)


def _type_name(hint: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false", type(None): "null"}
    out = []
    for t in _union_members(hint):
        origin = typing.get_origin(t) or t
        if origin is tuple:
            args = typing.get_args(t)
            what = _type_name(args[0]).removeprefix("an ").removeprefix("a ")
            out.append(f"a list of {what}s" if len(args) == 2 and args[1] is Ellipsis
                       else f"a list of {len(args)} {what}s")
        else:
            out.append(names.get(t) or {dict: "a mapping"}.get(origin, str(t)))
    return " or ".join(out)


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


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and prefix.count(".") < 2:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
