"""``[compute]``: device and dtype resolution, the CPU path unchanged bit for bit, mixed
precision with float32 master copies and float32 wire bytes, gradient checkpointing, and any
Hugging Face architecture by name. Everything runs on this CPU (CI has no GPU)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlora.channel import Channel, decode, encode
from fedlora.compute import Compute, available_devices, on_cpu, resolve
from fedlora.config import ComputeConfig, ConfigError, load_config
from fedlora.experiment import build
from fedlora.models import publish_once
from tests.conftest import TINY, read_metrics, run_cli, trained

FEDIT = str(TINY / "fedit.toml")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """compute.threads = 1 sets torch's threads for the process: give them back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def ledger_bytes(run: Path) -> list[int]:
    return [json.loads(line)["bytes"] for line in (run / "ledger.jsonl").read_text().splitlines()]


# -- device resolution ------------------------------------------------------------------------
def test_auto_resolves_to_the_cpu_here_in_float32() -> None:
    assert available_devices() == ["cpu"]  # this machine and CI: no accelerator
    compute = resolve(ComputeConfig())
    assert compute.device == torch.device("cpu") and compute.dtype == torch.float32
    assert compute.edge_device == torch.device("cpu") and not compute.mixed


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps"])
def test_a_device_the_machine_lacks_is_one_clear_error(device: str, tmp_path: Path) -> None:
    code, output = run_cli(
        "run", FEDIT, "--out", str(tmp_path), "--quiet", "--set", f"compute.device='{device}'"
    )
    assert code == 2, output
    text = " ".join(output.split())
    assert f"compute.device '{device}': this machine has no such device; available: cpu" in text
    assert "Traceback" not in output


def test_a_malformed_device_name_is_refused_with_the_allowed_forms(tmp_path: Path) -> None:
    code, output = run_cli(
        "run", FEDIT, "--out", str(tmp_path), "--quiet", "--set", "compute.edge_device='gpu0'"
    )
    assert code == 2
    assert (
        "compute.edge_device: 'gpu0' is not a device; expected auto, cpu, cuda, cuda:N or mps"
        in (" ".join(output.split()))
    )


# -- the CPU path is today's -----------------------------------------------------------------
# configs/tiny/fedit.toml on one CPU thread, computed with the code before [compute] existed
# (commit 9caf85f, on an earlier session's machine): per round (train loss, accuracy, macro-F1,
# test loss, cumulative bytes). The bytes and the accuracies must match exactly; the losses to
# 1e-6 relative, not bit for bit: another CPU's kernels move the last bits (this machine gives
# 1.6035038133 for round 1's train loss with that very commit), and so does the server's float64
# running sum (issue 16, streaming aggregation), a deliberate change of rounding.
PINNED_ROUNDS = [
    (1.603503833214442, 0.23333333333333334, 0.07567567567567568, 1.6077539920806885, 68704),
    (1.6032471358776093, 0.23333333333333334, 0.07567567567567568, 1.6085617542266846, 137408),
]


def test_cpu_run_matches_the_run_from_before_compute_existed(
    tmp_path: Path, one_thread: None
) -> None:
    code, output = run_cli(
        "run",
        FEDIT,
        "--out",
        str(tmp_path),
        "--quiet",
        "--set",
        "compute.device='cpu'",
        "--set",
        "compute.threads=1",
    )
    assert code == 0, output
    assert "on cpu, float32, 1 CPU thread ->" in output.splitlines()[0]  # where it runs, first
    rows = [
        (m["train_loss"], m["accuracy"], m["macro_f1"], m["test_loss"], m["cumulative_bytes"])
        for m in trained(read_metrics(tmp_path))
    ]
    assert len(rows) == len(PINNED_ROUNDS)
    for got, pinned in zip(rows, PINNED_ROUNDS, strict=True):
        assert got[1:3] == pinned[1:3] and got[4] == pinned[4]
        assert got[0] == pytest.approx(pinned[0], rel=1e-6)
        assert got[3] == pytest.approx(pinned[3], rel=1e-6)
    assert sum(ledger_bytes(tmp_path)) == PINNED_ROUNDS[-1][-1]


