"""``python -m scoring``: create-store, encode-prompts, score, evaluate.

    python -m scoring create-store   --store S --csv CSV [--split test] --latent-shape 16,21,60,104 ...
    python -m scoring encode-prompts --store S --text-encoder DIR [--csv CSV --split test]
    python -m scoring score    --store S --vae DIR --detector DIR --tracker DIR [--shard i/n]
    python -m scoring score    --videos DIR --csv CSV --out DIR --detector DIR --tracker DIR
    python -m scoring evaluate --store S --out DIR [--dinov2 DIR --clip DIR (--mp4-dir D | --vae DIR)]
    python -m scoring evaluate --videos DIR --csv CSV --out DIR [--detector DIR --tracker DIR]

Video folders hold ``{prompt_id}_{seed}.mp4`` files (``{prompt_id}.mp4`` counts as seed 0); the
scores of a folder go to ``OUT/scores/{name}.json``, one file per video. Model folders are local
Hugging Face folders; nothing is downloaded.
"""

# (Not in the docstring above, which is the CLI's --help.) One file of about 450 lines on purpose: it is
# the CLI alone (the four commands, their argument parser and the checks that turn bad input into a
# message before any model loads); the work is in scoring.run, scoring.evaluate and the model modules.

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from scoring.evaluate import EvaluationError
from scoring.loading import ModelFolderError
from scoring.prompts import PromptTableError, load_prompt_csv
from scoring.run import ScoringAborted
from spatialalign_jax.common.atomic import file_in_the_way
from spatialalign_jax.common.store import SPLITS, TEXT_DTYPES, Store, StoreError, create_store, decoded_frames, shard_arg

log = logging.getLogger("scoring")

NEGATIVE_PROMPT_FILE = Path(__file__).with_name("negative_prompt.txt")
# Wan2.1 at 81 x 480 x 832: latents (16, 21, 60, 104), 81 decoded frames, umT5-XXL width.
WAN_LATENT_SHAPE = (16, 21, 60, 104)
SAMPLES_PER_PROMPT = {"train": 10, "test": 5}  # SPEC section 2


class CliError(Exception):
    """A usage problem reported as one line, without a traceback."""


# -- helpers --------------------------------------------------------------------------------------------


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 16,21,60,104, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _check_model_path(path: str | None, flag: str, *, file_ok: bool = False) -> None:
    """Fail fast, before any model loads, when a model folder is absent."""
    if path is None:
        return
    p = Path(path)
    if not (p.is_dir() or (file_ok and p.is_file())):
        what = "checkpoint file (.pt) or model folder" if file_ok else "model folder"
        raise CliError(f"{flag}: {what} {str(p)!r} does not exist (give a local Hugging Face format folder"
                       + (", or with --tracker-backend sam2 the package's checkpoint file)" if file_ok else ")"))


def _device_and_dtype(args: argparse.Namespace):
    """The run's device and model dtype, decided (and warned about) once per command."""
    if getattr(args, "_device_and_dtype", None) is None:
        args._device_and_dtype = _decide_device_and_dtype(args)
    return args._device_and_dtype


def _decide_device_and_dtype(args: argparse.Namespace):
    import torch

    from scoring.loading import half_dtype

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise CliError(f"--device {device!r}: expected cpu, cuda or cuda:N (or another torch device type)") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {device}: CUDA is not available on this machine")
    dtype = torch.float32
    if args.half:
        if device.startswith("cuda"):
            dtype = half_dtype()
        else:
            log.warning("--half is ignored on the CPU: running in float32")
    return device, dtype


def _load_detector_tracker(args: argparse.Namespace, device, dtype):
    from scoring.detect import GroundingDinoDetector
    from scoring.track import make_tracker

    detector = GroundingDinoDetector(args.detector, device=device, dtype=dtype, batch_size=args.batch_size)
    tracker = make_tracker(args.tracker_backend, args.tracker, device=device, dtype=dtype)
    return detector, tracker


