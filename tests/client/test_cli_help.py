"""The command line explains itself: bare ``curvscope`` prints the help, ``--version``, every
command's ``--help`` with examples that parse, flags grouped, defaults shown, one-line usage
errors."""

from __future__ import annotations

import argparse
import re
import shlex
from importlib.metadata import version

import pytest

import curvscope
from curvscope.cli import _HelpFormatter, build_parser, main
from curvscope.client import LOSSES

COMMANDS = ("analyze", "gate", "report", "compare", "demo")


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def flag_groups(command: str) -> dict[str, set[str]]:
    """The flags of each of a command's argument groups, by the group's title."""
    return {group.title: {flag for action in group._group_actions for flag in action.option_strings}
            for group in subparsers()[command]._action_groups}


def examples(text: str) -> list[list[str]]:
    """The example command lines of a help text (continuation lines joined, comments dropped)."""
    block = text.split("examples:\n", 1)[1].split("\n\n", 1)[0].replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def test_bare_curvscope_prints_the_help(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: curvscope")
    for command in ("serve", *COMMANDS):
        assert re.search(rf"^\s+{command}\s", out, re.M), command
    assert "examples:" in out and "CURVSCOPE_SERVER" in out


def test_version_names_the_client_and_the_service(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == (f"curvscope {curvscope.__version__} "
                                       f"(curvscope-service {version('curvscope-service')})\n")
    assert curvscope.__version__ == version("curvscope")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples_that_parse(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: curvscope {command}")
    lines = examples(out)
    assert lines and all(line[:2] == ["curvscope", command] for line in lines), lines
    for line in lines:
        build_parser().parse_args(line[1:])  # a usage error would exit


def test_the_main_helps_examples_parse(capsys):
    main([])
    for line in examples(capsys.readouterr().out):
        if line[1] != "serve":  # the server parses its own flags
            build_parser().parse_args(line[1:])


def test_analyze_flags_are_grouped():
    groups = flag_groups("analyze")
    assert {"--data", "--loss"} <= groups["input"]
    analyses = next(flags for title, flags in groups.items() if title.startswith("analyses"))
    assert {"--eigen", "--trace", "--density", "--lipschitz", "--weight-spectra", "--set"} <= analyses
    assert {"--curvature", "--tolerance", "--seed", "--precision", "--max-samples"} <= groups["numerics"]
    assert {"--server", "--local", "--tls"} <= groups["server connection"]
    assert groups["timeouts"] == {"--timeout", "--connect-timeout"}
    output = next(flags for title, flags in groups.items() if title.startswith("output"))
    assert output == {"--json", "--plot"}


def test_gate_flags_are_grouped():
    groups = flag_groups("gate")
    assert {"--policy", "--data", "--baseline"} <= groups["policy and input"]
    assert groups["timeouts"] == {"--timeout", "--connect-timeout"}
    output = next(flags for title, flags in groups.items() if title.startswith("output"))
    assert output == {"--junit", "--markdown", "--json", "--html"}


def test_loss_has_its_choices_the_servers_losses(capsys):
    from curvscope_service.losses import LOSSES as SERVICE_LOSSES

    assert set(LOSSES) == set(SERVICE_LOSSES)
    main(["analyze", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--loss {cross_entropy,mse} the loss, a mean over the samples (default: cross_entropy)" in help_text


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_with_a_default_shows_it(command):
    formatter = _HelpFormatter(f"curvscope {command}")
    for action in subparsers()[command]._actions:
        unset = action.default in (None, [], argparse.SUPPRESS) or action.default is False
        if action.option_strings and not unset:
            assert "default" in formatter._get_help_string(action), action.option_strings


def test_defaults_in_the_help(capsys):
    main(["analyze", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for shown in ("--seed SEED seed of every random choice (default: 0)",
                  "--precision {float32,float64} floating-point type of the computation (default: float32)",
                  "(default: 10.0)", "(default: CURVSCOPE_SERVER, else localhost:50051)"):
        assert shown in help_text, shown


def test_usage_errors_are_one_line(capsys):
    assert main(["analyze", "model.pt2", "--loss", "hinge"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("curvscope analyze: INVALID_ARGUMENT: argument --loss: invalid choice: 'hinge'")
    assert err.rstrip().endswith("see curvscope analyze --help")
    assert main(["frobnicate"]) == 2
    assert "curvscope: INVALID_ARGUMENT: argument COMMAND: invalid choice: 'frobnicate'" in capsys.readouterr().err
