"""The shard worker: embed one shard, checkpointing as it goes, resuming where it stopped.

Started the same way in a pod and by ``embedjob run``: everything comes from the
environment (docs/architecture.md). The exit code and the termination message say why it
stopped; 0 means the shard is complete.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from embedjob import layout
from embedjob.alphabets import alphabet_for
from embedjob.batch_order import isolated_mask, positions, run_of
from embedjob.failures import (
    ConfigError,
    EmbedjobError,
    NumericalError,
    Preempted,
    StorageError,
    TerminationMessage,
    write_termination_message,
)
from embedjob.logs import bind, log
from embedjob.spec import EmbeddingJobSpec, parse_spec
from embedjob.store import Store, open_store
from embedjob.summary import load_summary
from embedjob.worker.assemble import assemble_shard, sha256_file
from embedjob.worker.batching import make_batches
from embedjob.worker.checkpoint import (
    PartWriter,
    ProgressState,
    clean_uncommitted,
    discard_attempt,
    discard_parts,
    load_committed,
    next_part_index,
)
from embedjob.worker.failpoints import Failpoints
from embedjob.worker.heartbeat import Heartbeat, Interrupted, Stopper
from embedjob.worker.models.budget import resolve_tokens_per_batch
from embedjob.worker.shard_input import ShardInput, load_shard_input

RESUME_ROUNDS = 3
"""Passes over what is still missing; a second pass only happens when a concurrent attempt
deleted or broke a part this one counted on."""


@dataclass(frozen=True)
class WorkerConfig:
    spec: EmbeddingJobSpec
    shard: int
    attempt: int = 0
    job: str = ""
    max_tokens: int | None = None
    precision: str | None = None
    quarantine: frozenset[str] = frozenset()
    """Sequence ids left out."""
    isolate: tuple[str, ...] = ()
    """Runs of positions in the batch order (``"120-134"``) embedded one per batch."""
    workdir: str | None = None

    @property
    def tokens_per_batch(self) -> int:
        return int(self.max_tokens or self.spec.model.max_tokens_per_batch)  # auto: resolved


def _json_list(text: str | None, name: str) -> list[str]:
    try:
        value = json.loads(text or "[]")
    except ValueError:
        raise ConfigError(f"{name} must be a JSON list of strings") from None
    if not isinstance(value, list):
        raise ConfigError(f"{name} must be a JSON list of strings")
    return [str(v) for v in value]


def _int(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    if not env.get(name):
        return default
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {env[name]!r}") from None


def config_from_env(env: Mapping[str, str]) -> WorkerConfig:
    """Read the worker contract (docs/architecture.md) from environment variables."""
    if not env.get("EMBEDJOB_SPEC"):
        raise ConfigError(
            "EMBEDJOB_SPEC is not set: give the job spec as JSON in it, or pass a job file "
            "(embedjob index|finalize job.yaml)"
        )
    try:
        raw = json.loads(env["EMBEDJOB_SPEC"])
    except ValueError:
        raise ConfigError("EMBEDJOB_SPEC is not valid JSON") from None
    return WorkerConfig(
        spec=parse_spec(raw),
        shard=_int(env, "EMBEDJOB_SHARD", 0) or 0,
        attempt=_int(env, "EMBEDJOB_ATTEMPT", 0) or 0,
        job=env.get("EMBEDJOB_JOB", ""),
        max_tokens=_int(env, "EMBEDJOB_MAX_TOKENS_PER_BATCH", None),
        precision=env.get("EMBEDJOB_PRECISION") or None,
        quarantine=frozenset(_json_list(env.get("EMBEDJOB_QUARANTINE"), "EMBEDJOB_QUARANTINE")),
        isolate=tuple(_json_list(env.get("EMBEDJOB_ISOLATE"), "EMBEDJOB_ISOLATE")),
        workdir=env.get("EMBEDJOB_WORKDIR") or None,
    )


# --- stopping ---------------------------------------------------------------------------------


def install_stop_handler() -> Stopper:
    """SIGTERM/SIGINT: stop at once during load, resume and publish (nothing to save), or
    before the next forward pass while embedding, saving what was embedded."""
    return Stopper().install()


# --- the embedding loop -------------------------------------------------------------------------


def plan_batches(
    costs: np.ndarray, where: np.ndarray, todo: np.ndarray, isolated: np.ndarray,
    max_tokens: int,
) -> list[np.ndarray]:
    """Rows to embed, batched: isolated suspects alone first, then batches longest first.
    ``where``: each row's position in the batch order; ``isolated``: a mask over positions."""
    alone_mask = isolated[where[todo]]
    alone, rest = todo[alone_mask], todo[~alone_mask]
    batches = [np.asarray([r]) for r in alone]
    batches += [rest[np.asarray(b, dtype=np.int64)]
                for b in make_batches(costs[rest].tolist(), max_tokens)]
    return batches