def _load_decoder(vae_dir: str, store: Store, device, dtype) -> Callable[[np.ndarray], np.ndarray]:
    """The VAE's decode, after checking that it fits the store (else every sample would fail alike)."""
    from scoring.vae import WanVaeDecoder

    vae = WanVaeDecoder(vae_dir, device=device, dtype=dtype)
    channels, latent_frames = store.latent_shape[:2]
    if vae.vae.config.z_dim != channels or vae.num_frames(latent_frames) != store.num_frames:
        raise CliError(
            f"--vae {vae_dir!r} decodes {vae.vae.config.z_dim}-channel latents, {latent_frames} latent frames -> "
            f"{vae.num_frames(latent_frames)} frames; store {str(store.path)!r} has latents {list(store.latent_shape)} "
            f"and expects {store.num_frames} frames"
        )
    return vae.decode


def _load_quality(args: argparse.Namespace, device, dtype) -> dict[str, Callable]:
    from scoring import quality

    metrics: dict[str, Callable] = {}
    if args.dinov2:
        id_consistency = quality.IdConsistency(args.dinov2, device=device, dtype=dtype)
        # A video without boxes (not scored, or invalid) has no animal crops: NaN, left out of the mean.
        metrics["id_consistency"] = lambda frames, boxes: float("nan") if boxes is None else id_consistency(frames, boxes)
    if args.clip:
        clip_iqa = quality.ClipIqa(args.clip, device=device, dtype=dtype)
        metrics["clip_iqa_natural"] = lambda frames, boxes: clip_iqa(frames)
    return metrics


def _load_prompts(args: argparse.Namespace) -> list[dict[str, str]]:
    return load_prompt_csv(args.csv, split=args.split)


# -- create-store ----------------------------------------------------------------------------------------


def _create_from_args(args: argparse.Namespace, text_dim: int) -> Store:
    prompts = _load_prompts(args)
    samples = args.samples_per_prompt or SAMPLES_PER_PROMPT[args.split or "test"]
    if len(args.latent_shape) != 4:
        raise CliError(f"--latent-shape must be 4 numbers C,F,H,W (e.g. 16,21,60,104), got {args.latent_shape}")
    decoded = decoded_frames(args.latent_shape[1])
    if args.num_frames is not None and args.num_frames != decoded:
        log.warning("--num-frames %d: the Wan VAE decodes %d latent frames to %d, so scoring will mark every "
                    "sample WRONG_FRAME_COUNT", args.num_frames, args.latent_shape[1], decoded)
    store = create_store(
        args.store, prompts, samples_per_prompt=samples, latent_shape=args.latent_shape,
        num_frames=args.num_frames or decoded, text_dim=text_dim, max_text_len=args.max_text_len, text_dtype=args.text_dtype,
    )
    print(f"created {store!r}")
    return store


def cmd_create_store(args: argparse.Namespace) -> int:
    _create_from_args(args, args.text_dim)
    return 0


# -- encode-prompts -------------------------------------------------------------------------------------


