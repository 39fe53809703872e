"""Fast answers to mistakes (issue 10, item 8): a config error, the method list and the help
are produced without loading torch (~2 s here) or the transformers/peft stack (~15 s): the method
modules import torch lazily (``fedlora.lazy``). Only a device the machine lacks needs torch, to
ask the machine. Timings are in docs/benchmarks.md, not asserted here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import TINY

PROBE = """
import json, sys
from typer.testing import CliRunner
from fedlora.cli import app
result = CliRunner().invoke(app, sys.argv[1:])
# torch is registered lazily at import; "torch._C" appears once it has really loaded.
stack = ("torch._C", "transformers", "peft", "datasets", "bitsandbytes")
heavy = [m.removesuffix("._C") for m in stack if m in sys.modules]
print(json.dumps({"code": result.exit_code, "output": result.output, "heavy": heavy}))
"""


def probe(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


FEDIT = str(TINY / "fedit.toml")


def test_a_schema_error_imports_neither_torch_nor_the_stack() -> None:
    answer = probe("run", FEDIT, "--set", "lora.rank=0")
    assert answer["code"] == 2 and "lora.rank" in answer["output"]
    assert answer["heavy"] == []


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["run", FEDIT, "--set", "method.name=nope"], "method.name 'nope' is not a method"),
        (["run", FEDIT, "--set", "method.unknown_option=1"], "method.unknown_option"),
        (
            ["run", FEDIT, "--set", "federation.aggregator='median'", "--set", "method.name=flora"],
            "federation.aggregator 'median'",
        ),
        (["run", FEDIT, "--set", "ranks.profile='uniform'"], "ranks.profile 'uniform'"),
        (["methods"], "fedit"),
        (["--help"], "run"),
    ],
)
def test_method_answers_load_no_torch(args: list[str], fragment: str) -> None:
    answer = probe(*args)
    assert fragment in " ".join(answer["output"].split())
    assert answer["heavy"] == [], answer["heavy"]


def test_a_missing_device_needs_only_torch() -> None:
    answer = probe("run", FEDIT, "--set", "compute.device='cuda'")
    assert answer["code"] == 2 and "compute.device 'cuda'" in answer["output"]
    assert answer["heavy"] == ["torch"]