def check_finite(embeddings: np.ndarray, ids: list[str], precision: str) -> None:
    bad = ~np.isfinite(embeddings).all(axis=1)
    if bad.any():
        first = ids[int(np.flatnonzero(bad)[0])]
        raise NumericalError(
            f"NaN/Inf in {int(bad.sum())} embeddings (first: {first}) at {precision}: "
            "retry at a safer precision", precision=precision,
        )


@dataclass
class Attempt:
    """The state of one pass over a shard, for the termination message."""

    batch: int | None = None
    batch_ids: list[str] = field(default_factory=list)
    batch_rows: str = ""
    """The batch's run of positions in the shard's batch order (embedjob.batch_order)."""
    done: int = 0
    batch_tokens: int | None = None


def embed_rows(
    cfg: WorkerConfig, embedder: object, shard_in: ShardInput, todo: np.ndarray,
    writer: PartWriter, stop: Stopper, attempt: Attempt,
) -> None:
    """Embed ``todo`` rows batch by batch, handing results to the writer."""
    failpoints = Failpoints.from_env(cfg.shard, cfg.attempt)
    dtype = np.dtype(cfg.spec.output.dtype)
    tokens_for = embedder.tokens_for  # type: ignore[attr-defined]
    costs = np.fromiter((tokens_for(int(n)) for n in shard_in.lengths), dtype=np.int64,
                        count=len(shard_in))
    where = positions(costs)
    batches = plan_batches(costs, where, todo, isolated_mask(cfg.isolate, len(shard_in)),
                           cfg.tokens_per_batch)
    for number, rows in enumerate(batches):
        if stop.flag.is_set():
            log("worker.stopping", batch=number)
            return
        ids = [shard_in.ids[r] for r in rows.tolist()]
        attempt.batch, attempt.batch_ids = number, ids
        attempt.batch_rows = run_of(where[rows].tolist())
        failpoints.before_batch(number, ids)
        emb = embedder.embed([shard_in.seq(r) for r in rows.tolist()])  # type: ignore[attr-defined]
        failpoints.after_batch(number, ids, emb)
        check_finite(emb, ids, embedder.precision)  # type: ignore[attr-defined]
        writer.add(rows, ids, emb.astype(dtype, copy=False))
        attempt.done += len(ids)
        if stop.heartbeat is not None:
            stop.heartbeat.rows_embedded(len(ids))
        attempt.batch, attempt.batch_ids, attempt.batch_rows = None, [], ""
        if writer.due():
            writer.flush()


def _gpu_memory() -> dict[str, object]:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {
        "gpuMemAllocated": torch.cuda.memory_allocated(),
        "gpuMemPeak": torch.cuda.max_memory_allocated(),
    }


def _pending(done: np.ndarray, ids: list[str], quarantine: frozenset[str]) -> np.ndarray:
    keep = np.fromiter((i not in quarantine for i in ids), dtype=bool, count=len(ids))
    return np.flatnonzero(keep & ~done)