def cmd_encode_prompts(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from scoring.text_encoder import UMT5TextEncoder

    store_exists = (Path(args.store) / "store.json").is_file()
    if not store_exists and args.csv is None:
        raise CliError(f"store {args.store!r} does not exist: pass --csv (and --split) to create it")
    _check_model_path(args.text_encoder, "--text-encoder")
    neg_file = Path(args.negative_prompt_file)
    if not neg_file.is_file():
        raise CliError(f"--negative-prompt-file {str(neg_file)!r} does not exist")
    negative = neg_file.read_text().strip()
    device, dtype = _device_and_dtype(args)
    if dtype == torch.float16:
        log.warning("--half: this card has no bfloat16 and umT5-XXL overflows float16; encoding in float32")
        dtype = torch.float32
    encoder = UMT5TextEncoder(args.text_encoder, device=device, dtype=dtype, batch_size=args.batch_size,
                              max_sequence_length=args.max_text_len)
    if store_exists:
        store = Store.open(args.store, mode="r+")
        if args.csv is not None:
            ids = [r["prompt_id"] for r in _load_prompts(args)]
            if ids != [r["prompt_id"] for r in store.prompts]:
                raise CliError(f"--csv {args.csv!r} does not hold the prompts of store {args.store!r} (in order)")
    else:
        store = _create_from_args(args, encoder.dim)
    if encoder.dim != store.text_dim or encoder.max_sequence_length != store.max_text_len:
        raise CliError(
            f"the text encoder gives {encoder.dim}-d rows up to {encoder.max_sequence_length} tokens; store "
            f"{args.store!r} expects text_dim={store.text_dim}, max_text_len={store.max_text_len}"
        )
    lengths = store.read_text_lengths()
    todo = [p for p in range(store.num_prompts) if args.force or lengths[p] == 0]
    bar = tqdm(total=len(todo), desc="encode", unit="prompt", disable=args.no_progress)
    for start in range(0, len(todo), args.batch_size):
        batch = todo[start : start + args.batch_size]
        for p, rows in zip(batch, encoder.encode([store.prompts[p]["prompt"] for p in batch])):
            store.write_text_embedding(p, rows)
        bar.update(len(batch))
    bar.close()
    if args.force or store.read_negative_text_embedding().shape[0] == 0:
        store.write_negative_text_embedding(encoder.encode([negative])[0])
    print(f"encoded {len(todo)} prompts (skipped {store.num_prompts - len(todo)} already encoded) and the "
          f"negative prompt into {args.store}")
    return 0


# -- score ------------------------------------------------------------------------------------------------


def _check_score_models(args: argparse.Namespace) -> None:
    _check_model_path(args.detector, "--detector")
    _check_model_path(args.tracker, "--tracker", file_ok=args.tracker_backend == "sam2")


def _check_video_folder(videos: str) -> None:
    """Before the models load: the folder exists and holds videos under the names the scorer reads."""
    folder = Path(videos)
    if not folder.is_dir():
        raise CliError(f"--videos {videos!r} is not a folder")
    if not any(folder.glob("*.mp4")):
        others = sorted({p.suffix for p in folder.iterdir() if p.is_file()} - {""})
        raise CliError(f"--videos {videos!r} holds no *.mp4 files (named {{prompt_id}}_{{seed}}.mp4)"
                       + (f"; it holds {others} files (the suffix must be lower-case .mp4)" if others else ""))


def cmd_score(args: argparse.Namespace) -> int:
    from scoring.run import score_store, score_video_dir
    shard = args.shard
    if args.world:
        given = [f"--{k}" for k in ("vae", "detector", "tracker") if getattr(args, k) is not None]
        if given or not args.store:
            raise CliError("score --world scores a store of the synthetic world with its own decoder, detector and "
                           f"tracker: give --store and none of {', '.join(given) or '--vae/--detector/--tracker'}")
    elif args.detector is None or args.tracker is None:
        raise CliError("score needs --detector and --tracker (Grounding DINO and SAM 2 folders), or --world")
    if args.store:
        if args.vae is None and not args.world:
            raise CliError("score --store needs --vae (the Wan VAE folder that decodes the latents)")
        store = Store.open(args.store, mode="r+")
        if args.world:
            from scoring.world import detector_and_tracker
            from spatialalign_jax.world.render import decode  # the world's latents are pixels
            detector, tracker = detector_and_tracker()
        else:
            _check_model_path(args.vae, "--vae")
            _check_score_models(args)
            device, dtype = _device_and_dtype(args)
            decode = _load_decoder(args.vae, store, device, dtype)
            detector, tracker = _load_detector_tracker(args, device, dtype)
        summary = score_store(store, detector, tracker, decode, shard=shard, retry_failed=args.retry_failed,
                              mp4_dir=args.mp4_dir, plots_dir=args.plots, progress=not args.no_progress)
    else:
        if args.csv is None or args.out is None:
            raise CliError("score --videos needs --csv (the prompt table) and --out (the results folder)")
        prompts = _load_prompts(args)
        _check_video_folder(args.videos)
        _check_score_models(args)
        device, dtype = _device_and_dtype(args)
        detector, tracker = _load_detector_tracker(args, device, dtype)
        summary = score_video_dir(args.videos, prompts, args.out, detector, tracker, shard=shard,
                                  num_frames=args.num_frames, retry_failed=args.retry_failed,
                                  plots_dir=args.plots, progress=not args.no_progress)
    print(summary.line())
    return 0


# -- evaluate ---------------------------------------------------------------------------------------------


def cmd_evaluate(args: argparse.Namespace) -> int:
    from scoring.evaluate import evaluate_samples, store_samples, video_dir_samples
    from scoring.run import score_video_dir
    from scoring.video import read_video, video_name

    _check_model_path(args.dinov2, "--dinov2")
    _check_model_path(args.clip, "--clip")
    want_quality = bool(args.dinov2 or args.clip)
    notes: dict[str, Any] = {}
    if args.mp4_dir and not Path(args.mp4_dir).is_dir():
        raise CliError(f"--mp4-dir {args.mp4_dir!r} does not exist: write the decoded videos there with "
                       "`score --mp4-dir` first, or pass --vae to decode them again")
    if args.store:
        store = Store.open(args.store)
        frames_for = None
        if want_quality:
            if args.mp4_dir:
                mp4_dir = Path(args.mp4_dir)

                def frames_for(p: int, s: int, seeds=store.read_seeds()):
                    path = mp4_dir / video_name(store.prompts[p]["prompt_id"], seeds[p, s])
                    return lambda: read_video(path, store.num_frames)
            elif args.vae:
                _check_model_path(args.vae, "--vae")
                device, dtype = _device_and_dtype(args)
                decode = _load_decoder(args.vae, store, device, dtype)

                def frames_for(p: int, s: int):
                    return lambda: decode(store.read_latents(p, s)[0])
            else:
                raise CliError("--dinov2/--clip on a store need the frames: --mp4-dir (from score --mp4-dir) or --vae")
        samples = store_samples(store, split=args.split, frames_for=frames_for)
        source = {"store": str(Path(args.store).resolve()), "split": args.split}
        label = args.label or Path(args.store).name
    else:
        if args.csv is None:
            raise CliError("evaluate --videos needs --csv (the prompt table)")
        prompts = _load_prompts(args)
        if args.detector or args.tracker:
            if not (args.detector and args.tracker):
                raise CliError("scoring unscored videos needs both --detector and --tracker")
            _check_score_models(args)
            device, dtype = _device_and_dtype(args)
            detector, tracker = _load_detector_tracker(args, device, dtype)
            summary = score_video_dir(args.videos, prompts, args.out, detector, tracker,
                                      num_frames=args.num_frames, progress=not args.no_progress)
            print(summary.line())
        samples, notes = video_dir_samples(args.videos, prompts, args.out, num_frames=args.num_frames)
        source = {"videos": str(Path(args.videos).resolve()), "csv": str(Path(args.csv).resolve())}
        label = args.label or Path(args.videos).name
    quality = None
    if want_quality:
        device, dtype = _device_and_dtype(args)
        quality = _load_quality(args, device, dtype)
    report = evaluate_samples(samples, args.out, label=label, source=source, quality=quality, notes=notes,
                              progress=not args.no_progress)
    d = report["dsr"]
    print(f"Correctness@0.7 = {100 * d['correctness@0.7']:.1f}% over {d['num_samples']} samples "
          f"({d['num_unscored']} unscored); report in {Path(args.out) / 'report.json'}")
    return 0


# -- parser -----------------------------------------------------------------------------------------------


def cmd_world_text_encoder(args: argparse.Namespace) -> int:
    from scoring.world import build_text_encoder

    print(f"wrote the world's text encoder to {build_text_encoder(args.out)}")
    return 0


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=str.strip, default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--half", action="store_true", help="half-precision weights and activations on CUDA (bfloat16, or float16 on cards without it)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="frames (detector) or prompts (encoder) per batch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (tracebacks of item errors)")


