"""The `soft-jax` parser (soft_jax.cli.parser): every command is there with its help, each maps onto its function in
soft_jax.cli.commands, and a bad argument is one line, exit 2."""

import pytest

from soft_jax.cli import commands, main
from soft_jax.cli.parser import build_parser

COMMANDS = ["info", "generate", "eval", "train", "run", "sweep", "plan", "report", "compare", "export", "data"]


def test_every_command_has_its_function_and_help(capsys):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(COMMANDS + ["lm-eval"])
    for name, p in sub.choices.items():
        fn = p.get_default("fn")
        if name == "data":  # data import | check | tasks
            continue
        assert fn is getattr(commands, fn.__name__) and p.format_help().startswith("usage: soft-jax " + name)


@pytest.mark.parametrize("argv,needle", [
    (["eval"], "the following arguments are required: --model"),
    (["nope"], "invalid choice: 'nope'"),
    (["info", "--model", "m", "--extra"], "unrecognized arguments: --extra"),
])
def test_a_bad_command_line_is_one_line_and_exit_2(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("soft-jax: error: ") and needle in err