def _run_pass(
    cfg: WorkerConfig, store: Store, embedder: object, shard_in: ShardInput,
    stop: Stopper, attempt: Attempt,
) -> bool:
    """One pass over what is not yet committed; True when nothing was left to do."""
    stop.enter("resuming")
    if store.exists(layout.shard_done(cfg.shard)):
        return True  # a newer attempt published the shard while this one ran
    committed = load_committed(store, cfg.shard, shard_in.ids)
    clean_uncommitted(store, cfg.shard, cfg.attempt, committed)
    todo = _pending(committed.done, shard_in.ids, cfg.quarantine)
    if len(todo) == 0:
        return True
    log("shard.resume" if committed.count else "shard.start", committed=committed.count,
        todo=len(todo), total=len(shard_in))
    progress = ProgressState(
        shard=cfg.shard, attempt=cfg.attempt, total=len(shard_in), committed=committed.count,
        parts=len(committed.parts), started=time.time(), committed_at_start=committed.count,
        batch_tokens=cfg.tokens_per_batch, precision=embedder.precision,  # type: ignore[attr-defined]
        quarantined=len(cfg.quarantine),
    )
    ckpt = cfg.spec.checkpoint
    writer = PartWriter(store, progress, every_sequences=ckpt.every_sequences,
                        every_seconds=ckpt.every_seconds, extra_progress=_gpu_memory,
                        first_index=next_part_index(store, cfg.shard, cfg.attempt))
    writer.write_progress()  # the model is loaded and this attempt is working
    if stop.heartbeat is not None:
        stop.heartbeat.embedding(committed.count, progress)
    stop.enter("embedding")
    try:
        embed_rows(cfg, embedder, shard_in, todo, writer, stop, attempt)
    except BaseException as err:  # save finished batches whatever stopped the loop
        saved = writer.close(ckpt.shutdown_deadline_seconds)
        if isinstance(err, EmbedjobError):
            err.details.update(committed=writer.committed, saved=saved)
        raise
    saved = writer.close(ckpt.shutdown_deadline_seconds)
    if stop.flag.is_set():
        state = "saved" if saved else "NOT all saved (upload deadline passed)"
        raise Preempted(f"stopped by signal; progress {state}", committed=writer.committed,
                        saved=saved)
    return False


def _published_elsewhere(cfg: WorkerConfig, store: Store) -> bool:
    """A late writer: another attempt published the shard; remove this attempt's leftovers."""
    if not store.exists(layout.shard_done(cfg.shard)):
        return False
    removed = discard_attempt(store, cfg.shard, cfg.attempt)
    log("shard.done_elsewhere", removed_parts=removed)
    return True


def publish(cfg: WorkerConfig, store: Store, shard_in: ShardInput, embedder: object,
            workdir: Path) -> None:
    """Assemble the shard file from parts, create it once, then the shard manifest."""
    if _published_elsewhere(cfg, store):
        return
    committed = load_committed(store, cfg.shard, shard_in.ids)
    keep = np.fromiter((i not in cfg.quarantine for i in shard_in.ids), dtype=bool,
                       count=len(shard_in))
    model = cfg.spec.model
    attrs = {
        "model": model.name, "layer": embedder.layer, "pooling": model.pooling,  # type: ignore[attr-defined]
        "precision": embedder.precision, "dtype": cfg.spec.output.dtype,  # type: ignore[attr-defined]
        "shard": cfg.shard, "job": cfg.job,
    }
    try:
        path = assemble_shard(store, cfg.shard, shard_in.ids, committed, keep,
                              dim=embedder.dim, dtype=cfg.spec.output.dtype,  # type: ignore[attr-defined]
                              attrs=attrs, workdir=workdir)
    except StorageError:
        # A newer attempt that published first deletes the parts: its result stands.
        if _published_elsewhere(cfg, store):
            return
        raise
    created = store.create_file(layout.shard_output(cfg.shard), str(path))
    if not created:
        log("shard.output_exists", note="another attempt published first; keeping its file")
        local = workdir / "existing.h5"
        store.download_file(layout.shard_output(cfg.shard), str(local))
        path = local
    done = {
        "shard": cfg.shard, "count": int(keep.sum()), "sha256": sha256_file(path),
        "bytes": path.stat().st_size, "attempt": cfg.attempt, "dim": embedder.dim,  # type: ignore[attr-defined]
        "quarantined": sorted(cfg.quarantine & set(shard_in.ids)),
    }
    store.create_bytes(layout.shard_done(cfg.shard), json.dumps(done).encode())
    discard_parts(store, cfg.shard)


def _with_budget(cfg: WorkerConfig, embedder: object, attempt: Attempt) -> WorkerConfig:
    """Resolve the token budget once the model is loaded (``auto`` measures the GPU)."""
    tokens, how = resolve_tokens_per_batch(cfg.max_tokens, cfg.spec.model.max_tokens_per_batch,
                                           embedder)
    log("worker.batch_tokens", tokens=tokens, chosen=how)
    attempt.batch_tokens = tokens
    return replace(cfg, max_tokens=tokens)


