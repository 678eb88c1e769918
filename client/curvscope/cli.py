"""The ``curvscope`` command line: serve, analyze, gate, report, compare, demo.

Exit codes: 0 ok, 1 a gate failed, 2 usage or input error, 3 the server could not be reached
or failed (or, with ``--local``, the engine failed). Errors are one line on stderr, never a
traceback; usage errors too. ``curvscope`` alone prints the help and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, Sequence

from . import __version__
from .client import (CONNECT_TIMEOUT_SECONDS, CURVATURES, LOSSES, TASKS, TRACE_METHODS, Client, CurvscopeError,
                     build_request)
from ._proto.curvscope.v1 import curvscope_pb2 as pb
from ._sizes import parse_bytes
from ._table import ProgressLine, render_report
from .report import Report

EXIT_OK, EXIT_GATE_FAILED, EXIT_INPUT, EXIT_SERVER = 0, 1, 2, 3
INPUT_CODES = {"INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED", "UNAUTHENTICATED", "UNIMPLEMENTED",
               "FAILED_PRECONDITION", "OUT_OF_RANGE", "ALREADY_EXISTS"}
SERVICE_MISSING = ("this needs the curvscope service on this machine: pip install curvscope-service "
                   "(or use --server HOST:PORT)")


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line, like every other error of the command line (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_INPUT, f"{self.prog}: INVALID_ARGUMENT: {message}; see {self.prog} --help\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks, and shows each flag's default unless its help names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == [] \
            or action.default == argparse.SUPPRESS
        if action.option_strings and not unset and "default" not in text:
            text += " (default: %(default)s)"
        return text


class _Version(argparse.Action):
    """``--version``: this client's version, and the service package's when it is installed
    (read from the installed metadata: nothing of the service is imported)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: str | None = None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            service = f"curvscope-service {version('curvscope-service')}"
        except PackageNotFoundError:
            service = "curvscope-service not installed"
        print(f"curvscope {__version__} ({service})")
        parser.exit()


def _service_module(name: str):
    try:
        return __import__(f"curvscope_service.{name}", fromlist=[name])
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] in {"curvscope_service", "torch"}:
            raise CurvscopeError("FAILED_PRECONDITION", SERVICE_MISSING) from None
        raise


def _add_connection_flags(parser: argparse.ArgumentParser, timeout_help: str) -> None:
    """Where the work runs, how to reach the server, and how long to wait: the same flags for
    every subcommand that talks to one."""
    group = parser.add_argument_group("server connection")
    where = group.add_mutually_exclusive_group()
    where.add_argument("--server", metavar="HOST:PORT",
                       help="a curvscope server (default: CURVSCOPE_SERVER, else localhost:50051)")
    where.add_argument("--local", action="store_true", help="run in this process (needs the service package)")
    group.add_argument("--token-file", type=Path, metavar="FILE",
                       help="file holding the bearer token (default: CURVSCOPE_TOKEN)")
    group.add_argument("--tls", action="store_true", help="use TLS, trusting the system's root certificates")
    group.add_argument("--tls-ca", type=Path, metavar="CA.pem", help="CA certificate of a TLS server (implies --tls)")
    group.add_argument("--tls-cert", type=Path, metavar="CERT.pem",
                       help="client certificate, for servers that require mutual TLS")
    group.add_argument("--tls-key", type=Path, metavar="KEY.pem", help="private key of --tls-cert")
    timeouts = parser.add_argument_group("timeouts")
    timeouts.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                          help=timeout_help)
    timeouts.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT_SECONDS, metavar="SECONDS",
                          help="seconds to wait for a connection to the server")


def _connect(args: argparse.Namespace) -> Client:
    return Client(args.server, token=_token(args), tls=args.tls, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                  tls_key=args.tls_key, connect_timeout=args.connect_timeout,
                  target_origin="--server" if args.server else None)


