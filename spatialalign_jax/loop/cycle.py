"""The SpatialAlign loop as stages: prompts -> encode -> sample -> score -> train -> export ->
sample (fine-tuned) -> score -> evaluate, for the synthetic world and for real models alike.

One list of stages serves both; ``loop.world`` only decides where the pieces come from:

| piece | ``loop.world: true`` (``python run_train.py``) | real models |
|---|---|---|
| prompts | ``spatialalign_jax.world.prompts`` (held-out triples) | ``loop.train_csv``, ``loop.test_csv`` |
| text encoder | the world's tiny umT5 (``world/assets/text_encoder``) | ``loop.text_encoder`` (Wan's umT5) |
| reference model | ``world/assets/reference`` | ``model.path`` |
| decode, detect, track | world pixels, colour segmentation | Wan VAE, Grounding DINO, SAM 2 |

JAX work (sampling, training) runs in this process on the configured mesh; PyTorch work (text
encoding, scoring, the diffusers export) runs as ``python -m scoring ...`` / ``python -m
converters...`` subprocesses, ``loop.scorers`` of them side by side on disjoint shards of a store.

The run folder::

    RUN/stages.json            what finished, with its seconds (the stage runner's record)
    RUN/prompts/{train,test}.csv
    RUN/data/train             the training store: train prompts x loop.samples_per_prompt
    RUN/data/test_reference    test prompts x loop.test_seeds, sampled by the reference model
    RUN/data/test_finetuned    the same prompts and seeds, sampled with the trained LoRA
    RUN/train/                 the trainer's run folder (checkpoints, metrics.jsonl, LoRA exports)
    RUN/export/lora            the final LoRA for diffusers (pytorch_lora_weights.safetensors)
    RUN/report/                summary.json, report.md, correctness.png, samples.png
    RUN/round{r}/              rounds after the first (``loop.rounds``, ``--rounds``): base/ (round r-1's
                               model with its LoRA merged in: round r's sampler and DPO reference),
                               data/train, data/test_finetuned, train/, export/lora

With ``loop.rounds: k`` the stages of round r >= 2 follow round 1's as ``merge@r``, ``sample@r``, ...,
``evaluate@r``; a finished run given more rounds runs only those.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from spatialalign_jax.common.store import Store, create_store
from spatialalign_jax.common.store_layout import PROMPT_COLUMNS, decoded_frames
from spatialalign_jax.loop.stages import Stage, StageError, StageRunner
from spatialalign_jax.train.run_config import RunConfig

WORLD_ASSETS = Path(__file__).resolve().parents[1] / "world" / "assets"
STORES = ("train", "test_reference", "test_finetuned")


# Stores another run can lend (loop.reuse): its training samples with their scores, and the reference
# model's test samples. Ablations differ only from the train stage on, so they need not redo these.
SHAREABLE = ("train", "test_reference")


@dataclasses.dataclass(frozen=True)
class LoopPaths:
    run: Path
    reuse: Path | None = None  # loop.reuse: the run whose SHAREABLE stores this one reads
    round: int = 1  # loop.rounds: rounds after the first keep their own folder, RUN/round{r}/

    def at_round(self, r: int) -> "LoopPaths":
        return dataclasses.replace(self, round=r)

    def owns(self, name: str) -> bool:
        """Whether this run (at this round) makes store ``name`` itself: the reference model's test
        samples are round 1's, and round 1 borrows the SHAREABLE stores from ``reuse``."""
        if self.round > 1:
            return name != "test_reference"
        return self.reuse is None or name not in SHAREABLE

    @property
    def round_dir(self) -> Path:
        return self.run if self.round == 1 else self.run / f"round{self.round}"

    @property
    def prompts(self) -> Path:
        return self.run / "prompts"

    def store(self, name: str) -> Path:
        if self.owns(name):
            return self.round_dir / "data" / name
        return (self.run if self.reuse is None else self.reuse) / "data" / name

    @property
    def base(self) -> Path:
        """Rounds after the first: the model the round starts from (the last round's LoRA merged in)."""
        return self.round_dir / "base"

    @property
    def train(self) -> Path:
        return self.round_dir / "train"

    @property
    def export(self) -> Path:
        return self.round_dir / "export" / "lora"

    @property
    def report(self) -> Path:
        return self.run / "report"

    def mp4(self, name: str) -> Path:
        """Where the score stages write store ``name``'s videos (real models) for the report."""
        top = self.report / "mp4"
        return top / name if self.round == 1 or not self.owns(name) else top / f"round{self.round}" / name