# -- mixed precision ---------------------------------------------------------------------------
def test_bfloat16_compute_keeps_float32_masters_and_wire_bytes(
    fedit_run: Path, tmp_path: Path
) -> None:
    code, output = run_cli(
        "run", FEDIT, "--out", str(tmp_path), "--quiet", "--set", "compute.dtype='bfloat16'"
    )
    assert code == 0, output
    assert "bfloat16" in output.splitlines()[0]
    checkpoint = load_file(tmp_path / "checkpoint.safetensors")
    trained = {k: v for k, v in checkpoint.items() if ".lora_" in k or "classifier" in k}
    assert trained and all(v.dtype == torch.float32 for v in trained.values())
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(v.dtype == torch.float32 for v in adapter.values())
    # Same messages, same sizes: the wire carries float32 whatever the compute dtype.
    assert ledger_bytes(tmp_path) == ledger_bytes(fedit_run)
    # bfloat16 keeps 8 bits of mantissa: the first round's loss moves by well under 1%.
    first, reference = read_metrics(tmp_path)[1], read_metrics(fedit_run)[1]  # round 1
    assert abs(first["train_loss"] - reference["train_loss"]) < 0.01 * reference["train_loss"]
    assert first["train_loss"] != reference["train_loss"]  # bfloat16 really computed


def test_optimizer_state_stays_float32_under_bfloat16_compute() -> None:
    config = load_config(
        TINY / "fedit.toml",
        ["compute.dtype='bfloat16'", "train.keep_optimizer_state=true", "experiment.rounds=1"],
    )
    experiment = build(config)
    assert experiment.compute.dtype == torch.bfloat16
    trainer = experiment.trainer
    result = trainer.train(
        experiment.method.context.initial, experiment.clients[0], 0, 0, lambda _: True
    )
    assert result.optimizer_state and all(
        v.dtype == torch.float32 for k, v in result.optimizer_state.items() if "exp_avg" in k
    )
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in result.state.values())


def test_the_channel_sends_float32_cpu_tensors_whatever_a_party_computed_in() -> None:
    generator = torch.Generator().manual_seed(0)
    exact = torch.randn(5, 7, generator=generator)
    half = {"x": exact.to(torch.bfloat16), "y": exact.to(torch.float16)}
    received = decode(encode(half))
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in received.values())
    assert torch.equal(received["x"], half["x"].float())  # exact upcast, no rounding
    assert torch.equal(received["y"], half["y"].float())
    assert len(encode(half)) == len(encode({"x": exact, "y": exact.clone()}))
    channel = Channel()
    channel.send(half, "client0", "server", 0)
    assert channel.ledger.records[0].bytes == len(encode({"x": exact, "y": exact.clone()}))


def half_stored_split(dtype: torch.dtype) -> tuple[float, list, dict[str, torch.Tensor]]:
    """One DLoRA split step of tiny-bert whose cloud base is *stored* in ``dtype`` (as on an
    accelerator) and computes under autocast; returns the loss, the step's traffic log and the
    edge's gradients."""
    from fedlora.adapters import AdapterSlots
    from fedlora.config import LoraConfig
    from fedlora.dlora.split import CloudEdgeLink, CloudModel, split_step
    from fedlora.models import load_base_model, load_tokenizer, model_spec

    tokenizer = load_tokenizer("tiny-bert")
    spec = model_spec("tiny-bert")
    base = load_base_model("tiny-bert", 3, tokenizer, seed=0)
    slots = AdapterSlots(base, spec, LoraConfig(rank=4, alpha=8), init_seed=1)
    state = {
        k: (0.1 * torch.ones_like(v) if ".lora_B." in k else v) for k, v in slots.read().items()
    }
    compute = Compute(torch.device("cpu"), dtype, torch.device("cpu"))
    if dtype != torch.float32:
        base.to(dtype)  # the frozen base in half precision; the edge keeps float32 copies
    cloud = CloudModel(
        slots.model.get_base_model(), spec, slots.modules, slots.model.disable_adapter, compute
    )
    edge = cloud.edge(state)
    assert all(p.dtype == torch.float32 for p in edge.params.values())
    assert edge.embeddings.weight.dtype == torch.float32
    link = CloudEdgeLink("client0", edge, Channel())
    ids = torch.randint(5, 100, (2, 8), generator=torch.Generator().manual_seed(3))
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.tensor([0, 2]),
    }
    slots.model.eval()
    loss = split_step(cloud, link, batch)
    grads = {k: p.grad.clone() for k, p in edge.params.items() if p.grad is not None}
    return loss, link.log, grads


