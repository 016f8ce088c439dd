"""The dataset store: the one interface between the JAX trainer and the PyTorch scorer.

`create_store` makes a store and `Store` opens, reads and writes one, with TensorStore. The layout
they implement (files, arrays, chunking, status codes, commit markers) is documented and defined in
`store_layout.py`; the names callers need from it are importable from here too.

This module imports only the standard library, numpy and tensorstore: both the JAX trainer and
the PyTorch scorer import it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import tensorstore as ts

from .atomic import write_text_atomic
from .store_layout import (  # noqa: F401  (re-exported: callers import the layout's names from here)
    CREATED_BEFORE_STORE_JSON, LAYOUT_VERSION, OPTIONAL_PROMPT_COLUMNS, PROMPT_COLUMNS, PROMPTS_JSON, SPLITS,
    STATUS_DESCRIPTIONS, STORE_JSON, TEXT_DTYPES, VAE_SCALE_SPATIAL, VAE_SCALE_TEMPORAL, ArraySpec, Score, Status,
    StoreError, array_specs, decoded_frames, parse_shard, shard_arg, zarr3_metadata)


def _kvstore(path: Path) -> dict[str, Any]:
    return {"driver": "file", "path": str(path.resolve()) + "/"}


def _write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))


def _validate_prompts(prompts: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    table = []
    seen: set[str] = set()
    for i, row in enumerate(prompts):
        missing = [c for c in (*PROMPT_COLUMNS, "split") if c not in row]
        if missing:
            raise StoreError(
                f"prompt row {i} ({row.get('prompt_id', '?')}) lacks column(s) {missing}; every row needs "
                f"{list(PROMPT_COLUMNS)} and 'split'"
            )
        if row["split"] not in SPLITS:
            raise StoreError(f"prompt row {i} ({row['prompt_id']}): split {row['split']!r} is not one of {SPLITS}")
        if row["prompt_id"] in seen:
            raise StoreError(f"prompt_id {row['prompt_id']!r} appears twice in the prompt table; ids must be unique")
        seen.add(row["prompt_id"])
        known = (*PROMPT_COLUMNS, *OPTIONAL_PROMPT_COLUMNS, "split")
        table.append({k: row[k] for k in known if k in row})
    if not table:
        raise StoreError("the prompt table is empty")
    return table


def create_store(
    path: str | os.PathLike,
    prompts: Sequence[Mapping[str, Any]],
    *,
    samples_per_prompt: int,
    latent_shape: Sequence[int],
    num_frames: int,
    text_dim: int,
    max_text_len: int = 512,
    text_dtype: str = "float32",
) -> "Store":
    """Create an empty store at ``path`` (which must not exist or be empty) and open it "r+".

    ``prompts`` rows need the SPEC section 2 columns and ``split``. Create once, from one
    process, before any writer opens the store.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise StoreError(f"cannot create a store at {path}: the directory exists and is not empty")
    if text_dtype not in TEXT_DTYPES:
        raise StoreError(f"text_dtype {text_dtype!r} is not one of {TEXT_DTYPES}")
    latent_shape = [int(x) for x in latent_shape]
    if len(latent_shape) != 4 or min(latent_shape) < 1:
        raise StoreError(f"latent_shape must be 4 positive ints [C, F, H, W], got {latent_shape}")
    for name, value in (("samples_per_prompt", samples_per_prompt), ("num_frames", num_frames),
                        ("text_dim", text_dim), ("max_text_len", max_text_len)):
        if int(value) < 1:
            raise StoreError(f"{name} must be >= 1, got {value}")
    table = _validate_prompts(prompts)
    meta = {
        "layout_version": LAYOUT_VERSION,
        "num_prompts": len(table),
        "samples_per_prompt": int(samples_per_prompt),
        "latent_shape": latent_shape,
        "num_frames": int(num_frames),
        "text_dim": int(text_dim),
        "max_text_len": int(max_text_len),
        "text_dtype": text_dtype,
    }
    path.mkdir(parents=True, exist_ok=True)
    for name, spec in array_specs(meta).items():
        ts.open(
            {"driver": "zarr3", "kvstore": _kvstore(path / name), "metadata": zarr3_metadata(spec)},
            create=True,
        ).result()
    _write_json_atomic(path / PROMPTS_JSON, table)
    _write_json_atomic(path / "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": meta})
    # store.json last: its presence marks a completely created store.
    _write_json_atomic(path / STORE_JSON, meta)
    return Store.open(path, mode="r+")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{path} is not valid JSON ({e}); it was edited by hand or damaged") from None