def reference_model_path(rc: RunConfig) -> str:
    if rc.model.path is not None:
        return rc.model.path
    if rc.loop.world:
        return str(WORLD_ASSETS / "reference")
    raise StageError("the loop needs a reference model: set model.path (a converted checkpoint or a diffusers folder)")


def text_encoder_path(rc: RunConfig) -> str:
    if rc.loop.text_encoder is not None:
        return rc.loop.text_encoder
    if rc.loop.world:
        return str(WORLD_ASSETS / "text_encoder")
    raise StageError("the loop's encode stage needs loop.text_encoder (Wan's umT5: the pipeline folder or text_encoder/)")


def base_model_path(rc: RunConfig, paths: LoopPaths) -> str:
    """The model a round starts from: the reference model in round 1, the last round's merge after."""
    return reference_model_path(rc) if paths.round == 1 else str(paths.base)


def trainer_config(rc: RunConfig, paths: LoopPaths) -> RunConfig:
    """The run config the trainer gets: the round's training store and run folder, and the round's
    base model, which is also DPO's reference."""
    d = rc.to_dict()
    d["model"]["path"] = base_model_path(rc, paths)
    d["model"]["config"] = {}
    d["data"]["store"] = str(paths.store("train"))
    d["data"]["synthetic"] = None
    d["run"]["dir"] = str(paths.train)
    d["loop"]["enabled"] = False
    return RunConfig.from_dict(d)


# -- the pieces each stage runs --------------------------------------------------------------------------


def _prompt_tables(rc: RunConfig) -> dict[str, list[dict[str, str]]]:
    if rc.loop.world:
        from spatialalign_jax.world.prompts import split_rows

        train, test = split_rows(rc.loop.train_prompts, rc.loop.test_prompts, seed=rc.loop.seed)
        return {"train": train, "test": test}
    from scoring.prompts import load_prompt_csv  # csv + the DSR table: no torch

    if rc.loop.train_csv is None or rc.loop.test_csv is None:
        raise StageError("the prompts stage needs loop.train_csv and loop.test_csv (or loop.world: true); make a "
                         "training CSV with `python -m spatialalign_jax.dataset`")
    return {"train": load_prompt_csv(rc.loop.train_csv, split=None),
            "test": load_prompt_csv(rc.loop.test_csv, split=None)}


