"""embedjob: run | worker | index | finalize | operator | crd | inspect.

Expected failures print one line (``embedjob: error: …``) and exit with the failure's code;
only a bug prints a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from embedjob.failures import EmbedjobError, TerminationMessage, write_termination_message


def _cmd_run(args: argparse.Namespace) -> int:
    from embedjob.local.runner import RunOptions, run_job
    from embedjob.spec import load_job

    if args.workers is not None and args.workers < 1:
        raise EmbedjobError("--workers must be at least 1")
    if args.restart and args.retry_failed:
        raise EmbedjobError("--restart and --retry-failed exclude each other: choose one")
    for name in ("stuck_after", "storage_patience"):
        if getattr(args, name) <= 0:
            raise EmbedjobError(f"--{name.replace('_', '-')} must be a positive number of seconds")
    options = RunOptions(workers=args.workers, stuck_after=args.stuck_after,
                         storage_patience=args.storage_patience, restart=args.restart,
                         retry_failed=args.retry_failed, verify=args.verify)
    return run_job(load_job(args.job), options)


def _cmd_worker(_args: argparse.Namespace) -> int:
    import signal

    # Importing numpy and the worker takes seconds on a busy node: a SIGTERM meanwhile must
    # still end in exit 143 and a termination message, not in the default action.
    early: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: early.append(signum))
    from embedjob.worker.runner import main

    return main(signalled=early)


def _spec_from_env_or_file(path: str | None) -> tuple[object, str]:
    from embedjob.spec import load_job
    from embedjob.worker.runner import config_from_env

    if path:
        job = load_job(path)
        return job.spec, job.metadata.name
    cfg = config_from_env(os.environ)
    return cfg.spec, cfg.job


def _as_pod_step(step: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Index and finalize run as pods too: say why they stopped the way a worker does."""

    def run(args: argparse.Namespace) -> int:
        try:
            return step(args)
        except EmbedjobError as err:
            if not args.job:  # configured by the environment: a pod (or a runner's process)
                write_termination_message(TerminationMessage(
                    err.failure.value, err.message,
                    reset_shards=list(err.details.get("reset_shards", []))))
            raise

    return run


def _cmd_index(args: argparse.Namespace) -> int:
    from embedjob.operator.names import RESTART_ENV
    from embedjob.store import open_store
    from embedjob.worker.index import run_index

    spec, job = _spec_from_env_or_file(args.job)
    store = open_store(spec.output.uri, spec.storage)  # type: ignore[attr-defined]
    if os.environ.get(RESTART_ENV):  # embedjob.io/restart: what `embedjob run --restart` does
        from embedjob.local.restart import discard

        print(f"{discard(store)} (embedjob.io/restart: {os.environ[RESTART_ENV]})",
              file=sys.stderr)
    summary = run_index(spec, store, job_name=job)  # type: ignore[attr-defined]
    line = f"indexed {summary.sequences} sequences into {summary.shards} shards"
    print(line, file=sys.stderr)
    if not args.job:  # a pod: the operator reads the shard count from here
        write_termination_message(TerminationMessage("indexed", line, shards=summary.shards,
                                                     sequences=summary.sequences))
    return 0


def _cmd_finalize(args: argparse.Namespace) -> int:
    from embedjob.worker.finalize import finalize

    spec, job = _spec_from_env_or_file(args.job)
    manifest = finalize(spec, job)  # type: ignore[arg-type]
    print(f"{manifest['sequences']} sequences in {len(manifest['shards'])} shards", file=sys.stderr)
    return 0


def _cmd_operator(args: argparse.Namespace) -> int:
    from embedjob.operator.entry import run_operator

    return run_operator(args.namespace or None, args.config)


def _cmd_crd(args: argparse.Namespace) -> int:
    from embedjob.crd import crd_yaml, write_crd

    if args.output:
        write_crd(args.output)
    else:
        sys.stdout.write(crd_yaml())
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from embedjob.inspection import inspect_output

    report, ok = inspect_output(args.output, verify=args.verify, endpoint_url=args.endpoint_url)
    print(json.dumps(report, indent=2) if args.json else report["text"])
    return 0 if ok else 1


