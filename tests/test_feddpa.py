"""Issue 31's FedDPA: a global adapter averaged as FedIT's, a local one that never leaves the
client, the two mixed per test example.

The mixing is checked against independent computations: a LoRA layer's output and input
gradient against numpy (float64), a mixed model's metrics against each test example run alone
under its own merged weights W0 + s(w·B_l A_l + (1−w)·B_g A_g) (classification, and multiple
choice with its cached continuations), and the instance weights against cosines computed in numpy
from the hidden states of the exported local adapter loaded by PEFT and merged. Then the method:
its global adapter follows FedIT's trajectory bit for bit (the local phase never touches it), the
local adapter trains against the global output and never crosses the wire, both adapters export
as standard PEFT adapters, and a resumed run ends where the straight one does.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from fedlora.checkpoint import load_checkpoint
from fedlora.config import load_config
from fedlora.engines.client import ClientRuntime
from fedlora.experiment import Experiment, build
from fedlora.methods.base import stored
from fedlora.methods.feddpa import GLOBAL, LOCAL
from fedlora.mixing import (
    STREAM,
    Branch,
    Mixture,
    PerRow,
    RowWeights,
    branches,
    draw_references,
    instance_weights,
    lora_only,
    mixture_metrics,
    query_ids,
    silenced,
)
from fedlora.models import load_base_model, load_tokenizer
from fedlora.tensors import TensorDict, wire_name
from fedlora.training import derived_seed
from tests.conftest import ADAPTIVE_CENTRAL, ONE, TINY, read_metrics, run_cli
from tests.test_distributed import assert_same_run, finish, launch
from tests.test_methods_2026 import assert_refused, assert_resumes_exactly, ledger
from tests.test_methods_2026 import straight as straight  # the tiny runs, once per module
from tests.test_methods_server import framed

pytestmark = pytest.mark.usefixtures("one_thread")


def experiment(overrides: list[str] | None = None) -> Experiment:
    return build(load_config(TINY / "feddpa.toml", overrides or []))


def random_adapter(exp: Experiment, seed: int) -> TensorDict:
    """The initial adapter with every LoRA factor random (B non-zero) and the head kept."""
    generator = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=generator) * 0.3 if ".lora_" in k else v.clone()
        for k, v in exp.method.context.initial.items()
    }


def merged_offset(exp: Experiment, parts: list[tuple[float, TensorDict]]) -> TensorDict:
    """Per module, s·Σ w·B·A: the update the weighted branches add, as one dense matrix."""
    return {
        m.key: sum(w * m.scale * (state[m.b] @ state[m.a]) for w, state in parts)
        for m in exp.slots.modules
    }


# -- the mixing hook against numpy -----------------------------------------------------------------


@pytest.mark.parametrize("detach", [False, True])
def test_a_branch_adds_its_weighted_lora_output_and_detach_stops_its_gradient(detach: bool) -> None:
    exp = experiment()
    slots = exp.slots
    own, other = random_adapter(exp, 1), random_adapter(exp, 2)
    slots.load(own)
    slots.model.eval()
    module = slots.modules[0]
    layer = next(m for n, m in slots.model.named_modules() if wire_name(n) == module.key)
    x = torch.randn(2, 5, module.d_in, generator=torch.Generator().manual_seed(3))
    x.requires_grad_(True)
    rows = RowWeights({0: torch.tensor([0.2, 0.9])})
    rows.current = rows.by_split[0]
    with branches(slots, [Branch(other, PerRow(rows), detach=detach)]):
        out = layer(x)
    out.sum().backward()

    def f64(t: torch.Tensor) -> np.ndarray:
        return t.detach().double().numpy()

    base = layer.get_base_layer()
    w0, bias, s = f64(base.weight), f64(base.bias), module.scale
    a, b = f64(own[module.a]), f64(own[module.b])
    a_o, b_o = f64(other[module.a]), f64(other[module.b])
    weights = np.array([0.2, 0.9])[:, None, None]
    xs = f64(x)
    expected = xs @ w0.T + bias + s * xs @ a.T @ b.T + weights * s * (xs @ a_o.T @ b_o.T)
    np.testing.assert_allclose(f64(out), expected, rtol=1e-5, atol=1e-5)
    # d(Σ out)/dx: W0 + sBA, plus w·s·B_o A_o only where the branch is not detached.
    jacobian = w0 + s * b @ a
    grad = np.ones((2, 5, module.d_out)) @ jacobian
    if not detach:
        grad = grad + weights * (np.ones((2, 5, module.d_out)) @ (s * b_o @ a_o))
    np.testing.assert_allclose(f64(x.grad), grad, rtol=1e-5, atol=1e-5)
    assert layer._forward_hooks == {}  # the branch is gone after the block


# -- a mixed model, example by example -------------------------------------------------------------


def each_row_alone(
    exp: Experiment, local: TensorDict, shared: TensorDict, weights: torch.Tensor
) -> dict[str, list[float]]:
    """Every test example evaluated on its own under the merged base W0 + s(w_i·B_l A_l +
    (1 − w_i)·B_g A_g) with the slots' LoRA silenced: metrics per example."""
    evaluator, test = exp.evaluator, exp.evaluator.test
    per_row: dict[str, list[float]] = {}
    try:
        for row in range(len(test)):
            w = float(weights[row])
            exp.slots.merge_into_base(merged_offset(exp, [(w, local), (1 - w, shared)]))
            evaluator.test = test.select([row])
            for key, value in evaluator.evaluate(silenced(shared)).items():
                per_row.setdefault(key, []).append(value)
    finally:
        evaluator.test = test
        exp.slots.restore_base()
    return per_row