def run_shard(cfg: WorkerConfig, stop: Stopper, attempt: Attempt) -> None:
    from embedjob.worker.models import load_embedder  # torch loads only here

    spec = cfg.spec
    store = open_store(spec.output.uri, spec.storage)
    summary = load_summary(store)
    if summary is None:
        raise ConfigError(f"no index in {store.uri}: run `embedjob index` for this job first")
    if not 0 <= cfg.shard < summary.shards:
        raise ConfigError(f"shard {cfg.shard} does not exist (the job has {summary.shards})")
    if store.exists(layout.shard_done(cfg.shard)):
        log("shard.already_done")
        return
    alphabet = alphabet_for(spec)
    stop.heartbeat = Heartbeat(store, cfg.shard, cfg.attempt).start()
    stop.failpoints = Failpoints.from_env(cfg.shard, cfg.attempt)
    stop.deadline = spec.checkpoint.shutdown_deadline_seconds
    stop.enter("loading")
    root = cfg.workdir or os.environ.get("TMPDIR") or tempfile.gettempdir()
    with tempfile.TemporaryDirectory(dir=root, prefix=f"embedjob-{cfg.shard:05d}-") as tmp:
        workdir = Path(tmp)
        shard_in = load_shard_input(store, cfg.shard, alphabet, workdir)
        try:
            embedder = load_embedder(spec.model, precision=cfg.precision, storage=spec.storage)
            cfg = _with_budget(cfg, embedder, attempt)
            embedder.before_forward = stop.before_forward  # type: ignore[attr-defined]
            for _ in range(RESUME_ROUNDS):
                if _run_pass(cfg, store, embedder, shard_in, stop, attempt):
                    break
            else:
                raise StorageError(f"shard {cfg.shard}: parts keep disappearing from the store")
            stop.enter("publishing")
            publish(cfg, store, shard_in, embedder, workdir)
        finally:
            shard_in.close()
    log("shard.done", sequences=len(shard_in) - len(cfg.quarantine & set(shard_in.ids)))


def _leave_at_once(stage: str) -> None:
    """A signal during a stage with nothing buffered: say so and exit now. Committed parts
    are already safe; threads still uploading a shard file must not delay the exit."""
    write_termination_message(TerminationMessage(
        type=Preempted.failure.value, message=f"stopped by signal while {stage}; nothing to save",
    ))
    log("worker.stopped", stage=stage)
    sys.stderr.flush()
    os._exit(Preempted.exit_code)


def main(env: Mapping[str, str] | None = None, signalled: Sequence[int] = ()) -> int:
    """Entry point of ``embedjob worker``: returns the exit code. ``signalled``: stop signals
    recorded while the worker's modules were still being imported (read after the real
    handler is in place, so none falls between the two)."""
    attempt = Attempt()
    stop = install_stop_handler()
    if signalled:
        stop.flag.set()  # honoured on entering the first stage
    try:
        cfg = config_from_env(env if env is not None else os.environ)
        bind(job=cfg.job or None, shard=cfg.shard, attempt=cfg.attempt)
        run_shard(cfg, stop, attempt)
        return 0
    except Interrupted as stopped:
        _leave_at_once(stopped.stage)
        return Preempted.exit_code
    except EmbedjobError as err:
        batch_ids = attempt.batch_ids if attempt.batch is not None else []
        message = TerminationMessage(
            type=err.failure.value, message=err.message,
            committed=int(err.details.get("committed", 0)), done_this_attempt=attempt.done,
            batch=attempt.batch, transient=getattr(err, "transient", False),
            batch_tokens=attempt.batch_tokens, precision=err.details.get("precision"),
            ids=list(err.details.get("ids", batch_ids)),
            rows=attempt.batch_rows if attempt.batch is not None else None,
        )
        write_termination_message(message)
        log("worker.failed", type=err.failure.value, error=err.message)
        if err.details.get("saved") is False:
            # Uploads still hang past the deadline: the executor's threads would keep the
            # interpreter alive at exit, so leave now (the commit records are the truth).
            sys.stderr.flush()
            os._exit(err.exit_code)
        return err.exit_code
    except Exception as err:  # a bug: still one message for the policy, and the traceback
        write_termination_message(TerminationMessage(
            type="generic", message=f"{type(err).__name__}: {err}".splitlines()[0][:500],
            done_this_attempt=attempt.done, batch=attempt.batch, ids=attempt.batch_ids,
            rows=attempt.batch_rows or None,
        ))
        raise
