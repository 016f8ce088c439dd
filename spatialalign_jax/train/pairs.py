"""The trainer's reader of the dataset store: (winner, loser) pairs per SPEC section 5.

Which samples are usable: status VALID (the scorer writes a sample's status last, so VALID means
its DSR is complete), latents written (``seed >= 0``, written after the latents) and the prompt's
text encoded (``text_len > 0``). A store the scorer is still writing is therefore safe to read:
what is not finished is not used. ``PairSampler.refresh()`` re-reads the labels to pick up newly
scored samples.

Pairing rules (``PAIRINGS``; ``spatialalign_jax.train.losses.pairing_for(kind)`` names the one each
loss kind trains on):

- ``threshold`` (dpo_zo, dpo, dpo_sft): winner DSR >= tau_train, loser valid with DSR < tau_train;
  a prompt is used when it has at least one of each.
- ``random`` (dpo_random_pairs): any two valid samples of a prompt, the higher DSR wins; pairs with
  equal DSR are skipped (they carry no preference). A prompt is used when it has such a pair.
- ``top2`` (sft): the (up to) two valid samples of highest DSR are the supervised targets; the
  winner slot holds one of them drawn uniformly, the loser slot the other (the same sample when a
  prompt has a single valid one). The sft loss uses the winner only. A prompt with one valid
  sample is used.

A step draws, for each of the ``global_batch_size`` rows, a prompt uniformly among the usable ones,
then one of its pairs uniformly. The draw is a function of (seed, step) alone
(``numpy.random.default_rng([seed, step])``), identical on every host; host h then reads only rows
``[h * B / H, (h + 1) * B / H)``. So a resumed run draws the same pairs, provided the store's labels
are the same (``state_dict`` records a fingerprint of the pair table and ``load_state_dict`` warns
when it differs). Multi-host runs must call ``refresh()`` at the same step on every host.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from spatialalign_jax.common.atomic import atomic_output
from spatialalign_jax.common.dsr_types import DSR_TYPES
from spatialalign_jax.common.store import Status, Store, StoreError, create_store

TAU_TRAIN = 0.7
PAIRINGS = ("threshold", "random", "top2")
BATCH_KEYS = ("latents_w", "latents_l", "text_emb", "text_len", "dsr_w", "dsr_l", "prompt_index",
              "sample_w", "sample_l")


@dataclass(frozen=True)
class PairTable:
    """The usable prompts and, for each, its (winner, loser) sample-index pairs (n_p, 2)."""

    prompts: np.ndarray  # (U,) int64 store prompt indices
    pairs: tuple[np.ndarray, ...]  # U arrays (n_p, 2) int64: columns winner, loser

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for p, pairs in zip(self.prompts, self.pairs):
            h.update(np.int64(p).tobytes())
            h.update(np.ascontiguousarray(pairs, np.int64).tobytes())
        return h.hexdigest()[:16]


def usable_mask(status: np.ndarray, dsr: np.ndarray, seeds: np.ndarray, text_len: np.ndarray) -> np.ndarray:
    """(P, S) bool: VALID, finite DSR, latents written, prompt text encoded."""
    return (status == Status.VALID) & np.isfinite(dsr) & (seeds >= 0) & (text_len[:, None] > 0)


def build_pair_table(dsr: np.ndarray, usable: np.ndarray, *, pairing: str = "threshold", tau: float = TAU_TRAIN,
                     prompt_mask: np.ndarray | None = None) -> PairTable:
    """Builds the pair table from (P, S) DSR-Scores and the usable mask (see the module docstring)."""
    if pairing not in PAIRINGS:
        raise ValueError(f"unknown pairing {pairing!r}; choose one of {', '.join(PAIRINGS)}")
    prompts, pairs = [], []
    for p in range(dsr.shape[0]):
        if prompt_mask is not None and not prompt_mask[p]:
            continue
        valid = np.flatnonzero(usable[p])
        d = dsr[p].astype(np.float64)  # compared as evaluation compares (float64), ties at tau included
        if pairing == "threshold":
            w, lo = valid[d[valid] >= tau], valid[d[valid] < tau]
            pp = np.stack(np.meshgrid(w, lo, indexing="ij"), -1).reshape(-1, 2)
        elif pairing == "random":
            i, j = np.triu_indices(len(valid), k=1)
            a, b = valid[i], valid[j]
            keep = d[a] != d[b]
            a, b = a[keep], b[keep]
            higher_first = d[a] > d[b]
            pp = np.stack([np.where(higher_first, a, b), np.where(higher_first, b, a)], -1)
        else:  # top2: highest DSR first, ties broken by sample index (stable sort)
            top = valid[np.argsort(-d[valid], kind="stable")][:2]
            pp = np.stack([top, top[::-1]], -1) if len(top) == 2 else np.stack([top, top], -1)
        if len(pp):
            prompts.append(p)
            pairs.append(np.asarray(pp, np.int64).reshape(-1, 2))
    return PairTable(np.asarray(prompts, np.int64), tuple(pairs))


def draw_pairs(table: PairTable, seed: int, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The global batch of ``step``: (prompt, winner, loser) store indices, each (batch_size,).

    A prompt uniformly among the usable ones, then one of its pairs uniformly; a function of
    (seed, step) and the table only.
    """
    if not len(table.prompts):
        raise ValueError("the pair table is empty")
    rng = np.random.default_rng([int(seed), int(step)])
    u = rng.integers(len(table.prompts), size=batch_size)
    counts = np.array([len(table.pairs[i]) for i in u])
    k = np.minimum((rng.random(batch_size) * counts).astype(np.int64), counts - 1)
    chosen = np.stack([table.pairs[i][j] for i, j in zip(u, k)])
    return table.prompts[u], chosen[:, 0], chosen[:, 1]


