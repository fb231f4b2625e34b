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
    from embedjob.local.runner import run_job
    from embedjob.spec import load_job

    if args.workers is not None and args.workers < 1:
        raise EmbedjobError("--workers must be at least 1")
    return run_job(load_job(args.job), args.workers)


def _cmd_worker(_args: argparse.Namespace) -> int:
    from embedjob.worker.runner import main

    return main()


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
                write_termination_message(TerminationMessage(err.failure.value, err.message))
            raise

    return run


def _cmd_index(args: argparse.Namespace) -> int:
    from embedjob.store import open_store
    from embedjob.worker.index import run_index

    spec, job = _spec_from_env_or_file(args.job)
    summary = run_index(spec, open_store(spec.output.uri, spec.storage), job_name=job)  # type: ignore[attr-defined]
    print(f"indexed {summary.sequences} sequences into {summary.shards} shards", file=sys.stderr)
    return 0


def _cmd_finalize(args: argparse.Namespace) -> int:
    from embedjob.worker.finalize import finalize

    spec, job = _spec_from_env_or_file(args.job)
    manifest = finalize(spec, job)  # type: ignore[arg-type]
    print(f"{manifest['sequences']} sequences in {len(manifest['shards'])} shards", file=sys.stderr)
    return 0


def _cmd_operator(args: argparse.Namespace) -> int:
    from embedjob.operator.main import run_operator

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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="embedjob", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run an EmbeddingJob YAML on this machine")
    run.add_argument("job", help="EmbeddingJob YAML (the file kubectl apply takes)")
    run.add_argument("--workers", type=int, default=None,
                     help="worker processes at once (default: one per GPU, or by CPU cores)")
    run.set_defaults(func=_cmd_run)

    worker = sub.add_parser("worker", help="embed one shard (pod entry point; reads EMBEDJOB_*)")
    worker.set_defaults(func=_cmd_worker)
    for name, func, text in (
        ("index", _as_pod_step(_cmd_index), "validate and shard the input"),
        ("finalize", _as_pod_step(_cmd_finalize), "write manifest.json and the merged file"),
    ):
        cmd = sub.add_parser(name, help=f"{text} (reads EMBEDJOB_SPEC, or a job file)")
        cmd.add_argument("job", nargs="?", help="EmbeddingJob YAML (default: EMBEDJOB_SPEC)")
        cmd.set_defaults(func=func)

    op = sub.add_parser("operator", help="run the Kubernetes operator")
    op.add_argument("--namespace", "-n", action="append", help="watch this namespace (repeat)")
    op.add_argument("--config", default=os.environ.get("EMBEDJOB_OPERATOR_CONFIG"),
                    help="operator settings file (default: $EMBEDJOB_OPERATOR_CONFIG)")
    op.set_defaults(func=_cmd_operator)

    crd = sub.add_parser("crd", help="print the EmbeddingJob CRD generated from the models")
    crd.add_argument("-o", "--output", help="write to this file instead of stdout")
    crd.set_defaults(func=_cmd_crd)

    ins = sub.add_parser("inspect", help="summarise a job's output; --verify checks every file")
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