def _sub(sub: argparse._SubParsersAction, name: str, text: str,  # type: ignore[type-arg]
         more: str = "") -> argparse.ArgumentParser:
    """A subcommand whose --help says what it does (the one-line text, then details)."""
    return sub.add_parser(name, help=text, description=f"{text[0].upper()}{text[1:]}. {more}"
                          .strip())


def _add_run(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from embedjob.liveness import DEFAULT_STUCK_AFTER
    from embedjob.local.patience import DEFAULT_OUTAGE_SECONDS

    run = _sub(sub, "run", "run an EmbeddingJob YAML on this machine",
               "Worker processes instead of pods; stop with Ctrl-C or SIGTERM (progress is "
               "saved) and run again to resume.")
    run.add_argument("job", help="EmbeddingJob YAML (the file kubectl apply takes)")
    run.add_argument("--workers", type=int, default=None,
                     help="worker processes at once (default: one per GPU, or by CPU cores)")
    run.add_argument("--restart", action="store_true",
                     help="delete this output's index, checkpoints and results, and start over")
    run.add_argument("--retry-failed", action="store_true",
                     help="after a Failed run: retry its failed shards with a fresh budget")
    run.add_argument("--verify", action="store_true",
                     help="re-hash finished shards (sizes and done records are always checked) "
                          "and re-embed any that are damaged")
    run.add_argument("--stuck-after", type=float, default=DEFAULT_STUCK_AFTER, metavar="SECONDS",
                     help="replace a worker whose heartbeat stops for this long (it grows with "
                          f"the slowest batch seen; default {DEFAULT_STUCK_AFTER:g})")
    run.add_argument("--storage-patience", type=float, default=DEFAULT_OUTAGE_SECONDS,
                     metavar="SECONDS", help="ride out a storage outage this long before stopping "
                                             f"(default {DEFAULT_OUTAGE_SECONDS:g})")
    run.set_defaults(func=_cmd_run)


def parser() -> argparse.ArgumentParser:
    from embedjob import __version__

    p = argparse.ArgumentParser(prog="embedjob", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"embedjob {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _add_run(sub)

    worker = _sub(sub, "worker", "embed one shard (pod entry point; reads EMBEDJOB_*)",
                  "Started by the operator or `embedjob run`; see docs/architecture.md.")
    worker.set_defaults(func=_cmd_worker)
    for name, func, text in (
        ("index", _as_pod_step(_cmd_index), "validate and shard the input"),
        ("finalize", _as_pod_step(_cmd_finalize), "write manifest.json and the merged file"),
    ):
        cmd = _sub(sub, name, f"{text} (reads EMBEDJOB_SPEC, or a job file)")
        cmd.add_argument("job", nargs="?", help="EmbeddingJob YAML (default: EMBEDJOB_SPEC)")
        cmd.set_defaults(func=func)

    op = _sub(sub, "operator", "run the Kubernetes operator")
    op.add_argument("--namespace", "-n", action="append", help="watch this namespace (repeat)")
    op.add_argument("--config", default=os.environ.get("EMBEDJOB_OPERATOR_CONFIG"),
                    help="operator settings file (default: $EMBEDJOB_OPERATOR_CONFIG)")
    op.set_defaults(func=_cmd_operator)

    crd = _sub(sub, "crd", "print the EmbeddingJob CRD generated from the models")
    crd.add_argument("-o", "--output", help="write to this file instead of stdout")
    crd.set_defaults(func=_cmd_crd)

    ins = _sub(sub, "inspect", "summarise a job's output; --verify checks every file")
    ins.add_argument("output", help="the job's output.uri")
    ins.add_argument("--verify", action="store_true", help="check sizes, counts and sha256")
    ins.add_argument("--json", action="store_true", help="print the report as JSON")
    ins.add_argument("--endpoint-url", help="S3 endpoint (MinIO, moto); default: AWS")
    ins.set_defaults(func=_cmd_inspect)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except EmbedjobError as err:
        print(f"embedjob: error: {err.message}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("embedjob: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `embedjob inspect --json | head`: the reader left; so do we
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
