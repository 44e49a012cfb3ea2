"""`--help` explains: every flag of run, eval, sweep and reproduce says what it does (setting
flags take their text from the settings dataclasses' field metadata, which no run id reads), and
the main commands end with examples that parse."""

import argparse
import shlex

import pytest

from hydrabench.cli import HYPERPARAMETERS, build_parser

COMMANDS = ("run", "eval", "sweep", "reproduce")


def subparser(name: str) -> argparse.ArgumentParser:
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices[name]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_help(command: str) -> None:
    missing = [a.dest for a in subparser(command)._actions
               if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not missing, f"{command}: flags without help: {missing}"


def test_setting_flags_take_their_help_from_the_settings_dataclasses() -> None:
    from hydrabench.config.spec import AdapterSettings, TrainSettings, setting_help

    helps = {a.dest: a.help for a in subparser("run")._actions}
    assert set(HYPERPARAMETERS) <= set(helps)
    assert helps["rank"].startswith(setting_help(AdapterSettings, "rank"))
    assert helps["lr"].startswith(setting_help(TrainSettings, "lr")) and "AdamW" in helps["lr"]


@pytest.mark.parametrize("command", COMMANDS)
def test_examples_in_the_epilog_parse(command: str) -> None:
    epilog = subparser(command).epilog or ""
    examples = [line.strip() for line in epilog.splitlines()
                if line.strip().startswith("hydrabench ")]
    assert examples, f"{command} --help shows no example"
    for line in examples:
        args = build_parser().parse_args(shlex.split(line)[1:])
        assert args.command == command