def _add_csv(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--csv", required=required, help="prompt CSV in the published format (eval120.csv, eval30.csv)")
    p.add_argument("--split", choices=SPLITS, default="test",
                   help="split given to the rows (or selecting rows when the CSV has a split column)")


def _add_create(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples-per-prompt", type=_positive_int, default=None, help="default 10 for train, 5 for test")
    p.add_argument("--latent-shape", type=_int_tuple, default=WAN_LATENT_SHAPE, help="C,F,H,W (default Wan 480x832x81)")
    p.add_argument("--num-frames", type=_positive_int, default=None,
                   help="decoded frames per video (default: what the Wan VAE decodes F latent frames to, 4(F-1)+1)")
    p.add_argument("--max-text-len", type=int, default=512)
    p.add_argument("--text-dtype", choices=TEXT_DTYPES, default="float32")


def _add_detection(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--detector", required=required, help="Grounding DINO folder (Hugging Face format)")
    p.add_argument("--tracker", required=required, help="SAM 2 video folder (transformers) or .pt (sam2 backend)")
    p.add_argument("--tracker-backend", choices=("transformers", "sam2"), default="transformers")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scoring", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("create-store", help="create an empty store from a prompt CSV")
    p.add_argument("--store", required=True)
    _add_csv(p, required=True)
    _add_create(p)
    p.add_argument("--text-dim", type=int, default=4096, help="text embedding width (umT5-XXL: 4096)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_create_store)

    p = sub.add_parser("encode-prompts", help="umT5 embeddings of the prompts and the negative prompt into a store")
    p.add_argument("--store", required=True, help="store to fill (created from --csv when absent)")
    p.add_argument("--text-encoder", required=True, help="umT5 folder (or a Wan diffusers root with text_encoder/)")
    p.add_argument("--negative-prompt-file", default=str(NEGATIVE_PROMPT_FILE))
    p.add_argument("--force", action="store_true", help="re-encode prompts that are already encoded")
    _add_csv(p)
    _add_create(p)
    _add_runtime(p)
    p.set_defaults(func=cmd_encode_prompts)

    p = sub.add_parser("score", help="boxes, DSR-Score and status of every sample")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", help="store whose latents are decoded and scored in place")
    src.add_argument("--videos", help="folder of {prompt_id}_{seed}.mp4 files (needs --csv and --out)")
    _add_csv(p)
    p.add_argument("--out", help="results folder for --videos (OUT/scores/{name}.json)")
    p.add_argument("--vae", help="Wan VAE folder (AutoencoderKLWan) for --store")
    _add_detection(p, required=False)
    p.add_argument("--world", action="store_true",
                   help="a store of the synthetic world: its pixel decoder and colour detector / tracker")
    p.add_argument("--shard", type=shard_arg, default=(0, 1), help="i/n: score the prompts with index %% n == i")
    p.add_argument("--retry-failed", action="store_true", help="re-score samples with a failure status")
    p.add_argument("--num-frames", type=int, default=None, help="--videos: required frame count (81 for Wan2.1)")
    p.add_argument("--mp4-dir", help="--store: also write each decoded video here as {prompt_id}_{seed}.mp4")
    p.add_argument("--plots", help="write a PNG of the two SSR curves of each video here")
    _add_runtime(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("evaluate", help="Correctness@tau curve, quality metrics, JSON report")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", help="scored store")
    src.add_argument("--videos", help="folder of {prompt_id}_{seed}.mp4 files (scores in --out/scores)")
    _add_csv(p)
    p.add_argument("--out", required=True, help="report folder (report.json, correctness.png, correctness.txt)")
    p.add_argument("--label", help="name of the curve in the table and plot")
    _add_detection(p, required=False)
    p.add_argument("--num-frames", type=int, default=None, help="--videos: required frame count")
    p.add_argument("--dinov2", help="DINOv2 folder: ID consistency on the animal's box crops")
    p.add_argument("--clip", help="CLIP folder: CLIP-IQA 'natural'")
    p.add_argument("--mp4-dir", help="--store: decoded videos written by score --mp4-dir")
    p.add_argument("--vae", help="--store: decode latents for the quality metrics instead")
    _add_runtime(p)
    p.set_defaults(func=cmd_evaluate, split=None)

    p = sub.add_parser("world-text-encoder", help="write the synthetic world's tiny umT5 and tokenizer to a folder")
    p.add_argument("--out", required=True, help="folder to write (config.json, model.safetensors, tokenizer files)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_world_text_encoder)
    return parser


def _check_output_folders(args: argparse.Namespace) -> None:
    """Folders the command writes must not be files (or lie under one): said before any model loads."""
    flags = ["out", "mp4_dir", "plots"] + (["store"] if args.command == "create-store" else [])
    for flag in flags:
        value = getattr(args, flag, None)
        if value is None:
            continue
        blocking = file_in_the_way(value)
        if blocking is not None:
            option = "--" + flag.replace("_", "-")
            raise CliError(f"{option} {value!r} must be a folder, but {str(blocking)!r} is a file")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "evaluate" and args.store is None and args.split is None:
        args.split = "test"
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        _check_output_folders(args)
        return args.func(args)
    except (CliError, StoreError, PromptTableError, EvaluationError, ModelFolderError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ScoringAborted as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
