"""The sections of a training run's config (`run_config.RunConfig`): model, lora, loss, optim, train,
data, run. Each is a frozen dataclass whose defaults are the SPEC reference values and whose
``validate`` names the key of a value that cannot be used.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass, field
from typing import Any

from spatialalign_jax.common.store import SPLITS
from spatialalign_jax.model.config import DEFAULT_LORA_TARGETS, WanConfig

from .config_fields import _at_least, _coerce, _fail, _one_of
from .losses import check_kind
from .pairs import TAU_TRAIN
from .step import StepConfig as _STEP

DTYPES = ("float32", "bfloat16", "float16")
TIMESTEP_MODES = ("shared", "per_pair")  # one timestep index per batch (SPEC) or per pair
NOISE_MODES = ("independent", "shared")  # winner and loser noise: independent (SPEC) or the same draw


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


@dataclass(frozen=True)
class LoopSection:
    """The whole loop as stages (``spatialalign_jax.loop``): with ``enabled``, ``run_train.py`` runs
    prompts -> encode -> sample -> score -> train -> export -> sample_test -> score_test -> evaluate
    in ``run.dir`` instead of training on an existing ``data.store``."""

    enabled: bool = False
    world: bool = False  # the synthetic world: its prompts, text encoder, reference model, colour detector
    train_csv: str | None = None  # real models: training prompts (`python -m spatialalign_jax.dataset` makes them)
    test_csv: str | None = None  # real models: test prompts (e.g. scoring/reference/eval120.csv)
    train_prompts: int = 48  # world: DPO prompts, drawn from the train triples
    test_prompts: int = 48  # world: held-out prompts, from the test triples
    seed: int = 0  # the training samples' seeds (and, in the world, the prompts' scenes and verbs)
    samples_per_prompt: int = 10  # SPEC: 500 prompts x 10 samples
    test_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # SPEC: seeds 0-4
    latent_shape: tuple[int, ...] = (16, 21, 60, 104)  # real models: 81 x 480 x 832 video (the world has its own)
    text_dim: int = 4096  # real models: umT5-XXL (the world's tiny umT5 has its own)
    text_encoder: str | None = None  # umT5 folder or a Wan diffusers root (world: its own)
    vae: str | None = None
    detector: str | None = None
    tracker: str | None = None
    half: bool = False  # scorers in half precision
    scorers: int = 1  # scoring processes side by side, each on a shard of a store
    sample_steps: int = 50
    guidance: float = 5.0
    shift: float = 5.0
    solver: str = "unipc"
    sample_batch: int = 1
    # A finished loop's run folder whose training store (samples and scores) and reference test samples
    # this run reads instead of making its own: ablations that differ from the train stage on.
    reuse: str | None = None
    # On-policy rounds (beyond the paper, which trains once): round r samples the training prompts with
    # round r-1's fine-tuned model (its LoRA merged into its base), scores, pairs and trains a new LoRA
    # with that model as DPO's reference. Round 1 is the paper's loop.
    rounds: int = 1
    progress: bool = True  # progress bars in the stages (`--no-progress` turns them off)

    def validate(self) -> None:
        for name in ("train_prompts", "test_prompts", "samples_per_prompt", "scorers", "sample_steps", "sample_batch",
                     "rounds"):
            _at_least(f"loop.{name}", getattr(self, name), 1)
        if self.world and (self.train_prompts % 6 or self.test_prompts % 6):
            _fail("loop.train_prompts", f"world prompt counts must be multiples of 6 (one share per DSR type), got "
                  f"{self.train_prompts} train and {self.test_prompts} test")
        if not self.test_seeds:
            _fail("loop.test_seeds", "is empty; give the seeds every test prompt is sampled with, e.g. [0, 1, 2, 3, 4]")
        if len(self.latent_shape) != 4:
            _fail("loop.latent_shape", f"must be [channels, frames, height, width], got {list(self.latent_shape)}")
        _at_least("loop.guidance", self.guidance, 0)
        _at_least("loop.shift", self.shift, 0, strict=True)
        from spatialalign_jax.sample.sampler import SOLVERS

        _one_of("loop.solver", self.solver, SOLVERS)


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "lora": LoraSection,
    "loss": LossSection,
    "optim": OptimSection,
    "train": TrainSection,
    "data": DataSection,
    "run": RunSection,
    "loop": LoopSection,
}
TOP_LEVEL_FIELDS = ("mesh",)
