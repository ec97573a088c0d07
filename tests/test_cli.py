"""The `d2dmoe` command's help: every command answers --help with exit 0, and the keys the convert
help names are keys of the composed config."""
import re

import pytest
from omegaconf import OmegaConf

from d2dmoe import cli
from tests.conftest import compose_config


@pytest.mark.parametrize("argv, says", [(["--help"], "commands:"), (["-h"], "commands:"),
                                        (["info", "--help"], "usage: d2dmoe info DIR"),
                                        (["convert", "--help"], "usage: d2dmoe convert"),
                                        (["convert", "budget=0.3", "-h"], "usage: d2dmoe convert")])
def test_every_command_answers_help_and_exits_0(argv, says, capsys):
    assert cli.main(argv) == 0
    assert says in capsys.readouterr().out


def test_a_missing_or_unknown_command_says_what_there_is(capsys):
    assert cli.main([]) == 2 and "commands:" in capsys.readouterr().err
    assert cli.main(["conver"]) == 2 and "unknown command 'conver'" in capsys.readouterr().err
    assert cli.main(["info"]) == 2 and "usage: d2dmoe info DIR" in capsys.readouterr().err


def test_the_keys_the_convert_help_names_are_config_keys():
    keys = re.findall(r"^  ([a-z_.]+)=", cli.CONVERT_HELP, re.M)
    assert {"budget", "out", "per_layer", "model.path", "data", "data.path"} <= set(keys)
    cfg = compose_config(["model=auto", "model.path=/some/model"])
    for key in keys:
        full = cli.SHORT_KEYS.get(key, key)
        if key != "data":  # a config group: its options are the data configs
            assert OmegaConf.select(cfg, full, default="missing") != "missing", full
    for name in re.search(r"data=NAME .*?: (.*?), \.\.\.", cli.CONVERT_HELP).group(1).replace(" (default)", "").split(", "):
        assert compose_config([f"data={name}"]).data.name == name