def _write_csv(path: Path, rows: Sequence[Mapping[str, str]]) -> None:
    from spatialalign_jax.common.atomic import atomic_path

    columns = list(PROMPT_COLUMNS) + ["split"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _store_geometry(rc: RunConfig) -> tuple[list[int], int, int]:
    """(latent shape, decoded frames, text_dim) of the loop's stores."""
    if rc.loop.world:
        from spatialalign_jax.world.render import LATENT_SHAPE
        from spatialalign_jax.world.settings import TEXT_DIM

        shape, text_dim = list(LATENT_SHAPE), TEXT_DIM
    else:
        shape, text_dim = list(rc.loop.latent_shape), rc.loop.text_dim
    return shape, decoded_frames(shape[1]), text_dim


def _create_stores(rc: RunConfig, paths: LoopPaths, tables: Mapping[str, Sequence[Mapping[str, str]]]) -> None:
    """Creates the stores this round owns (an existing complete store is kept)."""
    shape, frames, text_dim = _store_geometry(rc)
    for name in filter(paths.owns, STORES):
        path = paths.store(name)
        if (path / "store.json").is_file():
            continue
        split = "train" if name == "train" else "test"
        slots = rc.loop.samples_per_prompt if split == "train" else len(rc.loop.test_seeds)
        if path.exists():  # a create that was killed midway: nothing in it is worth keeping
            import shutil

            shutil.rmtree(path)
        create_store(path, [{**r, "split": split} for r in tables[split]], samples_per_prompt=slots,
                     latent_shape=shape, num_frames=frames, text_dim=text_dim,
                     max_text_len=rc.data.max_text_len)


def _tables_of(paths: LoopPaths) -> dict[str, list[dict[str, str]]]:
    """The prompt tables of round 1's stores (this run's or the lent ones)."""
    first = paths.at_round(1)
    return {split: [{k: v for k, v in r.items() if k != "split"} for r in Store.open(first.store(name)).prompts]
            for split, name in (("train", "train"), ("test", "test_reference"))}


def stage_prompts(rc: RunConfig, paths: LoopPaths) -> dict[str, Any]:
    """Writes the prompt tables and creates the stores (an existing complete store is kept)."""
    if paths.reuse is not None:  # the lent stores fix the prompts
        _check_reusable(paths)
        tables = _tables_of(paths)
    else:
        tables = _prompt_tables(rc)
    for split, rows in tables.items():
        _write_csv(paths.prompts / f"{split}.csv", [{**r, "split": split} for r in rows])
    _create_stores(rc, paths, tables)
    return {"train_prompts": len(tables["train"]), "test_prompts": len(tables["test"])}


def _subprocess(argv: Sequence[str], what: str) -> None:
    """Runs ``python -m ...`` in a child process; its output goes straight to this terminal."""
    cmd = [sys.executable, "-m", *argv]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise StageError(f"{what} failed (exit {result.returncode}): {' '.join(cmd)}; its output is above. Rerun "
                         "the same command to continue: finished work is kept")


def _visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries: that variable's, else those JAX finds."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [d.strip() for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    import jax

    return [str(d.local_hardware_id) for d in jax.local_devices() if d.platform == "gpu"]


def _scorer_env(i: int, n: int, gpus: bool) -> dict[str, str]:
    """Scorer i of n sees one GPU (the (i mod g)-th of the g this process sees) when there are several
    scorers; with no GPU each scorer is left to its default device."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    visible = _visible_gpus() if gpus and n > 1 else []
    if visible:  # more scorers than GPUs share them; none past the last GPU falls back to the CPU
        env["CUDA_VISIBLE_DEVICES"] = visible[i % len(visible)]
    return env


def _parallel(commands: Sequence[Sequence[str]], what: str, gpus: bool = False) -> None:
    """Runs ``python -m`` commands side by side (one per scorer shard) and waits for all."""
    n = len(commands)
    procs = [subprocess.Popen([sys.executable, "-m", *argv], env=_scorer_env(i, n, gpus))
             for i, argv in enumerate(commands)]
    codes = [p.wait() for p in procs]
    failed = [" ".join(c) for c, code in zip(commands, codes) if code != 0]
    if failed:
        raise StageError(f"{what} failed in {len(failed)} of {len(commands)} processes: {failed[0]}; its output is "
                         "above. Rerun the same command to continue: finished work is kept")


def stage_encode(rc: RunConfig, paths: LoopPaths) -> dict[str, Any]:
    encoder = text_encoder_path(rc)
    _parallel([["scoring", "encode-prompts", "--store", str(paths.store(name)), "--text-encoder", encoder,
                "--max-text-len", str(rc.data.max_text_len), "--no-progress"] for name in filter(paths.owns, STORES)],
              "encode-prompts", gpus=not rc.loop.world)
    return {}


def _mesh(rc: RunConfig):
    from spatialalign_jax.model.sharding import make_mesh

    return make_mesh(rc.mesh)


def _load_model(rc: RunConfig, paths: LoopPaths, lora_export: Path | None = None):
    """The round's base model, or with ``lora_export`` the base plus the round's trained LoRA."""
    import jax.numpy as jnp

    from converters.load import load_transformer
    from spatialalign_jax.model.checkpoint import read_checkpoint
    from spatialalign_jax.model.lora import set_params

    lora = rc.lora_config() if lora_export is not None else None
    model = load_transformer(base_model_path(rc, paths), mesh=_mesh(rc), dtype=rc.model.dtype,
                             param_dtype=rc.model.param_dtype, attention=rc.model.attention, lora=lora)
    if lora_export is not None:
        _, _, weights = read_checkpoint(lora_export)
        set_params(model, {k: jnp.asarray(v) for k, v in weights.items()}, strict=False)
    return model


def _sample(rc: RunConfig, store_path: Path, model, *, use_lora: bool, seeds: Sequence[int] | None,
            base_seed: int = 0) -> dict[str, Any]:
    from spatialalign_jax.sample.cli import sample_store

    loop = rc.loop
    store = Store.open(store_path, mode="r+")
    summary = sample_store(store, model, seeds=seeds, base_seed=base_seed, batch_size=loop.sample_batch, num_steps=loop.sample_steps,
                           guidance=loop.guidance, shift=loop.shift, solver=loop.solver, use_lora=use_lora,
                           mesh=_mesh(rc), progress=loop.progress)
    print(summary.line())
    return {"sampled": summary.written}


def _check_reusable(paths: LoopPaths) -> None:
    done = StageRunner(paths.reuse, []).done()
    missing = [stage for stage in ("score", "score_test") if stage not in done]
    if missing:
        raise StageError(f"loop.reuse={str(paths.reuse)!r} has not finished its {' and '.join(missing)} stage(s) "
                         f"(done: {', '.join(done) or 'nothing'}); run that loop first")


# Round r's training samples take their seeds from loop.seed + ROUND_SEED_STRIDE * (r - 1): fresh noise
# each round, and no round's seeds are another loop.seed's.
ROUND_SEED_STRIDE = 1000


def stage_sample(rc: RunConfig, paths: LoopPaths) -> dict[str, Any]:
    if not paths.owns("train"):
        return {"reused": str(paths.reuse)}
    return _sample(rc, paths.store("train"), _load_model(rc, paths), use_lora=False, seeds=None,
                   base_seed=rc.loop.seed + ROUND_SEED_STRIDE * (paths.round - 1))


def _score(rc: RunConfig, paths: LoopPaths, names: Sequence[str]) -> dict[str, Any]:
    if rc.loop.world:
        models = ["--world"]
    else:
        missing = [k for k in ("vae", "detector", "tracker") if getattr(rc.loop, k) is None]
        if missing:
            raise StageError(f"the score stages need loop.{', loop.'.join(missing)} (the Wan VAE, Grounding DINO and "
                             "SAM 2 folders)")
        models = ["--vae", rc.loop.vae, "--detector", rc.loop.detector, "--tracker", rc.loop.tracker]
        if rc.loop.half:
            models.append("--half")
    n = rc.loop.scorers
    quiet = ["--no-progress"] if n > 1 or not rc.loop.progress else []  # side-by-side bars would garble each other
    names = [name for name in names if paths.owns(name)]
    for name in names:
        extra = ["--mp4-dir", str(paths.mp4(name))] if name != "train" and not rc.loop.world else []
        _parallel([["scoring", "score", "--store", str(paths.store(name)), *models, "--shard", f"{i}/{n}",
                    *quiet, *extra] for i in range(n)], f"score ({name})", gpus=not rc.loop.world)
    return {name: _status_counts(paths.store(name)) for name in names}


def _status_counts(path: Path) -> dict[str, int]:
    from scoring.metrics import status_counts  # numpy only

    return status_counts(Store.open(path).read_status())


def stage_train(rc: RunConfig, paths: LoopPaths) -> dict[str, Any]:
    from spatialalign_jax.train.trainer import train

    summary = train(trainer_config(rc, paths), progress=rc.loop.progress)
    return {k: float(v) for k, v in summary.items() if isinstance(v, (int, float))}


def final_lora(rc: RunConfig, paths: LoopPaths) -> Path:
    path = paths.train / "lora" / f"step_{rc.train.steps:07d}"
    if not path.is_dir():
        raise StageError(f"no LoRA export at {path}: the train stage has not finished (rerun without --from)")
    return path


def stage_export(rc: RunConfig, paths: LoopPaths) -> dict[str, Any]:
    _subprocess(["converters.to_diffusers", "--src", str(final_lora(rc, paths)), "--dst", str(paths.export),
                 "--overwrite"], "export")
    return {"lora": str(paths.export)}


def stage_sample_test(rc: RunConfig, paths: LoopPaths) -> dict[str, Any]:
    seeds = list(rc.loop.test_seeds)
    out = {}
    if paths.owns("test_reference"):
        out["reference"] = _sample(rc, paths.store("test_reference"), _load_model(rc, paths), use_lora=False,
                                   seeds=seeds)
    out["finetuned"] = _sample(rc, paths.store("test_finetuned"), _load_model(rc, paths, final_lora(rc, paths)),
                               use_lora=True, seeds=seeds)
    return {k: v["sampled"] for k, v in out.items()}


def _frames_for(rc: RunConfig) -> Callable[[LoopPaths, str, int, int], np.ndarray | None]:
    """A sample's decoded frames for the report's strip, given the round's paths, the store's name, the
    prompt and the slot: world latents decode here; real videos are read from the mp4 files the
    score_test stages wrote (None where there is none)."""
    if rc.loop.world:
        from spatialalign_jax.world.render import decode

        return lambda paths, name, p, s: decode(Store.open(paths.store(name)).read_latents(p, s)[0])

    def from_mp4(paths: LoopPaths, name: str, p: int, s: int) -> np.ndarray | None:
        from scoring.video import read_video, video_name  # PyAV, no torch

        store = Store.open(paths.store(name))
        path = paths.mp4(name) / video_name(store.prompts[p]["prompt_id"], store.read_seeds()[p, s])
        return read_video(path, store.num_frames) if path.is_file() else None

    return from_mp4


def stage_evaluate(rc: RunConfig, paths: LoopPaths) -> dict[str, Any]:
    from spatialalign_jax.loop.report import write_report

    summary = write_report(rc, paths, frames_for=_frames_for(rc))
    return {"correctness@0.7": {k: v["correctness"]["0.7"] for k, v in summary.items()}}


def stage_merge(rc: RunConfig, paths: LoopPaths) -> dict[str, Any]:
    """Round r >= 2 starts from round r-1's fine-tuned model: its base with its final LoRA folded in,
    saved as a converted checkpoint (``paths.base``), and the round's stores."""
    import jax

    from converters.load import base_params
    from spatialalign_jax.model.checkpoint import is_checkpoint, read_checkpoint, save_checkpoint
    from spatialalign_jax.model.lora import merge_lora

    previous = paths.at_round(paths.round - 1)
    if not is_checkpoint(paths.base):
        base_path, lora_path = base_model_path(rc, previous), final_lora(rc, previous)
        cfg, base = base_params(base_path)
        _, _, lora = read_checkpoint(lora_path)
        if jax.process_index() == 0:  # host numpy arrays: one process writes, as the trainer's LoRA export
            save_checkpoint(paths.base, cfg, merge_lora(base, lora, rc.lora_config().scale), overwrite=True,
                            extra_meta={"made_by": f"the loop's merge@{paths.round}",
                                        "merged_from": {"base": base_path, "lora": str(lora_path)}})
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"merge@{paths.round}")
    _create_stores(rc, paths, _tables_of(paths))
    for name in filter(paths.owns, STORES):  # the prompts are round 1's: so are their text embeddings
        _copy_text(Store.open(paths.at_round(1).store(name)), Store.open(paths.store(name), mode="r+"))
    return {"base": str(paths.base)}