class PairSampler:
    """Deterministic (winner, loser) batches from a store, this host's slice of each global batch.

    ``global_batch_size`` pairs per step over all hosts; this host reads
    ``global_batch_size // num_hosts`` of them. ``max_text_len`` is the padded text length of the
    batch (rows past a prompt's length are zeros). ``split`` limits prompts to one split of the
    prompt table (None: all).
    """

    def __init__(
        self,
        store: Store | str | os.PathLike,
        *,
        global_batch_size: int,
        seed: int = 0,
        pairing: str = "threshold",
        tau: float = TAU_TRAIN,
        split: str | None = "train",
        max_text_len: int = 512,
        num_hosts: int = 1,
        host_index: int = 0,
    ) -> None:
        if pairing not in PAIRINGS:
            raise ValueError(f"unknown pairing {pairing!r}; choose one of {', '.join(PAIRINGS)}")
        if global_batch_size < 1 or global_batch_size % num_hosts:
            raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                             f"num_hosts={num_hosts}")
        if not 0 <= host_index < num_hosts:
            raise ValueError(f"host_index={host_index} is out of range [0, {num_hosts})")
        if max_text_len < 1:
            raise ValueError(f"max_text_len must be >= 1, got {max_text_len}")
        self.store = store if isinstance(store, Store) else Store.open(store, mode="r")
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.pairing = pairing
        self.tau = float(tau)
        self.split = split
        self.max_text_len = int(max_text_len)
        self.num_hosts = int(num_hosts)
        self.host_index = int(host_index)
        self.step = 0  # the step of the next batch a consumer takes
        self._prefetching = False  # a Prefetcher is reading ahead
        self.refresh()

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.num_hosts

    def refresh(self) -> PairTable:
        """Re-reads labels, latents and text markers from the store and rebuilds the pair table.

        Not while a prefetcher reads ahead: the batches it holds came from the old table, so the step
        that first sees the new one would depend on the thread's timing, differently on every host.
        """
        if self._prefetching:
            raise RuntimeError("refresh() while a prefetcher reads ahead: close it first, then prefetch again")
        st = self.store
        status, dsr = st.read_status(), st.read_dsr()
        seeds, text_len = st.read_seeds(), st.read_text_lengths()
        in_split = np.array([self.split is None or row.get("split") == self.split for row in st.prompts])
        usable = usable_mask(status, dsr, seeds, text_len)
        table = build_pair_table(dsr, usable, pairing=self.pairing, tau=self.tau, prompt_mask=in_split)
        if not len(table.prompts):
            raise StoreError(self._no_pairs_message(status, dsr, seeds, text_len, in_split, usable))
        too_long = [int(p) for p in table.prompts if text_len[p] > self.max_text_len]
        if too_long:
            raise StoreError(
                f"store {st.path}: prompt(s) {too_long[:5]} have {int(text_len[too_long[0]])}+ text tokens, more "
                f"than max_text_len={self.max_text_len}; raise max_text_len (the store holds up to "
                f"{st.max_text_len})")
        # One attribute swapped at once: a prefetch thread reading a batch meanwhile sees old or new labels.
        self._labels = (table, dsr, text_len)
        return table

    @property
    def table(self) -> PairTable:
        return self._labels[0]

    def _no_pairs_message(self, status, dsr, seeds, text_len, in_split, usable) -> str:
        st = self.store
        if not in_split.any():
            splits = sorted({str(row.get("split")) for row in st.prompts})
            return (f"store {st.path}: no prompt is in split {self.split!r}; its prompts are in {splits}. "
                    "Choose one of those (run_train: data.split; null takes every prompt)")
        P, S = status.shape
        split_rows = in_split[:, None] & np.ones((1, S), bool)
        scored = int(((status != Status.UNSCORED) & split_rows).sum())
        valid = int(((status == Status.VALID) & split_rows).sum())
        use = usable & split_rows
        finite = np.where(use, dsr, np.nan)
        with np.errstate(invalid="ignore"):
            winners = int((finite >= self.tau).sum())
        losers = int(use.sum()) - winners
        split_txt = f"{int(in_split.sum())} in split {self.split!r}" if self.split else "all splits"
        return (
            f"store {st.path}: no prompt has a usable pair for pairing {self.pairing!r} "
            f"(tau_train={self.tau}). Prompts: {P} ({split_txt}), {int((text_len[in_split] > 0).sum())} with text "
            f"embeddings. Samples in those prompts: {int(split_rows.sum())}, {scored} scored, {valid} VALID, "
            f"{int(use.sum())} usable (VALID with latents and text), of which {winners} have DSR >= {self.tau} and "
            f"{losers} below. Finish scoring the store, lower tau_train, or pick another split or pairing "
            "(run_train: data.tau, data.split, loss.kind)."
        )

    # -- drawing and reading ----------------------------------------------------------------------
    def global_indices(self, step: int, table: PairTable | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prompt, winner, loser) store indices of the whole global batch of ``step``."""
        return draw_pairs(table or self.table, self.seed, step, self.global_batch_size)

    def local_indices(self, step: int, table: PairTable | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This host's rows of the global batch of ``step``."""
        lo = self.host_index * self.local_batch_size
        rows = self.global_indices(step, table)
        return rows[0][lo:lo + self.local_batch_size], rows[1][lo:lo + self.local_batch_size], \
            rows[2][lo:lo + self.local_batch_size]

    def read_batch(self, step: int) -> dict[str, np.ndarray]:
        """This host's batch of ``step`` as numpy arrays (keys ``BATCH_KEYS``); does not move ``self.step``."""
        table, dsr, text_len = self._labels
        p, w, lo = self.local_indices(step, table)
        lat = self.store.array("latents")
        futures = [lat[int(a), int(b)].read() for a, b in zip(np.concatenate([p, p]), np.concatenate([w, lo]))]
        # usable prompts fit max_text_len (checked when the labels are read)
        text = self.store.read_text_embeddings([int(x) for x in p], self.max_text_len)
        latents = np.stack([np.asarray(f.result(), np.float32) for f in futures])
        n = len(p)
        return {
            "latents_w": latents[:n],
            "latents_l": latents[n:],
            "text_emb": text,
            "text_len": text_len[p].astype(np.int32),
            "dsr_w": dsr[p, w].astype(np.float32),
            "dsr_l": dsr[p, lo].astype(np.float32),
            "prompt_index": p.astype(np.int32),
            "sample_w": w.astype(np.int32),
            "sample_l": lo.astype(np.int32),
        }

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.read_batch(self.step)
        self.step += 1
        return batch

    def __iter__(self) -> "PairSampler":
        return self

    def prefetch(self, depth: int = 2) -> "Prefetcher":
        """Batches from ``self.step`` on, read ``depth`` ahead in a background thread."""
        return Prefetcher(self, depth=depth)

    # -- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue with the same pairs (JSON-serialisable)."""
        return {"step": self.step, "seed": self.seed, "pairing": self.pairing, "tau": self.tau,
                "global_batch_size": self.global_batch_size, "table_fingerprint": self.table.fingerprint()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continues at ``state["step"]``; a different seed/pairing/tau/batch size is an error."""
        for key in ("seed", "pairing", "tau", "global_batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has {getattr(self, key)!r}; "
                                 "resume with the run's original data settings")
        if state.get("table_fingerprint") not in (None, self.table.fingerprint()):
            warnings.warn("the store's labels changed since this sampler state was saved: the resumed run draws "
                          "different pairs from here on", stacklevel=2)
        self.step = int(state["step"])


def _put_unless_stopped(q: queue.Queue, stop: threading.Event, item: Any) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _read_ahead(sampler: PairSampler, step: int, q: queue.Queue, stop: threading.Event) -> None:
    # A function of the queue and the event, not a method: a thread holding its Prefetcher would keep
    # a dropped one (never closed) alive and reading for ever.
    try:
        while not stop.is_set():
            if not _put_unless_stopped(q, stop, (step, sampler.read_batch(step))):
                return
            step += 1
    except BaseException as e:  # handed to the consumer
        _put_unless_stopped(q, stop, (None, e))


def _release(sampler: PairSampler, stop: threading.Event) -> None:
    stop.set()
    sampler._prefetching = False


class Prefetcher:
    """Reads a sampler's batches in a background thread, a bounded queue ahead of the consumer.

    The sampler's ``step`` moves as batches are consumed, so ``sampler.state_dict()`` stays right
    for checkpoints. An exception in the reader is raised in the consumer. Use as a context
    manager or call ``close()``; a prefetcher dropped without either stops its thread when it is
    garbage collected.
    """

    def __init__(self, sampler: PairSampler, depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        if sampler._prefetching:
            raise RuntimeError("this sampler already has a live prefetcher; close it first")
        self.sampler = sampler
        sampler._prefetching = True
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._release = weakref.finalize(self, _release, sampler, self._stop)
        self._thread = threading.Thread(target=_read_ahead, args=(sampler, sampler.step, self._queue, self._stop),
                                        name="pair-prefetch", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._stop.is_set():
            raise StopIteration
        while True:
            try:
                step, item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the prefetch thread ended without a batch") from None
        if step is None:
            self.close()
            raise item
        self.sampler.step = step + 1
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._release()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- a synthetic store for smoke runs and tests ---------------------------------------------------



def make_synthetic_store(
    path: str | os.PathLike,
    *,
    num_prompts: int = 8,
    samples_per_prompt: int = 4,
    latent_shape: Sequence[int] = (16, 2, 8, 8),
    text_dim: int = 32,
    num_frames: int = 5,
    max_text_len: int = 512,
    seed: int = 0,
) -> Store:
    """Creates a store of random latents, text embeddings and DSR labels (split "train").

    Per prompt: sample 0 a winner (DSR in [0.7, 1]), sample 1 a loser (DSR in [0.1, 0.7)), the rest
    a random mix of VALID (DSR uniform in [0.1, 1]), invalid, failed and unscored samples; every
    fourth prompt (p % 4 == 3) has its winner marked invalid and no other sample at or above 0.7,
    so it has no usable threshold pair. Text
    lengths are random in [1, min(max_text_len, 16)]. Returns the store opened "r+".

    Built beside ``path`` and renamed into place: a store at ``path`` is a whole one, even after a
    Ctrl-C in the middle of the smoke run's first start.
    """
    if samples_per_prompt < 2:
        raise ValueError("a synthetic store needs samples_per_prompt >= 2 (one winner and one loser per prompt)")
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise StoreError(f"cannot create a synthetic store at {path}: it exists and is not empty")
    with atomic_output(path) as tmp:
        _fill_synthetic_store(tmp, num_prompts, samples_per_prompt, latent_shape, text_dim, num_frames,
                              max_text_len, seed)
    return Store.open(path, mode="r+")


def _fill_synthetic_store(path: Path, num_prompts: int, samples_per_prompt: int, latent_shape: Sequence[int],
                          text_dim: int, num_frames: int, max_text_len: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    prompts = []
    types = list(DSR_TYPES.values())
    for i in range(num_prompts):
        t = types[i % len(types)]
        prompts.append({
            "type": t.name, "prompt_id": f"synthetic_{i:04d}", "scene": "a synthetic scene",
            "initial_SR": t.initial_phrase, "final_SR": t.final_phrase, "animal": "cat", "object": "box",
            "prompt": f"a synthetic scene, a cat is {t.initial_phrase} a box, then the cat moves {t.final_phrase} the box.",
            "split": "train",
        })
    store = create_store(path, prompts, samples_per_prompt=samples_per_prompt, latent_shape=latent_shape,
                         num_frames=num_frames, text_dim=text_dim, max_text_len=max_text_len)
    max_len = min(max_text_len, 16)
    store.write_negative_text_embedding(rng.standard_normal((max_len, text_dim)).astype(np.float32))
    others = [Status.VALID] * 4 + [Status.TOO_FEW_VALID_FRAMES, Status.NO_VALID_RUN, Status.MODEL_ERROR,
                                   Status.UNSCORED]
    for p in range(num_prompts):
        n = int(rng.integers(1, max_len + 1))
        store.write_text_embedding(p, rng.standard_normal((n, text_dim)).astype(np.float32))
        for s in range(samples_per_prompt):
            store.write_latents(p, s, rng.standard_normal(tuple(latent_shape)).astype(np.float32),
                                seed=p * samples_per_prompt + s)
            if s == 0:
                status = Status.TOO_FEW_TRACKED_FRAMES if p % 4 == 3 else Status.VALID
                dsr = rng.uniform(TAU_TRAIN, 1.0)
            elif s == 1:
                status, dsr = Status.VALID, rng.uniform(0.1, TAU_TRAIN - 1e-3)
            else:
                high = TAU_TRAIN - 1e-3 if p % 4 == 3 else 1.0
                status, dsr = others[int(rng.integers(len(others)))], rng.uniform(0.1, high)
            if status != Status.UNSCORED:
                store.write_score(p, s, status=status, dsr=dsr)
