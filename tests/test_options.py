"""pretrain's options come from one table (minitrain/options.py): the command line, TrainConfig
(and so run.json), and the checks a configuration from a file or a checkpoint passes agree."""

from dataclasses import fields

import pytest
from click.testing import CliRunner

from minitrain.cli import cli
from minitrain.errors import InputError
from minitrain.options import OPTIONS, TrainConfig


def test_every_option_is_a_field_and_a_flag_in_the_tables_order():
    assert [f.name for f in fields(TrainConfig)] == [o.name for o in OPTIONS]
    params = [p for p in cli.commands["pretrain"].params if p.name not in ("config_path", "as_json")]
    assert [p.name for p in params] == [o.name for o in OPTIONS]
    assert all(p.opts[0] == o.flag and p.default == o.default for p, o in zip(params, OPTIONS))


def out_of_bounds(o):
    """Values the option must refuse: not a choice, just past each bound."""
    if o.choices:
        yield "nope"
    if o.low is not None:
        yield o.low if o.low_open else o.low - 1
    if o.high is not None:
        yield o.high if o.high_open else o.high + 1


BAD = [(o, value) for o in OPTIONS for value in out_of_bounds(o)]


@pytest.mark.parametrize("option,value", BAD, ids=[f"{o.name}={v}" for o, v in BAD])
def test_the_command_line_and_a_configuration_refuse_the_same_values(option, value):
    """A value past a bound or outside the choices: click refuses it on the command line (exit 2),
    and a TrainConfig holding it (from --config's run.json, a checkpoint's state.json) is refused by
    resolved() naming the option."""
    result = CliRunner().invoke(cli, ["pretrain", option.flag, str(value)])
    assert result.exit_code == 2, result.output
    with pytest.raises(InputError, match=option.flag):
        TrainConfig(data="d", out="o", arch="tiny-llama", **{option.name: value}).resolved()


def test_the_defaults_pass_and_a_wrong_type_is_refused():
    TrainConfig(data="d", out="o", arch="tiny-llama").resolved()
    for name, value, expected in (("seq_len", "256", "an integer"), ("lr", True, "a number"),
                                  ("decay_1d", 1, "true or false"), ("data_order", 3, "a string")):
        with pytest.raises(InputError, match=f"--{name.replace('_', '-')} .*: expected {expected}"):
            TrainConfig(data="d", out="o", arch="tiny-llama", **{name: value}).resolved()


def test_the_bounds_cover_every_ranged_option():
    """The test above is not vacuous: it covers the choices and both kinds of bound."""
    assert len(BAD) >= 20
    assert {o.name for o, _ in BAD} >= {"seq_len", "recompute", "dtype", "zero", "lora_dropout", "dist_timeout"}