def _byte_count(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_analysis_flags(parser: argparse.ArgumentParser) -> None:
    inputs = parser.add_argument_group("input")
    inputs.add_argument("model", help="a local .pt2/.safetensors file or Hugging Face checkpoint folder (config.json + "
                                      "model.safetensors), a file:// URI on the server, or sha256:DIGEST")
    inputs.add_argument("--data", help="data batch: a .safetensors file with inputs and targets (or file://, sha256:)")
    inputs.add_argument("--loss", choices=LOSSES, default="cross_entropy", help="the loss, a mean over the samples")
    inputs.add_argument("--task", choices=TASKS, default="",
                        help="what the model predicts (default: inferred from the shapes: a class per sample for (n, C) "
                             "outputs, per token for (n, T, C)); causal-lm shifts the labels by one and, without "
                             "targets, takes them from input_ids with masked positions ignored")
    analyses = parser.add_argument_group("analyses (with none named: --eigen 1)")
    analyses.add_argument("--eigen", type=int, default=None, metavar="K",
                          help="K largest eigenvalues (default: 1 when no other analysis is named, else 0)")
    analyses.add_argument("--smallest", type=int, default=0, metavar="K", help="K smallest eigenvalues")
    analyses.add_argument("--trace", action="store_true", help="Hessian trace")
    analyses.add_argument("--density", action="store_true", help="spectral density")
    analyses.add_argument("--sharpness", action="store_true", help="sharpness and the GD stability verdict")
    analyses.add_argument("--non-uniformity", action="store_true", help="non-uniformity and the SGD stability verdict")
    analyses.add_argument("--lipschitz", action="store_true", help="Lipschitz bounds")
    analyses.add_argument("--epsilon-sharpness", action="store_true", help="epsilon-sharpness (Keskar et al. 2017)")
    analyses.add_argument("--adaptive-sharpness", action="store_true",
                          help="adaptive worst- or average-case sharpness (Kwon et al. 2021; Andriushchenko et al. 2023)")
    analyses.add_argument("--weight-spectra", action="store_true",
                          help="per-layer spectral norms, stable rank and power-law alpha (no data needed)")
    analyses.add_argument("--set", action="append", default=[], metavar="ANALYSIS.SETTING=VALUE", dest="settings",
                          help="any setting of an analysis's spec, adding that analysis; repeatable, e.g. "
                               "--set non_uniformity.method=gauss_newton --set lipschitz.methods=lipsdp_neuron,lower "
                               "--set adaptive_sharpness.rho=0.05 (names as in the API's *Spec messages)")
    analyses.add_argument("--per-layer", action="store_true", help="also analyse each layer's parameter block")
    analyses.add_argument("--lr", type=float, default=0.0, metavar="ETA",
                          help="learning rate for the stability verdicts (default: 0, no verdict)")
    analyses.add_argument("--batch-size", type=int, default=0, metavar="B",
                          help="SGD batch size for the stability verdict (default: 0, no verdict)")
    numerics = parser.add_argument_group("numerics")
    numerics.add_argument("--curvature", choices=list(CURVATURES), default=None,
                          help="the matrix the spectral analyses (eigen, trace, density) measure (default: hessian; "
                               "ggn = J^T H_loss J; fisher: labels sampled from the model with the seed; "
                               "empirical_fisher: the data's labels)")
    numerics.add_argument("--tolerance", type=float, default=0.0, metavar="REL",
                          help="relative Ritz residual the eigensolver stops at (default: the server's, 1e-3)")
    numerics.add_argument("--max-hvps", type=int, default=0, metavar="N",
                          help="budget of Hessian-vector products of the eigensolver (default: the server's)")
    numerics.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    numerics.add_argument("--precision", choices=["float32", "float64"], default="float32",
                          help="floating-point type of the computation")
    numerics.add_argument("--micro-batch-size", type=int, default=0, metavar="N",
                          help="samples per micro-batch (default: the server's)")
    numerics.add_argument("--max-samples", type=int, default=0, metavar="N",
                          help="use at most this many samples, chosen with the seed (default: 0, all)")
    numerics.add_argument("--memory-budget", type=_byte_count, default=os.environ.get("CURVSCOPE_MEMORY_BUDGET", "0"),
                          metavar="BYTES",
                          help="memory the analyses may plan for, e.g. 8GB or 6GiB: smaller blocks are chosen to fit, "
                               "or the run is refused with what would fit (default: CURVSCOPE_MEMORY_BUDGET, else "
                               "the server's ceiling; with --local the machine's available memory)")
    trace = parser.add_argument_group("numerics of --trace")
    trace.add_argument("--trace-method", choices=list(TRACE_METHODS), default=None,
                       help="estimator (default: the server's, xtrace; seeded with the Ritz pairs of --eigen when both run)")
    trace.add_argument("--trace-max-hvps", type=int, default=0, metavar="N", help="budget of products (default: the server's)")
    trace.add_argument("--trace-tolerance", type=float, default=0.0, metavar="REL",
                       help="adaptive mode: stop once stderr/|trace| <= REL (default: use the whole budget)")
    trace.add_argument("--frobenius", action="store_true", help="also estimate tr(H^2), the squared Frobenius norm")
    density = parser.add_argument_group("numerics of --density")
    density.add_argument("--density-steps", type=int, default=0, metavar="M", help="Lanczos steps per probe (default 90)")
    density.add_argument("--density-probes", type=int, default=0, metavar="P", help="random probes (default 10)")
    density.add_argument("--density-grid", type=int, default=0, metavar="G", help="points of the output grid (default 1000)")
    density.add_argument("--density-sigma", type=float, default=0.0, metavar="S",
                         help="Gaussian broadening width, relative to the spectral range (default: the server's)")
    density.add_argument("--density-negative-tolerance", type=float, default=None, metavar="TAU",
                         help="eigenvalues within TAU * max|eigenvalue| of zero count as near zero, not negative "
                              "(default 1e-3; 0 counts every negative one)")
    _add_connection_flags(parser, "the analysis's deadline: the server gives up past it (default: none)")
    output = parser.add_argument_group("output (the report's table goes to stdout)")
    output.add_argument("--json", type=Path, metavar="OUT", help="write the JSON report here ('-' for stdout)")
    output.add_argument("--plot", type=Path, metavar="OUT.png|OUT.svg",
                        help="plot the spectral density (log scale) and the top eigenvalues per layer: .svg needs "
                             "nothing more, .png needs matplotlib (pip install 'curvscope[plot]')")


def _spec_fields(settings: list[str]) -> dict[str, dict[str, str]]:
    """``--set ANALYSIS.SETTING=VALUE`` flags, grouped by analysis."""
    fields: dict[str, dict[str, str]] = {}
    for setting in settings:
        name, dot, rest = setting.partition(".")
        key, equals, value = rest.partition("=")
        if not (dot and equals and name and key):
            raise CurvscopeError("INVALID_ARGUMENT", f"--set {setting!r}: write ANALYSIS.SETTING=VALUE, "
                                                     "e.g. non_uniformity.method=gauss_newton")
        fields.setdefault(name, {})[key] = value
    return fields


def _request_options(args: argparse.Namespace) -> dict:
    spec_fields = _spec_fields(args.settings)
    eigen = args.eigen
    if eigen is None:
        others = (args.smallest or args.trace or args.density or args.sharpness or args.non_uniformity or args.lipschitz
                  or args.epsilon_sharpness or args.adaptive_sharpness or args.weight_spectra
                  or any(name != "hessian_eigen" for name in spec_fields))
        eigen = 0 if others else 1
    options = dict(
        epsilon_sharpness=args.epsilon_sharpness, adaptive_sharpness=args.adaptive_sharpness,
        weight_spectra=args.weight_spectra, spec_fields=spec_fields,
        loss=args.loss, eigen=eigen, smallest=args.smallest, tolerance=args.tolerance, max_hvps=args.max_hvps,
        trace=args.trace, density=args.density, sharpness=args.sharpness, non_uniformity=args.non_uniformity,
        lipschitz=args.lipschitz, learning_rate=args.lr, batch_size=args.batch_size, per_layer=args.per_layer,
        seed=args.seed, precision=args.precision, micro_batch_size=args.micro_batch_size, max_samples=args.max_samples,
        memory_budget_bytes=args.memory_budget, curvature=args.curvature, task=args.task,
        trace_method=args.trace_method, trace_max_hvps=args.trace_max_hvps,
        trace_tolerance=args.trace_tolerance, frobenius=args.frobenius, density_steps=args.density_steps,
        density_probes=args.density_probes, density_grid=args.density_grid, density_sigma=args.density_sigma,
        density_negative_tolerance=args.density_negative_tolerance,
    )
    try:  # a bad setting is a usage error before anything is uploaded
        build_request(pb.ModelRef(), **options)
    except ValueError as error:
        raise CurvscopeError("INVALID_ARGUMENT", str(error)) from None
    return options


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        try:
            return args.token_file.read_text().strip()
        except OSError as error:
            raise CurvscopeError("INVALID_ARGUMENT", f"cannot read the token file: {error.strerror}") from None
    return None


def _check_plot(path: Path | None) -> None:
    """Refuse a --plot that cannot be written before any work is done."""
    if path is None:
        return
    suffix = path.suffix.lower()
    if suffix == ".png":
        from .plots_png import require_matplotlib

        require_matplotlib()
    elif suffix != ".svg":
        raise CurvscopeError("INVALID_ARGUMENT", f"--plot {path}: write a .png or an .svg file")


def _emit(report: Report, args: argparse.Namespace) -> None:
    data = report.to_dict()
    if args.json and str(args.json) == "-":
        print(report.to_json(indent=2))  # stdout is the JSON alone: no table
    else:
        if args.json:
            args.json.write_text(report.to_json(indent=2) + "\n")
        print(render_report(data))
    if getattr(args, "plot", None):
        if args.plot.suffix.lower() == ".png":
            from .plots_png import spectrum_png

            image = spectrum_png(data)
        else:
            from .plots import spectrum_svg

            image = spectrum_svg(data)
        if image is None:
            raise CurvscopeError("INVALID_ARGUMENT", "--plot: the report has no spectral density or eigenvalues to plot")
        args.plot.write_bytes(image) if isinstance(image, bytes) else args.plot.write_text(image)


def _check_local_paths(model: str, data: str | None) -> None:
    """--local reads a model file or checkpoint folder and a data file on this machine."""
    if not (Path(model).is_file() or Path(model).is_dir()):
        raise CurvscopeError("INVALID_ARGUMENT", f"{model} is not a file or a checkpoint folder")
    if data and not Path(data).is_file():
        raise CurvscopeError("INVALID_ARGUMENT", f"{data} is not a file")


def cmd_analyze(args: argparse.Namespace) -> int:
    _check_plot(args.plot)
    options = _request_options(args)
    progress = ProgressLine()
    try:
        if args.local:
            local = _service_module("local")
            _check_local_paths(args.model, args.data)
            request = build_request(
                pb.ModelRef(uri=Path(args.model).resolve().as_uri()),
                pb.DataRef(uri=Path(args.data).resolve().as_uri()) if args.data else None, **options)
            report = local.analyze_local(request, progress=progress)
        else:
            with _connect(args) as client:
                report = client.analyze(args.model, args.data, progress=progress, timeout=args.timeout, **options)
    except BaseException:
        progress.close(succeeded=False)
        raise
    progress.close()
    _emit(report, args)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    demo = _service_module("demo")
    report = demo.run_demo(progress=ProgressLine(), per_layer=not args.whole_model_only, transformer=args.transformer)
    _emit(report, args)
    return EXIT_OK


def _gate_runner(args: argparse.Namespace, client: Client | None, timeout: float | None, progress: ProgressLine):
    """Send a policy's request with this invocation's model and data; returns the report dict."""
    if client is None:
        local = _service_module("local")
        _check_local_paths(args.model, args.data)
        model = pb.ModelRef(uri=Path(args.model).resolve().as_uri())
        data = pb.DataRef(uri=Path(args.data).resolve().as_uri()) if args.data else None
    else:
        model = client.model_ref(args.model)  # uploaded once, however many requests follow
        data = client.data_ref(args.data) if args.data else None

    def run(request: pb.AnalyzeRequest) -> dict:
        request.model.CopyFrom(model)
        if data is not None:
            request.data.CopyFrom(data)
        if args.memory_budget:
            request.options.memory_budget_bytes = args.memory_budget
        if client is None:
            return local.analyze_local(request, progress=progress).to_dict()
        return client.analyze_request(request, progress=progress, timeout=timeout).to_dict()

    return run


def cmd_gate(args: argparse.Namespace) -> int:
    from .gate import GateResult, ReportError, evaluate, github_annotations, load_report, render_table, run_policy
    from .policy import STARTER_POLICY, PolicyError, load_policy

    if args.init:
        target = args.policy or Path("curvscope.toml")
        if target.exists() and not args.force:
            print(f"curvscope gate: {target} exists; pass --force to overwrite it", file=sys.stderr)
            return EXIT_INPUT
        target.write_text(STARTER_POLICY)
        print(f"wrote a starter policy to {target}; edit it, then: curvscope gate --policy {target} MODEL --data DATA")
        return EXIT_OK
    if args.policy is None or (args.model is None) == (args.report is None):
        print("curvscope gate: needs --policy POLICY.toml and either MODEL or --report REPORT.json "
              "(or --init to write a starter policy)", file=sys.stderr)
        return EXIT_INPUT
    started = time.perf_counter()
    try:
        policy = load_policy(args.policy)
        baseline = None
        if args.baseline is not None:
            if args.baseline.is_file():
                baseline = load_report(args.baseline)
            else:
                print(f"curvscope gate: no baseline at {args.baseline}; change bounds are not checked", file=sys.stderr)
        if args.report is not None:
            report, failed = load_report(args.report), {}
        else:
            timeout = args.timeout or policy.request.get("timeout")
            progress = ProgressLine()
            try:
                if args.local:
                    report, failed = run_policy(policy, _gate_runner(args, None, timeout, progress))
                else:
                    with _connect(args) as client:
                        report, failed = run_policy(policy, _gate_runner(args, client, timeout, progress))
            finally:
                progress.close()
    except (PolicyError, ReportError) as error:
        print(f"curvscope gate: {error}", file=sys.stderr)
        return EXIT_INPUT
    result: GateResult = evaluate(policy, report, baseline, failed)
    print(render_table(result))
    if os.environ.get("GITHUB_ACTIONS") == "true":
        print("\n".join(github_annotations(result)))
    _write_gate_outputs(result, args, time.perf_counter() - started)
    return result.exit_code


def _write_gate_outputs(result, args: argparse.Namespace, seconds: float) -> None:
    from .html_report import render_html
    from .junit import write_junit
    from .markdown_report import gate_markdown

    if args.junit:
        write_junit(result, args.junit, seconds)
    markdown = gate_markdown(result)
    if args.markdown:
        args.markdown.write_text(markdown, encoding="utf-8")
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as handle:
            handle.write(markdown)
    if args.json:
        args.json.write_text(json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
    if args.html:
        args.html.write_text(render_html(result.to_dict(), title="curvscope gate"), encoding="utf-8")


def _read_report(path: Path) -> dict:
    from .gate import ReportError, load_report

    try:
        return load_report(path)
    except ReportError as error:
        raise CurvscopeError("INVALID_ARGUMENT", str(error)) from None


def cmd_report(args: argparse.Namespace) -> int:
    from .gate import GATE_SCHEMA
    from .html_report import render_html

    report = _read_report(args.report)
    print(render_report(report))
    if args.html:
        raw = json.loads(args.report.read_text())
        # A gate's output keeps its verdicts on the page.
        page = {**raw, "report": report} if raw.get("schema") == GATE_SCHEMA else report
        args.html.write_text(render_html(page, title=args.title or f"curvscope report: {args.report.name}"),
                             encoding="utf-8")
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare_markdown, render_compare

    first, second = _read_report(args.a), _read_report(args.b)
    names = (args.a.name, args.b.name) if args.a.name != args.b.name else (str(args.a), str(args.b))
    print(render_compare(first, second, names, changed_only=args.changed_only))
    if args.markdown:
        args.markdown.write_text(compare_markdown(first, second, names), encoding="utf-8")
    return EXIT_OK


ANALYZE_EXAMPLES = """examples:
  curvscope analyze model.pt2 --data batch.safetensors          # the largest Hessian eigenvalue
  curvscope analyze model.pt2 --data batch.safetensors --eigen 5 --smallest 2 --trace --density \\
      --per-layer --json report.json --plot spectrum.svg
  curvscope analyze model.pt2 --data batch.safetensors --sharpness --non-uniformity --lr 0.1 --batch-size 32
  curvscope analyze model.safetensors --lipschitz --weight-spectra --local   # data-free, in this process
  curvscope analyze model.pt2 --data batch.safetensors --curvature ggn --trace --trace-method xtrace \\
      --frobenius --set non_uniformity.method=gauss_newton
  curvscope analyze model.pt2 --data batch.safetensors --server curvscope.example.org:443 --tls \\
      --token-file token.txt --timeout 600
"""
GATE_EXAMPLES = """examples:
  curvscope gate --init                                 # write a commented starter curvscope.toml
  curvscope gate model.pt2 --data batch.safetensors --policy curvscope.toml
  curvscope gate model.pt2 --data batch.safetensors --policy curvscope.toml --baseline main.json \\
      --junit gate.xml --markdown gate.md --json gate.json --html gate.html
  curvscope gate --policy curvscope.toml --report report.json   # judge a report made before
"""
REPORT_EXAMPLES = """examples:
  curvscope report report.json                          # the report's table
  curvscope report gate.json --html gate.html --title "nightly gate"
"""
COMPARE_EXAMPLES = """examples:
  curvscope compare main.json branch.json --changed-only
  curvscope compare main.json branch.json --markdown comparison.md
"""
DEMO_EXAMPLES = """examples:
  curvscope demo                                        # a report in about a minute, no files needed
  curvscope demo --whole-model-only --json demo.json
  curvscope demo --transformer                          # a tiny GPT-2 as a Hugging Face folder (needs transformers)
"""
MAIN_EXAMPLES = """examples:
  curvscope demo                                        # try it: no files, no server
  curvscope serve --port 50051 --store /var/lib/curvscope
  curvscope analyze model.pt2 --data batch.safetensors --server localhost:50051 --eigen 5 --trace
  curvscope analyze model.pt2 --data batch.safetensors --local   # no server, the same engine
  curvscope gate model.pt2 --data batch.safetensors --policy curvscope.toml

Every command has its --help. The server's address: --server HOST:PORT, else CURVSCOPE_SERVER,
else localhost:50051. Exit codes: 0 ok, 1 a gate failed, 2 usage or input error, 3 the server
could not be reached or failed.
"""


def _command(commands: Any, name: str, help: str, examples: str,
             description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose help ends with ``examples`` and shows every flag's default."""
    return commands.add_parser(name, help=help, description=description or help[0].upper() + help[1:] + ".",
                               epilog=examples, formatter_class=_HelpFormatter)


def _add_gate_parser(commands: Any) -> None:
    gate = _command(
        commands, "gate", "check a checkpoint against a policy (exit 1 when a check fails)", GATE_EXAMPLES,
        description="Run a policy's analyses on MODEL (or read --report) and judge its checks. Exit codes: 0 every "
                    "check passed (warnings allowed), 1 a check failed or a value could not be measured, 2 usage "
                    "or input error, 3 the server could not be reached or failed.")
    inputs = gate.add_argument_group("policy and input")
    inputs.add_argument("model", nargs="?", help="a local .pt2/.safetensors file or Hugging Face checkpoint folder, "
                                                 "a file:// URI on the server, or sha256:DIGEST")
    inputs.add_argument("--policy", type=Path, help="the TOML policy (with --init: where to write the starter policy, "
                                                    "default curvscope.toml)")
    inputs.add_argument("--init", action="store_true", help="write a commented starter policy and stop")
    inputs.add_argument("--force", action="store_true", help="with --init: overwrite an existing policy")
    inputs.add_argument("--data", help="data batch: a .safetensors file with inputs and targets (or file://, sha256:)")
    inputs.add_argument("--report", type=Path, help="gate this existing JSON report instead of analysing MODEL")
    inputs.add_argument("--baseline", type=Path, help="report (or gate --json output) to measure changes against")
    inputs.add_argument("--memory-budget", type=_byte_count, default=os.environ.get("CURVSCOPE_MEMORY_BUDGET", "0"),
                        metavar="BYTES", help="plan the analyses within this much memory, e.g. 8GB (overrides the "
                                              "policy's [request] memory_budget; default $CURVSCOPE_MEMORY_BUDGET)")
    _add_connection_flags(gate, "each request's deadline: the server gives up past it (default: the policy's "
                                "timeout, else none)")
    output = gate.add_argument_group("output (the verdicts' table goes to stdout)")
    output.add_argument("--junit", type=Path, metavar="OUT.xml", help="write JUnit XML (a testcase per checked value)")
    output.add_argument("--markdown", type=Path, metavar="OUT.md", help="write a Markdown summary (also appended to $GITHUB_STEP_SUMMARY)")
    output.add_argument("--json", type=Path, metavar="OUT.json", help="write the verdicts and the report (usable as a later --baseline)")
    output.add_argument("--html", type=Path, metavar="OUT.html", help="write the verdicts, plots and values as one HTML page")
    gate.set_defaults(run=cmd_gate)
    report = _command(commands, "report", "show a JSON report; --html writes a page with its plots", REPORT_EXAMPLES)
    report.add_argument("report", type=Path, help="a report (analyze --json) or a gate --json output")
    output = report.add_argument_group("output")
    output.add_argument("--html", type=Path, metavar="OUT.html", help="write one self-contained HTML page")
    output.add_argument("--title", help="title of the page (default: 'curvscope report: ' and the file's name)")
    report.set_defaults(run=cmd_report)
    compare = _command(commands, "compare", "two reports side by side, with the change of every value",
                       COMPARE_EXAMPLES)
    compare.add_argument("a", type=Path, help="the first report (e.g. main's)")
    compare.add_argument("b", type=Path, help="the second report (e.g. the candidate's)")
    output = compare.add_argument_group("output")
    output.add_argument("--changed-only", action="store_true", help="only the values that differ")
    output.add_argument("--markdown", type=Path, metavar="OUT.md", help="also write the comparison as Markdown")
    compare.set_defaults(run=cmd_compare)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="curvscope", description="Curvature analysis of model checkpoints.", epilog=MAIN_EXAMPLES,
                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action=_Version, help="print the versions of the client and the service, and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("serve", help="run the gRPC server (its flags: curvscope serve --help)", add_help=False)
    analyze = _command(commands, "analyze", "analyse a checkpoint on a data batch", ANALYZE_EXAMPLES)
    _add_analysis_flags(analyze)
    analyze.set_defaults(run=cmd_analyze)
    _add_gate_parser(commands)
    demo = _command(commands, "demo", "a small model on scikit-learn's digits, an in-process server, a report",
                    DEMO_EXAMPLES)
    demo.add_argument("--whole-model-only", action="store_true", help="skip the per-layer eigenvalues")
    demo.add_argument("--transformer", action="store_true",
                      help="instead: a tiny GPT-2 trained in seconds on generated sentences, sent as a Hugging Face "
                           "checkpoint folder and analysed as a causal language model (needs curvscope-service[hf])")
    output = demo.add_argument_group("output")
    output.add_argument("--json", type=Path, metavar="OUT", help="write the JSON report here ('-' for stdout)")
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["serve"]:
            # The server parses its own flags (they have CURVSCOPE_* environment defaults).
            _service_module("server").main(argv[1:])
            return EXIT_OK
        parser = build_parser()
        if not argv:
            parser.print_help()
            return EXIT_INPUT
        try:
            args = parser.parse_args(argv)
        except SystemExit as done:  # --help, --version, or a usage error (already printed)
            return EXIT_OK if done.code is None else int(done.code)
        return args.run(args)
    except CurvscopeError as error:
        print(f"curvscope: {error.code}: {_one_line(error.message)}", file=sys.stderr)
        return EXIT_INPUT if error.code in INPUT_CODES else EXIT_SERVER
    except KeyboardInterrupt:
        print("curvscope: interrupted", file=sys.stderr)
        return EXIT_SERVER
    except Exception as error:  # noqa: BLE001 - a bug (here or in --local's engine), not bad input
        if argv[:1] == ["serve"]:
            raise  # the server's own crash: its log wants the traceback
        # One line, never a traceback; 3 like a failed server (1 would read as a failed gate).
        print(f"curvscope: internal error: {type(error).__name__}: {_one_line(str(error))} "
              "(a bug; please report it with the command that ran)", file=sys.stderr)
        return EXIT_SERVER


def _one_line(text: str, limit: int = 300) -> str:
    """The first line of ``text``, cut to ``limit`` characters: messages stay one line."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[:limit] + "..."


if __name__ == "__main__":
    sys.exit(main())
