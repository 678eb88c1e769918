"""The ``curvscope`` command line: serve, analyze, demo.

Exit codes: 0 ok, 1 a gate failed, 2 usage or input error, 3 the server could not be reached
or failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .client import Client, CurvscopeError, build_request
from ._proto.curvscope.v1 import curvscope_pb2 as pb
from ._table import ProgressLine, render_report
from .report import Report

EXIT_OK, EXIT_GATE_FAILED, EXIT_INPUT, EXIT_SERVER = 0, 1, 2, 3
INPUT_CODES = {"INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED", "UNAUTHENTICATED", "UNIMPLEMENTED",
               "FAILED_PRECONDITION", "OUT_OF_RANGE", "ALREADY_EXISTS"}
SERVICE_MISSING = ("this needs the curvscope service on this machine: pip install curvscope-service "
                   "(or use --server HOST:PORT)")


def _service_module(name: str):
    try:
        return __import__(f"curvscope_service.{name}", fromlist=[name])
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] in {"curvscope_service", "torch"}:
            raise CurvscopeError("FAILED_PRECONDITION", SERVICE_MISSING) from None
        raise


def _add_analysis_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model: a local .pt2/.safetensors file, a file:// URI on the server, or sha256:DIGEST")
    parser.add_argument("--data", help="data batch: a .safetensors file with inputs and targets (or file://, sha256:)")
    parser.add_argument("--loss", default="cross_entropy", help="cross_entropy (default) or mse")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--server", help="HOST:PORT of a curvscope server (default: CURVSCOPE_SERVER)")
    where.add_argument("--local", action="store_true", help="run in this process (needs the service package)")
    parser.add_argument("--token-file", type=Path, help="file holding the bearer token (default: CURVSCOPE_TOKEN)")
    parser.add_argument("--tls-ca", type=Path, help="CA certificate of a TLS server")
    parser.add_argument("--eigen", type=int, default=None, metavar="K", help="K largest Hessian eigenvalues (default 1)")
    parser.add_argument("--smallest", type=int, default=0, metavar="K", help="K smallest Hessian eigenvalues")
    parser.add_argument("--tolerance", type=float, default=0.0, help="relative Ritz residual to stop at (default 1e-3)")
    parser.add_argument("--max-hvps", type=int, default=0, help="budget of Hessian-vector products")
    parser.add_argument("--trace", action="store_true", help="Hessian trace")
    parser.add_argument("--density", action="store_true", help="spectral density")
    parser.add_argument("--sharpness", action="store_true", help="sharpness and the GD stability verdict")
    parser.add_argument("--non-uniformity", action="store_true", help="non-uniformity and the SGD stability verdict")
    parser.add_argument("--lipschitz", action="store_true", help="Lipschitz bounds")
    parser.add_argument("--lr", type=float, default=0.0, metavar="ETA", help="learning rate for the stability verdicts")
    parser.add_argument("--batch-size", type=int, default=0, metavar="B", help="SGD batch size for the stability verdict")
    parser.add_argument("--per-layer", action="store_true", help="also analyse each layer's parameter block")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    parser.add_argument("--precision", choices=["float32", "float64"], default="float32")
    parser.add_argument("--micro-batch-size", type=int, default=0, help="samples per micro-batch (default: the server's)")
    parser.add_argument("--max-samples", type=int, default=0, help="use at most this many samples, chosen with the seed")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before the server gives up (deadline)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the JSON report here ('-' for stdout)")


def _request_options(args: argparse.Namespace) -> dict:
    eigen = args.eigen
    if eigen is None:
        others = args.smallest or args.trace or args.density or args.sharpness or args.non_uniformity or args.lipschitz
        eigen = 0 if others else 1
    return dict(
        loss=args.loss, eigen=eigen, smallest=args.smallest, tolerance=args.tolerance, max_hvps=args.max_hvps,
        trace=args.trace, density=args.density, sharpness=args.sharpness, non_uniformity=args.non_uniformity,
        lipschitz=args.lipschitz, learning_rate=args.lr, batch_size=args.batch_size, per_layer=args.per_layer,
        seed=args.seed, precision=args.precision, micro_batch_size=args.micro_batch_size, max_samples=args.max_samples,
    )


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        try:
            return args.token_file.read_text().strip()
        except OSError as error:
            raise CurvscopeError("INVALID_ARGUMENT", f"cannot read the token file: {error.strerror}") from None
    return None


def _emit(report: Report, args: argparse.Namespace) -> None:
    data = report.to_dict()
    if args.json:
        text = json.dumps(data, indent=2, allow_nan=False)
        if str(args.json) == "-":
            print(text)
            return
        args.json.write_text(text + "\n")
    print(render_report(data))


def cmd_analyze(args: argparse.Namespace) -> int:
    options = _request_options(args)
    progress = ProgressLine()
    try:
        if args.local:
            local = _service_module("local")
            for path in filter(None, [args.model, args.data]):
                if not Path(path).is_file():
                    raise CurvscopeError("INVALID_ARGUMENT", f"{path} is not a file")
            request = build_request(
                pb.ModelRef(uri=Path(args.model).resolve().as_uri()),
                pb.DataRef(uri=Path(args.data).resolve().as_uri()) if args.data else None, **options)
            report = local.analyze_local(request, progress=progress)
        else:
            with Client(args.server, token=_token(args), tls_ca=args.tls_ca) as client:
                report = client.analyze(args.model, args.data, progress=progress, timeout=args.timeout, **options)
    finally:
        progress.close()
    _emit(report, args)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    demo = _service_module("demo")
    report = demo.run_demo(progress=ProgressLine(), per_layer=not args.whole_model_only)
    _emit(report, args)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curvscope", description="Curvature analysis of model checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the gRPC server (flags: curvscope serve --help)", add_help=False)
    analyze = commands.add_parser("analyze", help="analyse a checkpoint on a data batch")
    _add_analysis_flags(analyze)
    analyze.set_defaults(run=cmd_analyze)
    demo = commands.add_parser("demo", help="a small model on scikit-learn's digits, an in-process server, a report")
    demo.add_argument("--json", type=Path, metavar="OUT", help="write the JSON report here ('-' for stdout)")
    demo.add_argument("--whole-model-only", action="store_true", help="skip the per-layer eigenvalues")
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["serve"]:
            # The server parses its own flags (they have CURVSCOPE_* environment defaults).
            _service_module("server").main(argv[1:])
            return EXIT_OK
        args = build_parser().parse_args(argv)
        return args.run(args)
    except CurvscopeError as error:
        print(f"curvscope: {error.code}: {error.message}", file=sys.stderr)
        return EXIT_INPUT if error.code in INPUT_CODES else EXIT_SERVER
    except KeyboardInterrupt:
        print("curvscope: interrupted", file=sys.stderr)
        return EXIT_SERVER


if __name__ == "__main__":
    sys.exit(main())
