"""DLoRA split execution (algorithms.md §3.1, §1.4, §7 T11) on real tiny models, no mocks.

T11: with every module active the cloud–edge split gives the loss and gradients of a real PEFT
LoRA model holding the same A and B. A killed module gets no gradient, no device compute and no
traffic; each step's messages are the §1.4 formula's tensors; the analytic FLOPs equal
``torch.utils.flop_counter``'s count.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fedlora.adapters import AdapterSlots
from fedlora.channel import Channel, encode
from fedlora.config import LoraConfig
from fedlora.dlora.flops import head_flops, lora_backward_flops, lora_forward_flops
from fedlora.dlora.split import CloudEdgeLink, CloudModel, split_step
from fedlora.models import load_base_model, load_tokenizer, model_spec

LABELS = 3


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny matmuls are fastest on one thread, and far faster when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_batch(task: str, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A right-padded batch of 3 rows, lengths 12, 9, 5 (padding exercises the mask)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [12, 9, 5]
    ids = torch.randint(5, vocab, (3, 12), generator=generator)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    ids = ids * mask
    if task == "causal":
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        labels[:, :3] = -100  # prompt positions carry no loss
    else:
        labels = torch.tensor([0, 2, 1])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class Pair:
    """A real PEFT LoRA model and, on a separately loaded identical base, the split."""

    def __init__(self, name: str, shared: bool = False) -> None:
        tokenizer = load_tokenizer(name)
        self.spec = model_spec(name)
        base = load_base_model(name, LABELS, tokenizer, seed=0)
        self.slots = AdapterSlots(base, self.spec, LoraConfig(rank=4, alpha=8), init_seed=1)
        generator = torch.Generator().manual_seed(2)
        # Non-zero B (the init has B = 0) so every gradient path carries signal.
        self.state = {
            k: (0.1 * torch.randn(v.shape, generator=generator) if ".lora_B." in k else v)
            for k, v in self.slots.read().items()
        }
        self.slots.load(self.state)
        if shared:  # the engine's layout: the cloud is the base inside the PEFT wrapper
            self.cloud = CloudModel(
                self.slots.model.get_base_model(),
                self.spec,
                self.slots.modules,
                plain=self.slots.model.disable_adapter,
            )
        else:
            plain = load_base_model(name, LABELS, tokenizer, seed=0)
            self.cloud = CloudModel(plain, self.spec, self.slots.modules)
        self.vocab = int(base.config.vocab_size)
        self.keys = [m.key for m in self.slots.modules]

    def link(self, killed_forward: str = "cloud") -> CloudEdgeLink:
        return CloudEdgeLink("client0", self.cloud.edge(self.state), Channel(), killed_forward)  # type: ignore[arg-type]

    def reference(self, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
        model = self.slots.model
        model.eval()
        params = self.slots.parameters(lambda name: True)
        for _, p in params:
            p.grad = None
        loss = model(**batch).loss
        loss.backward()
        return loss.item(), {name: p.grad.clone() for name, p in params}

    def split(
        self, link: CloudEdgeLink, batch: dict[str, torch.Tensor], head_on: str = "edge"
    ) -> float:
        self.cloud.model.eval()
        return split_step(self.cloud, link, batch, head_on)  # type: ignore[arg-type]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize(
    ("name", "shared", "head_on"),
    [
        ("tiny-bert", False, "edge"),
        ("tiny-llama", False, "edge"),
        ("tiny-llama", False, "cloud"),  # logits down, loss on the device
        ("tiny-bert", True, "edge"),  # the engine's layout: base shared with the PEFT slots
    ],
)
def test_t11_split_equals_peft_lora(name: str, shared: bool, head_on: str) -> None:
    pair = Pair(name, shared)
    batch = make_batch(pair.spec.task, pair.vocab)
    loss_ref, grads_ref = pair.reference(batch)
    link = pair.link()
    loss = pair.split(link, batch, head_on)
    kinds = {t.kind for t in link.log if not t.module}
    assert kinds == {
        "embeddings",
        "hidden" if head_on == "edge" else "logits",
        "grad_hidden" if head_on == "edge" else "grad_logits",
    }
    assert abs(loss - loss_ref) <= 1e-6 * abs(loss_ref)
    params = link.edge.params
    assert set(params) == set(grads_ref)
    for key, grad in grads_ref.items():
        assert params[key].grad is not None, key
        assert relative(params[key].grad, grad) <= 1e-6, key
        assert float(torch.linalg.vector_norm(grad)) > 0, key


def test_killed_module_no_grad_no_traffic_no_compute() -> None:
    pair = Pair("tiny-bert")
    batch = make_batch("classification", pair.vocab)
    tokens = batch["input_ids"].numel()
    killed = pair.keys[0]  # layer 0 query
    module = pair.slots.modules[0]

    counts = {}
    for label, kill in (("all", False), ("one killed", True)):
        link = pair.link(killed_forward="drop")
        if kill:
            link.kill(killed)
        with FlopCounterMode(display=False) as counter:
            pair.split(link, batch)
        counts[label] = counter.get_total_flops()
        if kill:
            edge = link.edge
            assert edge.params[module.a].grad is None and edge.params[module.b].grad is None
            assert all(t.module != killed for t in link.log)
            assert link.flops["modules"] == sum(
                lora_forward_flops(m, tokens) + lora_backward_flops(m, tokens)
                for m in pair.slots.modules[1:]
            )
            others = [p.grad for k, p in edge.params.items() if k not in (module.a, module.b)]
            assert all(g is not None for g in others)
    # Whole-step FLOPs (cloud + device) measured by torch: killing the module removes exactly
    # its device forward and backward products.
    saved = lora_forward_flops(module, tokens) + lora_backward_flops(module, tokens)
    assert counts["all"] - counts["one killed"] == saved


def test_killed_module_options() -> None:
    """(a) cloud: one factor upload of r(d+k) floats at kill time, then the cloud applies the
    frozen delta (same loss as all active); (b) edge: forward traffic only; (c) drop."""
    pair = Pair("tiny-bert")
    batch = make_batch("classification", pair.vocab)
    key, module = pair.keys[1], pair.slots.modules[1]
    all_active = pair.split(pair.link(), batch)

    cloud = pair.link("cloud")
    cloud.kill(key)
    upload = [t for t in cloud.log if t.kind == "factors"]
    assert len(upload) == 1 and upload[0].direction == "up"
    assert upload[0].values == module.rank * (module.d_in + module.d_out)
    cloud.log.clear()
    assert pair.split(cloud, batch) == pytest.approx(all_active, rel=1e-6)
    assert all(t.module != key for t in cloud.log)
    assert cloud.edge.params[module.a].grad is None

    edge = pair.link("edge")
    edge.kill(key)
    assert pair.split(edge, batch) == pytest.approx(all_active, rel=1e-6)
    kinds = sorted(t.kind for t in edge.log if t.module == key)
    assert kinds == ["u", "x"]
    assert edge.edge.params[module.a].grad is None

    drop = pair.link("drop")
    drop.kill(key)
    assert pair.split(drop, batch) != pytest.approx(all_active, rel=1e-6)  # B != 0 here

    drop.revive(key)
    drop.log.clear()
    assert pair.split(drop, batch) == pytest.approx(all_active, rel=1e-6)


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_step_traffic_matches_section_1_4(name: str) -> None:
    """Per step and active module: x (b·ℓ·k) and g_y (b·ℓ·d) down, s·BAx (b·ℓ·d) and the
    input-gradient (b·ℓ·k) up; bytes are the serialized messages, also in the channel ledger."""
    pair = Pair(name)
    batch = make_batch(pair.spec.task, pair.vocab)
    tokens = batch["input_ids"].numel()
    link = pair.link()
    link.kill(pair.keys[-1])
    link.log.clear()
    link.channel.ledger.records.clear()
    pair.split(link, batch)
    expected = {
        "x": ("down", "d_in"),
        "u": ("up", "d_out"),
        "grad_y": ("down", "d_out"),
        "grad_x": ("up", "d_in"),
    }
    for module in pair.slots.modules:
        sent = {t.kind: t for t in link.log if t.module == module.key}
        if module.key == pair.keys[-1]:
            assert sent == {}
            continue
        assert set(sent) == set(expected)
        for kind, (direction, dim) in expected.items():
            t = sent[kind]
            assert t.direction == direction
            assert t.values == tokens * getattr(module, dim)
            assert t.bytes == len(encode({kind: torch.zeros(t.values)}))
    assert [r.bytes for r in link.channel.ledger.records] == [t.bytes for t in link.log]
    ups = {r.receiver for r in link.channel.ledger.records if r.sender == "client0"}
    assert ups == {"server"}


def test_flops_match_flop_counter() -> None:
    pair = Pair("tiny-bert")
    edge = pair.link().edge
    module = pair.slots.modules[2]
    x = torch.randn(3, 12, module.d_in)
    grad = torch.randn(3, 12, module.d_out)
    with FlopCounterMode(display=False) as counter:
        _, pending = edge.module_forward(module.key, x, train=True)
    assert counter.get_total_flops() == lora_forward_flops(module, 36)
    assert pending is not None
    with FlopCounterMode(display=False) as counter:
        edge.module_backward(pending, grad)
    assert counter.get_total_flops() == lora_backward_flops(module, 36)

    hidden = torch.randn(3, edge.head_weight.shape[1])
    with FlopCounterMode(display=False) as counter:
        edge.loss(hidden, torch.tensor([0, 1, 2]), from_logits=False)
    assert counter.get_total_flops() == head_flops(3, hidden.shape[1], LABELS, trains_weight=True)