def test_dlora_split_traffic_is_unchanged_by_a_half_precision_cloud() -> None:
    loss32, log32, grads32 = half_stored_split(torch.float32)
    loss16, log16, grads16 = half_stored_split(torch.bfloat16)
    assert [(t.kind, t.module, t.direction, t.values, t.bytes) for t in log16] == [
        (t.kind, t.module, t.direction, t.values, t.bytes) for t in log32
    ]
    assert abs(loss16 - loss32) < 0.02 * abs(loss32)
    assert grads16.keys() == grads32.keys() and grads32
    for name, grad in grads32.items():
        assert grads16[name].dtype == torch.float32
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), grads16[name].flatten(), 0)
        assert cosine > 0.95, name


# -- gradient checkpointing --------------------------------------------------------------------
@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama"])
def test_gradient_checkpointing_gives_the_same_gradients(model: str) -> None:
    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        overrides = [f"compute.gradient_checkpointing={str(checkpointing).lower()}"]
        if model == "tiny-llama":
            overrides.append("model.name='tiny-llama'")
            config = load_config(TINY / "causal" / "fedit.toml", overrides)
        else:
            config = load_config(TINY / "fedit.toml", overrides)
        experiment = build(config)
        base = experiment.slots.model.get_base_model()
        assert base.is_activation_checkpointing == checkpointing
        slots = experiment.slots
        generator = torch.Generator().manual_seed(5)
        slots.load(
            {
                k: (0.05 * torch.randn(v.shape, generator=generator) if ".lora_B." in k else v)
                for k, v in slots.read().items()
            }
        )
        params = slots.parameters(lambda _: True)
        slots.model.train()  # dropout on: the recomputation must replay its masks
        torch.manual_seed(11)
        loss = slots.model(**experiment.train_set.batch([0, 1, 2, 3])).loss
        loss.backward()
        return {name: p.grad.clone() for name, p in params}

    plain, recomputed = gradients(False), gradients(True)
    assert plain.keys() == recomputed.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-7)
        assert plain[name].abs().sum() > 0, name


# -- models by name ----------------------------------------------------------------------------
def test_an_unknown_hub_id_offline_names_the_cache_and_offline_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, output = run_cli(
        "run", FEDIT, "--out", str(tmp_path), "--set", "model.name='nobody/no-such-model-xyz'"
    )
    assert code == 2
    text = " ".join(output.split())
    assert "not in the local Hugging Face cache, and offline mode is on (HF_HUB_OFFLINE=1)" in text
    assert "Traceback" not in output


def save_config(directory: Path, config: object) -> Path:
    config.save_pretrained(directory)  # type: ignore[attr-defined]
    return directory


def test_known_architectures_get_their_default_targets(tmp_path: Path) -> None:
    from transformers import PhiConfig, Qwen2Config, RobertaConfig

    from fedlora.models import model_spec

    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    qwen = save_config(tmp_path / "qwen", Qwen2Config(**small, architectures=["Qwen2ForCausalLM"]))
    spec = model_spec(str(qwen))
    assert spec.task == "causal" and spec.default_targets == (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    )
    roberta = save_config(
        tmp_path / "roberta",
        RobertaConfig(**small, architectures=["RobertaForSequenceClassification"]),
    )
    spec = model_spec(str(roberta))
    assert spec.task == "classification" and spec.head == "classifier"
    assert spec.default_targets == ("query", "key", "value")
    phi = save_config(tmp_path / "phi", PhiConfig(**small, architectures=["PhiForCausalLM"]))
    assert model_spec(str(phi)).default_targets == ()  # phi (v1/v2) is not in the table