def _copy_text(src: Store, dst: Store) -> None:
    """Copies the text embeddings ``dst`` lacks from ``src``, a store of the same prompts."""
    if [r["prompt_id"] for r in src.prompts] != [r["prompt_id"] for r in dst.prompts]:
        raise StageError(f"{dst.path} and {src.path} hold different prompts; delete {dst.path} and rerun")
    for p in np.flatnonzero(dst.read_text_lengths() == 0):
        dst.write_text_embedding(int(p), src.read_text_embedding(int(p)))
    negative = src.read_negative_text_embedding()
    if len(negative) and len(dst.read_negative_text_embedding()) == 0:
        dst.write_negative_text_embedding(negative)


STAGE_ORDER: tuple[tuple[str, Callable[[RunConfig, LoopPaths], Mapping[str, Any] | None], str], ...] = (
    ("prompts", stage_prompts, "prompt tables and the train / test stores"),
    ("encode", stage_encode, "umT5 embeddings of every prompt (scoring subprocess)"),
    ("sample", stage_sample, "the reference model samples the training prompts (JAX)"),
    ("score", lambda rc, p: _score(rc, p, ["train"]), "decode, detect, track, DSR-Score the training samples"),
    ("train", stage_train, "LoRA DPO (+ regulariser) on the winner / loser pairs (JAX)"),
    ("export", stage_export, "the trained LoRA for diffusers (converters subprocess)"),
    ("sample_test", stage_sample_test, "reference and fine-tuned models sample the test prompts, same seeds"),
    ("score_test", lambda rc, p: _score(rc, p, ["test_reference", "test_finetuned"]), "score both test stores"),
    ("evaluate", stage_evaluate, "Correctness@tau, per-type table, plots, summary.json, report.md"),
)
STAGE_NAMES = tuple(name for name, _, _ in STAGE_ORDER)
# What a round after the first runs again, as "NAME@r" stages after "merge@r".
ROUND_STAGES = ("sample", "score", "train", "export", "sample_test", "score_test", "evaluate")
ROUND_ABOUT: dict[str, Callable[[int], str]] = {
    "merge": lambda r: f"round {r - 1}'s LoRA merged into its base: round {r}'s model; its stores",
    "sample": lambda r: f"round {r - 1}'s fine-tuned model samples the training prompts (JAX)",
    "sample_test": lambda r: f"round {r}'s fine-tuned model samples the test prompts, same seeds",
    "score_test": lambda r: f"score round {r}'s test store",
    "evaluate": lambda r: f"the report of every round so far ({r})",
}


def build_runner(rc: RunConfig) -> StageRunner:
    paths = LoopPaths(Path(rc.run.dir), Path(rc.loop.reuse) if rc.loop.reuse else None)
    stages = [Stage(name, (lambda fn=fn: fn(rc, paths)), about) for name, fn, about in STAGE_ORDER]
    fns = {name: (fn, about) for name, fn, about in STAGE_ORDER}
    for r in range(2, rc.loop.rounds + 1):
        at = paths.at_round(r)
        for name in ("merge", *ROUND_STAGES):
            fn, about = (stage_merge, "") if name == "merge" else fns[name]
            about = ROUND_ABOUT[name](r) if name in ROUND_ABOUT else about
            stages.append(Stage(f"{name}@{r}", (lambda fn=fn, at=at: fn(rc, at)), f"round {r}: {about}"))
    return StageRunner(paths.run, stages)