class Store:
    """An open store. Indices are (prompt p, sample s); see the module docstring for the layout."""

    def __init__(self, path: Path, meta: dict[str, Any], prompts: list[dict[str, Any]],
                 arrays: dict[str, ts.TensorStore], mode: str):
        self.path = path
        self.meta = meta
        self.prompts = prompts
        self.mode = mode
        self._arrays = arrays
        self._index = {row["prompt_id"]: i for i, row in enumerate(prompts)}

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> "Store":
        """Open an existing store; ``mode`` "r" (read only) or "r+" (read and write).

        Validates the layout version and every array's presence, shape and dtype.
        """
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        path = Path(path)
        meta_path = path / STORE_JSON
        if not meta_path.is_file():
            entries = {p.name for p in path.iterdir()} if path.is_dir() else set()
            if entries & CREATED_BEFORE_STORE_JSON:
                hint = "a create that was stopped before it finished: delete the folder and create it again"
            elif any((path / name / STORE_JSON).is_file() for name in entries):
                stores = sorted(name for name in entries if (path / name / STORE_JSON).is_file())
                hint = f"its subfolders {stores[:5]} are stores: name one of them"
            else:
                hint = "create one with create_store or `python -m scoring create-store`"
            raise StoreError(f"{path} is not a store: {meta_path} is missing ({hint})")
        meta = _read_json(meta_path)
        version = meta.get("layout_version")
        if version != LAYOUT_VERSION:
            raise StoreError(
                f"{path} has store layout_version {version!r}; this code reads layout_version "
                f"{LAYOUT_VERSION} only (use the matching project version, or re-create the store)"
            )
        required = ("num_prompts", "samples_per_prompt", "latent_shape", "num_frames", "text_dim", "max_text_len")
        missing = [k for k in required if k not in meta]
        if missing:
            raise StoreError(f"{meta_path} lacks key(s) {missing}")
        meta.setdefault("text_dtype", "float32")
        prompts_path = path / PROMPTS_JSON
        if not prompts_path.is_file():
            raise StoreError(f"store {path}: the prompt table {prompts_path} is missing")
        prompts = _read_json(prompts_path)
        if len(prompts) != meta["num_prompts"]:
            raise StoreError(
                f"store {path}: {PROMPTS_JSON} has {len(prompts)} rows but store.json says num_prompts="
                f"{meta['num_prompts']}"
            )
        arrays = {}
        for name, spec in array_specs(meta).items():
            arrays[name] = cls._open_array(path, name, spec, mode)
        return cls(path, meta, prompts, arrays, mode)

    @staticmethod
    def _open_array(path: Path, name: str, spec: ArraySpec, mode: str) -> ts.TensorStore:
        expected = f"shape {list(spec.shape)} dtype {spec.dtype}"
        if not (path / name / "zarr.json").is_file():
            raise StoreError(f"store {path}: array {name!r} is missing (expected {expected})")
        try:
            arr = ts.open(
                {"driver": "zarr3", "kvstore": _kvstore(path / name)},
                open=True,
                read=True,
                write=(mode == "r+"),
            ).result()
        except ValueError as e:
            raise StoreError(f"store {path}: array {name!r} cannot be opened ({e})") from e
        if tuple(arr.shape) != spec.shape or np.dtype(arr.dtype.numpy_dtype) != np.dtype(spec.dtype):
            raise StoreError(
                f"store {path}: array {name!r} has shape {list(arr.shape)} dtype {arr.dtype.name}, "
                f"expected {expected} from store.json"
            )
        return arr

    # -- metadata ----------------------------------------------------------------------------------

    @property
    def num_prompts(self) -> int:
        return self.meta["num_prompts"]

    @property
    def samples_per_prompt(self) -> int:
        return self.meta["samples_per_prompt"]

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return tuple(self.meta["latent_shape"])  # type: ignore[return-value]

    @property
    def num_frames(self) -> int:
        return self.meta["num_frames"]

    @property
    def text_dim(self) -> int:
        return self.meta["text_dim"]

    @property
    def max_text_len(self) -> int:
        return self.meta["max_text_len"]

    def check_model(self, cfg: Any) -> None:
        """Refuses a model (a `WanConfig`) that cannot read or write this store's latents and text."""
        C, F, H, W = self.latent_shape
        if C != cfg.in_channels or cfg.out_channels != cfg.in_channels:
            raise StoreError(f"store {self.path} holds {C}-channel latents {list(self.latent_shape)} but the model "
                             f"takes {cfg.in_channels} channels and predicts {cfg.out_channels}: use the store made "
                             "for this model (create-store --latent-shape) or the model this store was made for")
        pt, ph, pw = cfg.patch_size
        if F % pt or H % ph or W % pw:
            raise StoreError(f"store {self.path}: latent (frames, height, width) {(F, H, W)} is not a multiple of the "
                             f"model's patch size {tuple(cfg.patch_size)}")
        if self.text_dim != cfg.text_dim:
            raise StoreError(f"store {self.path} holds {self.text_dim}-d text embeddings; the model's text_dim is "
                             f"{cfg.text_dim}: encode the prompts with the model's text encoder")

    def prompt_index(self, prompt_id: str) -> int:
        """Row index of ``prompt_id`` in the prompt table."""
        try:
            return self._index[prompt_id]
        except KeyError:
            raise KeyError(f"prompt_id {prompt_id!r} is not in store {self.path}") from None

    def array(self, name: str) -> ts.TensorStore:
        """The raw TensorStore handle of one array, for bulk or asynchronous access."""
        if name not in self._arrays:
            raise KeyError(f"no array {name!r} in the store layout; arrays are {list(self._arrays)}")
        return self._arrays[name]

    def _check_writable(self) -> None:
        if self.mode != "r+":
            raise StoreError(f"store {self.path} is open read-only; open it with mode='r+' to write")

    def _check_p(self, p: int) -> int:
        if not 0 <= p < self.num_prompts:
            raise IndexError(f"prompt index {p} is out of range [0, {self.num_prompts})")
        return int(p)

    def _check_ps(self, p: int, s: int) -> tuple[int, int]:
        if not 0 <= s < self.samples_per_prompt:
            raise IndexError(f"sample index {s} is out of range [0, {self.samples_per_prompt})")
        return self._check_p(p), int(s)

    # -- text embeddings --------------------------------------------------------------------------

    def _text_view(self, name: str) -> ts.TensorStore:
        # Callers always see float32; a bfloat16 store converts on the way in and out.
        arr = self._arrays[name]
        return arr if self.meta["text_dtype"] == "float32" else ts.cast(arr, ts.float32)

    def _padded_text(self, emb: np.ndarray, what: str) -> tuple[np.ndarray, int]:
        emb = np.asarray(emb, dtype=np.float32)
        L, D = self.max_text_len, self.text_dim
        if emb.ndim != 2 or emb.shape[1] != D or not 1 <= emb.shape[0] <= L:
            raise ValueError(f"{what}: text embedding must be (len, {D}) with 1 <= len <= {L}, got {emb.shape}")
        padded = np.zeros((L, D), np.float32)
        padded[: emb.shape[0]] = emb
        return padded, emb.shape[0]

    def write_text_embedding(self, p: int, emb: np.ndarray) -> None:
        """Store prompt ``p``'s unpadded umT5 rows ``emb`` (len, D)."""
        self._check_writable()
        p = self._check_p(p)
        padded, n = self._padded_text(emb, f"prompt {p}")
        self._text_view("text_emb")[p].write(padded).result()
        self._arrays["text_len"][p].write(np.int32(n)).result()

    def read_text_embedding(self, p: int) -> np.ndarray:
        """Prompt ``p``'s unpadded rows (len, D) float32; shape (0, D) when not encoded yet."""
        p = self._check_p(p)
        n = int(self._arrays["text_len"][p].read().result())
        return np.asarray(self._text_view("text_emb")[p, :n].read().result())

    def read_text_embeddings(self, ps: Sequence[int], length: int) -> np.ndarray:
        """Several prompts' rows at once, (len(ps), length, D) float32, zero past each prompt's length
        (rows are stored zero-padded); the reads run concurrently."""
        view = self._text_view("text_emb")
        futures = [view[self._check_p(p), :min(length, self.max_text_len)].read() for p in ps]
        out = np.zeros((len(futures), length, self.text_dim), np.float32)
        for i, f in enumerate(futures):
            rows = f.result()
            out[i, :len(rows)] = rows
        return out

    def read_text_lengths(self) -> np.ndarray:
        """(P,) int32 token counts; 0 = not encoded yet."""
        return np.asarray(self._arrays["text_len"].read().result())

    def write_negative_text_embedding(self, emb: np.ndarray) -> None:
        """Store the negative prompt's unpadded rows (len, D)."""
        self._check_writable()
        padded, n = self._padded_text(emb, "negative prompt")
        self._text_view("neg_text_emb").write(padded).result()
        self._arrays["neg_text_len"].write(np.array([n], np.int32)).result()

    def read_negative_text_embedding(self) -> np.ndarray:
        """The negative prompt's unpadded rows (len, D) float32; (0, D) when not encoded yet."""
        n = int(self._arrays["neg_text_len"][0].read().result())
        return np.asarray(self._text_view("neg_text_emb")[:n].read().result())

    # -- latents -------------------------------------------------------------------------------------

    def write_latents(self, p: int, s: int, latents: np.ndarray, seed: int) -> None:
        """Store sample (p, s)'s latents (C, F, H, W) and its seed (>= 0); the seed is written last."""
        self._check_writable()
        p, s = self._check_ps(p, s)
        latents = np.asarray(latents, dtype=np.float32)
        if latents.shape != self.latent_shape:
            raise ValueError(f"latents of sample ({p}, {s}) have shape {latents.shape}, store expects {self.latent_shape}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0 (-1 marks 'no latents'), got {seed}")
        self._arrays["latents"][p, s].write(latents).result()
        self._arrays["seed"][p, s].write(np.int64(seed)).result()

    def read_latents(self, p: int, s: int) -> tuple[np.ndarray, int]:
        """Sample (p, s)'s latents (C, F, H, W) float32 and seed; raises if not written yet."""
        p, s = self._check_ps(p, s)
        seed = int(self._arrays["seed"][p, s].read().result())
        if seed < 0:
            raise StoreError(f"store {self.path}: sample ({p}, {s}) has no latents yet")
        return np.asarray(self._arrays["latents"][p, s].read().result()), seed

    def read_seeds(self) -> np.ndarray:
        """(P, S) int64 seeds; -1 where latents are not written yet."""
        return np.asarray(self._arrays["seed"].read().result())

    # -- scores ----------------------------------------------------------------------------------------

    def write_score(
        self,
        p: int,
        s: int,
        *,
        status: Status | int,
        dsr: float = float("nan"),
        boxes_animal: np.ndarray | None = None,
        boxes_object: np.ndarray | None = None,
    ) -> None:
        """Store sample (p, s)'s score. Boxes (T, 4) default to all-NaN; status is written last."""
        self._check_writable()
        p, s = self._check_ps(p, s)
        status = Status(int(status))
        if status == Status.UNSCORED:
            raise ValueError("write_score needs a status other than UNSCORED (use reset_score to clear one)")
        T = self.num_frames
        boxes = []
        for name, b in (("boxes_animal", boxes_animal), ("boxes_object", boxes_object)):
            b = np.full((T, 4), np.nan, np.float32) if b is None else np.asarray(b, dtype=np.float32)
            if b.shape != (T, 4):
                raise ValueError(f"{name} of sample ({p}, {s}) has shape {b.shape}, store expects ({T}, 4)")
            boxes.append(b)
        dsr = float(dsr)
        if status == Status.VALID and not np.isfinite(dsr):
            raise ValueError(f"sample ({p}, {s}): a VALID status needs a finite DSR-Score, got {dsr}")
        if status != Status.VALID:
            dsr = float("nan")
        self._arrays["boxes_animal"][p, s].write(boxes[0]).result()
        self._arrays["boxes_object"][p, s].write(boxes[1]).result()
        self._arrays["dsr"][p, s].write(np.float32(dsr)).result()
        self._arrays["status"][p, s].write(np.int8(status)).result()

    def reset_score(self, p: int, s: int) -> None:
        """Mark sample (p, s) unscored again (status first, so a crash never leaves stale data marked done)."""
        self._check_writable()
        p, s = self._check_ps(p, s)
        self._arrays["status"][p, s].write(np.int8(Status.UNSCORED)).result()
        self._arrays["dsr"][p, s].write(np.float32(np.nan)).result()
        nan_boxes = np.full((self.num_frames, 4), np.nan, np.float32)
        self._arrays["boxes_animal"][p, s].write(nan_boxes).result()
        self._arrays["boxes_object"][p, s].write(nan_boxes).result()

    def read_score(self, p: int, s: int) -> Score:
        p, s = self._check_ps(p, s)
        return Score(
            boxes_animal=np.asarray(self._arrays["boxes_animal"][p, s].read().result()),
            boxes_object=np.asarray(self._arrays["boxes_object"][p, s].read().result()),
            dsr=float(self._arrays["dsr"][p, s].read().result()),
            status=Status(int(self._arrays["status"][p, s].read().result())),
        )

    def read_dsr(self) -> np.ndarray:
        """(P, S) float32 DSR-Scores; NaN where unscored or not valid."""
        return np.asarray(self._arrays["dsr"].read().result())

    def read_status(self) -> np.ndarray:
        """(P, S) int8 status codes (see ``Status``)."""
        return np.asarray(self._arrays["status"].read().result())

    def read_boxes(self, prompts: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Animal and object boxes (n, S, T, 4) of the given prompts (default all)."""
        idx = list(range(self.num_prompts)) if prompts is None else [self._check_p(p) for p in prompts]
        a = self._arrays["boxes_animal"][idx].read().result() if idx else np.zeros((0, self.samples_per_prompt, self.num_frames, 4), np.float32)
        o = self._arrays["boxes_object"][idx].read().result() if idx else a
        return np.asarray(a), np.asarray(o)

    def __repr__(self) -> str:
        return (f"Store({str(self.path)!r}, mode={self.mode!r}, prompts={self.num_prompts}, "
                f"samples_per_prompt={self.samples_per_prompt}, latent_shape={list(self.latent_shape)}, "
                f"num_frames={self.num_frames})")