def test_an_unknown_architecture_lists_its_linear_modules(tmp_path: Path) -> None:
    from transformers import OPTConfig

    from fedlora.experiment import validate

    opt = save_config(
        tmp_path / "opt",
        OPTConfig(
            hidden_size=16,
            ffn_dim=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=50,
            word_embed_proj_dim=16,
            architectures=["OPTForCausalLM"],
        ),
    )
    config = load_config(TINY / "fedit.toml", [f"model.name='{opt}'"])
    with pytest.raises(ConfigError) as error:
        validate(config)
    message = str(error.value)
    assert "no default LoRA targets for architecture 'opt'" in message
    assert "lora.target_modules" in message
    for name in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"):
        assert name in message
    chosen = load_config(
        TINY / "fedit.toml", [f"model.name='{opt}'", "lora.target_modules=['q_proj', 'v_proj']"]
    )
    assert validate(chosen) == on_cpu()


def test_the_gpu_check_comparison_flags_what_disagrees(fedit_run: Path, tmp_path: Path) -> None:
    """benchmarks/compare_runs.py, which gpu_check.sh uses to hold CUDA float32 to the CPU."""
    import shutil

    from benchmarks.compare_runs import differences

    assert differences(fedit_run, fedit_run, 1e-3, 0.02) == []
    other = tmp_path / "other"
    shutil.copytree(fedit_run, other)
    rows = read_metrics(other)
    rows[2]["train_loss"] *= 1.01  # rows[0] is round 0, the initial model
    rows[1]["accuracy"] += 0.05
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = differences(other, fedit_run, 1e-3, 0.02)
    assert len(found) == 2
    assert found[0].startswith("round 1 accuracy") and found[1].startswith("round 2 train_loss")


def test_a_converted_model_is_published_once_whoever_converts_it(tmp_path: Path) -> None:
    """Two runs started together both convert SmolLM2 (a study's parallel jobs): the first
    rename puts its directory in place; the second finds it there, keeps it and deletes its
    own copy instead of failing (the rename of a directory onto a full one)."""
    target = tmp_path / "model"

    def save(content: str):
        def write(directory: Path) -> None:
            directory.mkdir()
            (directory / "config.json").write_text(content)

        return write

    assert publish_once(target, save("first")) == target
    assert publish_once(target, save("second")) == target
    assert (target / "config.json").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no partial copy left


# -- torch.compile -----------------------------------------------------------------------------
# Stated tolerance (docs/gpus.md, docs/benchmarks.md): a compiled run draws the eager run's dropout
# masks and differs only by float reassociation, within 1e-5 of every loss and adapter entry.
COMPILE_TOLERANCE = 1e-5


def test_a_compiled_run_matches_the_eager_one_within_the_stated_tolerance(
    tmp_path: Path, one_thread: None
) -> None:
    from torch._dynamo.utils import counters

    common = ["--quiet", "--set", "compute.threads=1"]
    code, output = run_cli("run", FEDIT, "--out", str(tmp_path / "eager"), *common)
    assert code == 0, output
    counters.clear()
    compiled = ["--set", "compute.compile=true"]
    code, output = run_cli("run", FEDIT, "--out", str(tmp_path / "compiled"), *common, *compiled)
    assert code == 0, output
    assert ", compiled ->" in output.splitlines()[0]
    assert counters["stats"]["unique_graphs"] >= 2  # dynamo did compile: train and eval graphs

    eager, compiled_metrics = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled")
    assert len(eager) == len(compiled_metrics) == 3  # round 0 and two trained rounds
    for plain, fast in zip(eager, compiled_metrics, strict=True):
        assert (plain["accuracy"], plain["macro_f1"]) == (fast["accuracy"], fast["macro_f1"])
        assert fast["test_loss"] == pytest.approx(plain["test_loss"], abs=COMPILE_TOLERANCE)
        if "train_loss" in plain:
            assert fast["train_loss"] == pytest.approx(plain["train_loss"], abs=COMPILE_TOLERANCE)
    adapter = "adapter/adapter_model.safetensors"
    plain_tensors = load_file(tmp_path / "eager" / adapter)
    fast_tensors = load_file(tmp_path / "compiled" / adapter)
    assert plain_tensors.keys() == fast_tensors.keys()
    for name, tensor in plain_tensors.items():
        torch.testing.assert_close(fast_tensors[name], tensor, atol=COMPILE_TOLERANCE, rtol=0)
    assert sum(ledger_bytes(tmp_path / "eager")) == sum(ledger_bytes(tmp_path / "compiled"))