def mixed(exp: Experiment, local: TensorDict, shared: TensorDict, weights: torch.Tensor) -> dict:
    rows = RowWeights({id(exp.evaluator.test): weights})
    added = [
        Branch(lora_only(local), PerRow(rows)),
        Branch(lora_only(shared), PerRow(rows, complement=True)),
    ]
    with branches(exp.slots, added):
        return exp.evaluator.evaluate(silenced(shared), rows=rows.select)


def test_a_mixed_classifier_scores_each_example_under_its_own_weights() -> None:
    exp = experiment(["data.max_test_examples=20", "eval.batch_size=8"])
    local, shared = random_adapter(exp, 4), random_adapter(exp, 5)
    weights = torch.linspace(-0.3, 1.2, len(exp.evaluator.test))
    alone = each_row_alone(exp, local, shared, weights)
    together = mixed(exp, local, shared, weights)
    assert together["accuracy"] == pytest.approx(np.mean(alone["accuracy"]), abs=1e-12)
    assert together["loss"] == pytest.approx(np.mean(alone["loss"]), rel=1e-5)
    uniform = mixed(exp, local, shared, torch.full_like(weights, 0.4))
    assert uniform["loss"] != pytest.approx(together["loss"], rel=1e-4)  # the weights matter


def test_mixed_multiple_choice_follows_each_item_through_its_cached_continuations(
    tmp_path: Path,
) -> None:
    import json

    items = [
        {
            "question": f"What is {a} plus {b}?",
            "choices": [str(a + b), f"{a * b + 1} or so", "neither of these"],
            "answer": (a + b) % 3,
        }
        for a in range(1, 7)
        for b in range(1, 6)
    ]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    exp = experiment(
        [
            "model.name='tiny-llama'",
            f"data.dataset='{data}'",
            "model.max_length=64",
            "data.max_test_examples=8",
            "lora.train_head=false",
            "eval.batch_size=3",
            "partition.kind='iid'",
            "partition.num_clients=2",
        ]
    )
    assert exp.evaluator.test.multiple_choice
    local, shared = random_adapter(exp, 6), random_adapter(exp, 7)
    weights = torch.linspace(1.5, -0.5, len(exp.evaluator.test))
    alone = each_row_alone(exp, local, shared, weights)
    together = mixed(exp, local, shared, weights)
    assert together["mc_accuracy"] == pytest.approx(np.mean(alone["mc_accuracy"]), abs=1e-12)
    test = exp.evaluator.test
    assert len(test) >= 6
    tokens = [sum(t != -100 for t in test.labels[r][1:]) for r in range(len(test))]
    summed = sum(loss * n for loss, n in zip(alone["loss"], tokens, strict=True))
    assert together["loss"] == pytest.approx(summed / sum(tokens), rel=1e-5)


# -- instance weights against PEFT and numpy -------------------------------------------------------


def test_instance_weights_are_lambda_times_the_mean_cosine_to_own_examples(tmp_path: Path) -> None:
    exp = experiment(["data.max_test_examples=6"])
    local, shared = random_adapter(exp, 8), random_adapter(exp, 9)
    mixture = Mixture(local, shared, scale=0.5, instances=3, weighted="local")
    client = 1
    weights = instance_weights(exp, client, mixture).by_split[id(exp.evaluator.test)]

    exp.slots.export({**shared, **lora_only(local)}, tmp_path / "local")
    config = exp.config
    tokenizer = load_tokenizer(config.model.name)
    labels = len(exp.split.label_names)
    base = load_base_model(config.model.name, labels, tokenizer, seed=config.experiment.seed)
    model = PeftModel.from_pretrained(base, tmp_path / "local").merge_and_unload().eval()

    def embedding(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        return out.hidden_states[-1][0, -1].double().numpy()

    own = exp.clients[client]
    test = exp.evaluator.test
    seed = derived_seed(config.experiment.seed, client, 0, STREAM)
    draws = draw_references(len(test), len(own), 3, seed)
    assert all(len(set(row)) == 3 for row in draws.tolist())  # distinct examples per row
    for row in range(len(test)):
        e = embedding(query_ids(test, row))
        cosines = [
            e
            @ (r := embedding(query_ids(exp.train_set, own[j])))
            / (np.linalg.norm(e) * np.linalg.norm(r))
            for j in draws[row]
        ]
        assert float(weights[row]) == pytest.approx(0.5 * np.mean(cosines), abs=1e-5)


# -- the method ------------------------------------------------------------------------------------


def test_the_local_phase_starts_in_round_two_and_trains_l_against_the_detached_global() -> None:
    exp = experiment()
    method, slots = exp.method, exp.slots
    message, store = random_adapter(exp, 10), {}
    assert method.personal_phase(0, message, store, 0) is None
    phase = method.personal_phase(0, message, store, 1)
    assert phase is not None and phase.weight == 0.5
    assert all(phase.trainable(k) == (".lora_" in k) for k in phase.start)  # g's head frozen
    # The phase's forward: W0 + a·s·B_l A_l + (1−a)·s·B_g A_g, with l = the common init here.
    local = {**message, **lora_only(method.context.initial)}
    local = {k: (v + 0.1 if ".lora_B." in k else v) for k, v in local.items()}
    batch = exp.train_set.batch(exp.clients[0][:4])
    slots.model.eval()
    with torch.no_grad():
        halved = {m.key: 0.5 * m.scale for m in slots.modules}
        with slots.scaled(halved), branches(slots, phase.added):
            slots.load(local)
            phased = slots.model(**batch).logits
        slots.merge_into_base(merged_offset(exp, [(0.5, local), (0.5, message)]))
        slots.load(silenced(message))
        merged = slots.model(**batch).logits
        slots.restore_base()
    torch.testing.assert_close(phased, merged, rtol=1e-5, atol=1e-5)

    runtime = ClientRuntime(exp)
    reply, _ = runtime.train(0, message, 1)
    kept = runtime.stores[0]
    l_trained, g_trained = stored(kept, LOCAL), stored(kept, GLOBAL)
    assert set(l_trained) == set(lora_only(message))
    assert any(not torch.equal(l_trained[k], method.context.initial[k]) for k in l_trained)
    assert g_trained.keys() == reply.keys() == message.keys()
    assert all(torch.equal(g_trained[k], reply[k]) for k in reply)


def test_the_global_adapter_follows_fedit_exactly_and_the_local_one_never_travels(
    straight, tmp_path: Path
) -> None:
    dpa = straight("feddpa")
    fedit = tmp_path / "fedit"
    code, output = run_cli(
        "run", str(TINY / "feddpa.toml"), "--out", str(fedit), "--quiet", *ONE,
        "--set", "method.name=fedit", "--set", "eval.own_test_share=false",
    )  # fmt: skip
    assert code == 0, output
    assert ledger(dpa) == ledger(fedit)  # the same bytes, message by message
    exp = build(load_config(dpa / "config.toml"))
    g = {k: tuple(v.shape) for k, v in exp.method.context.initial.items() if ".lora_" not in k}
    for m in exp.slots.modules:
        g |= {m.b: (m.d_out, m.rank), m.a: (m.rank, m.d_in)}
    records = ledger(dpa)
    assert len(records) == 3 * 2 * 4  # rounds x directions x clients
    assert all(record["bytes"] == framed(g) for record in records)  # g each way, never l
    ours, theirs = (load_file(run / "checkpoint.safetensors") for run in (dpa, fedit))
    shared = [k for k in ours if k.startswith("method/")]
    assert shared and all(torch.equal(ours[k], theirs[k]) for k in shared)
    stores = {k for k in ours if k.startswith("store/")}
    assert any(f"/{LOCAL}" in k for k in stores) and any(f"/{GLOBAL}" in k for k in stores)
    final = read_metrics(dpa)[-1]
    assert {"accuracy", "accuracy_std", "accuracy_min"} <= set(final)  # per client
    assert {"own_accuracy", "own_accuracy_std", "own_accuracy_min"} <= set(final)
    assert math.isfinite(final["accuracy"]) and math.isfinite(final["test_loss"])


def test_each_client_exports_its_local_and_global_adapters_as_peft_adapters(straight) -> None:
    run = straight("feddpa")
    exp = build(load_config(run / "config.toml"))
    checkpoint = load_checkpoint(run)
    assert checkpoint is not None
    client = 2
    store = checkpoint.stores[client]
    config = exp.config
    tokenizer = load_tokenizer(config.model.name)
    labels = len(exp.split.label_names)
    batch = exp.train_set.batch(list(range(4)))
    for folder, prefix in (("local", LOCAL), ("global", GLOBAL)):
        state = stored(store, prefix)
        expected_state = {**stored(store, GLOBAL), **state}
        exp.slots.load(expected_state)
        exp.slots.model.eval()
        with torch.no_grad():
            expected = exp.slots.model(**batch).logits
        base = load_base_model(config.model.name, labels, tokenizer, seed=config.experiment.seed)
        path = run / "adapters" / f"client_{client}" / folder
        reloaded = PeftModel.from_pretrained(base, path).eval()
        with torch.no_grad():
            logits = reloaded(**batch).logits
        torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_a_resumed_feddpa_run_ends_where_the_straight_run_does(straight, tmp_path: Path) -> None:
    """Stopped after round 2, when every client holds a trained local adapter (its store is
    checkpointed), then resumed to round 3."""
    assert_resumes_exactly("feddpa", straight("feddpa"), tmp_path / "part", first_rounds=2)


@pytest.mark.parametrize(
    "overrides",
    [
        ["privacy.mechanism=dp_sgd", "privacy.noise_multiplier=1.0", "privacy.delta=1e-5",
         "privacy.secure_aggregation=true"],
        ADAPTIVE_CENTRAL,
        ["federation.aggregator=median"],
    ],
    ids=["dp-sgd+secure-aggregation", "central-dp", "median"],
)  # fmt: skip
def test_feddpa_runs_under_its_declared_privacy_and_robust_combinations(
    overrides: list[str], tmp_path: Path
) -> None:
    args = [a for o in [*overrides, "experiment.rounds=2"] for a in ("--set", o)]
    code, output = run_cli(
        "run", str(TINY / "feddpa.toml"), "--out", str(tmp_path), "--quiet", *ONE, *args
    )
    assert code == 0, output
    final = read_metrics(tmp_path)[-1]
    assert math.isfinite(final["own_accuracy"])
    if "privacy.mechanism=dp_sgd" in overrides or overrides == ADAPTIVE_CENTRAL:
        assert math.isfinite(final["epsilon"])


def test_feddpa_refuses_heterogeneous_ranks(tmp_path: Path) -> None:
    assert_refused(
        "feddpa", ["ranks.profile=uniform"], "trains every client at lora.rank", tmp_path
    )


@pytest.mark.parametrize("weight_on", ["local", "global"])
def test_weight_on_chooses_which_adapter_w_multiplies(weight_on: str) -> None:
    exp = experiment([f"method.weight_on='{weight_on}'", "data.max_test_examples=10"])
    local, shared = random_adapter(exp, 11), random_adapter(exp, 12)
    store: TensorDict = {}
    store.update({LOCAL + k: v for k, v in lora_only(local).items()})
    store.update({GLOBAL + k: v for k, v in shared.items()})
    mixture = exp.method.client_mixture(0, store)
    w = instance_weights(exp, 0, mixture).by_split[id(exp.evaluator.test)]
    on_local = w if weight_on == "local" else 1 - w
    alone = each_row_alone(exp, {**shared, **lora_only(local)}, shared, on_local)
    together = mixture_metrics(exp, 0, mixture)
    assert together["loss"] == pytest.approx(np.mean(alone["loss"]), rel=1e-5)


# -- each client's own test share ------------------------------------------------------------------


def test_own_test_share_scores_each_clients_model_on_its_share(tmp_path: Path) -> None:
    """FedSA-LoRA with ``eval.own_test_share``: own_accuracy is the mean over clients of each
    client's own model's accuracy on its share, computed here from the logits."""
    out = tmp_path / "fedsa"
    code, output = run_cli(
        "run", str(TINY / "fedsa.toml"), "--out", str(out), "--quiet", *ONE,
        "--set", "eval.own_test_share=true",
    )  # fmt: skip
    assert code == 0, output
    exp = build(load_config(out / "config.toml"))
    checkpoint = load_checkpoint(out)
    assert checkpoint is not None and exp.own_tests is not None
    accuracies = []
    for client, share in enumerate(exp.own_tests):
        assert len(share) > 0
        exp.slots.load(exp.method.own_model(client, checkpoint.stores[client]))
        exp.slots.model.eval()
        batch = share.batch(list(range(len(share))))
        with torch.no_grad():
            predicted = exp.slots.model(**batch).logits.argmax(-1)
        accuracies.append(float((predicted == batch["labels"]).double().mean()))
    final = read_metrics(out)[-1]
    assert final["own_accuracy"] == pytest.approx(np.mean(accuracies), abs=1e-12)
    assert final["own_accuracy_min"] == pytest.approx(min(accuracies), abs=1e-12)
    rows = [len(share) for share in exp.own_tests]
    assert sum(rows) <= len(exp.evaluator.test)  # disjoint shares of the test set


def test_own_test_share_is_refused_for_a_method_with_one_global_model(tmp_path: Path) -> None:
    code, output = run_cli(
        "run", str(TINY / "fedit.toml"), "--out", str(tmp_path), "--quiet",
        "--set", "eval.own_test_share=true",
    )  # fmt: skip
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "evaluates one global model" in errors[0], output


def test_feddpa_on_three_processes_equals_the_in_process_run(straight, tmp_path: Path) -> None:
    """torch.distributed, each rank hosting its clients: their local phases, mixed-model
    evaluations (own shares too) and both exported adapters equal the in-process run's."""
    out, log = tmp_path / "dist", tmp_path / "dist.log"
    run = launch("feddpa.toml", out, log, "--nproc", "3", *ONE)
    finish(run, log)
    assert_same_run(straight("feddpa"), out)
    assert (out / "adapters" / "client_3" / "local" / "adapter_model.safetensors").is_file()
