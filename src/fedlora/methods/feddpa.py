"""FedDPA (Yang, Long, Shen, Jiang, Blumenstein, NeurIPS 2024, arXiv 2403.19211; official code
Lydia-yang/FedDPA): each client holds a global adapter g, averaged by the server, and a local
adapter l that never leaves it; its model mixes the two per test example.

A round on client i (FedDPA-T, the official ``--local_model True``):

1. From the second round on (round index ≥ 1, when g has been trained by someone), train l
   with g's output mixed in as a constant: y = W₀x + a·s·B_l A_l x + (1−a)·s·sg(B_g A_g x),
   a = ``local_weight`` (0.5). l starts from where the client left it.
2. Train g alone from the download (phase 1 never touches it) and upload it; the server
   averages g as FedIT does.

Its model at test time: for a test example x, w(x) = λ·mean_s cos(e(x), e(x_s)) over
``instances`` (5) of its own training examples x_s drawn at random, e the last layer's hidden
state at the query's last token under l alone (``fedlora.mixing``), λ = ``max_weight`` (0.5);
then y = W₀x + w·s·B_l A_l x + (1−w)·s·B_g A_g x (``weight_on = "local"``: the more x
resembles the client's own data, the more its local adapter counts, the paper's motivation).

Where the official code deviates, named here and as options:
- Its inference (``GlobalModel_generated.py``, ``set_local(['local'], [w, 1−w])`` with the
  global adapter active) puts w on the *global* adapter: ``weight_on = "global"``.
- Its batched generation (the default ``batched=True``) computes every answer before w is set,
  so no weight applies there; fedlora always applies w.
- Its server averages with uniform weights: ``federation.weighting = "uniform"``; fedlora's
  default weighs by data size.
- It reloads l from the previous round's folder only, so a client not sampled in the round
  before starts a fresh l; fedlora keeps l in the client's store across rounds.
- Random cosine draws and negative cosines are kept as they are (w may fall below 0), as there.

Reconstructed where the paper and code are silent: l starts from the common initial adapter;
phase 1 runs the round's step count with a fresh optimizer (the official code builds a new
Trainer per phase); a classifier's head (encoder tasks; language models have none) belongs to
g: averaged, trained in phase 2, frozen at the download in phase 1. Each client is evaluated on
its mixed model with the g it last trained (what it holds; the next average reaches it with the
next round) and exports both adapters, ``adapters/client_<i>/local`` (l with g's head) and
``adapters/client_<i>/global``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedlora.methods.base import PersonalPhase, store_under, stored
from fedlora.methods.fedit import FedIT
from fedlora.mixing import Branch, Mixture, lora_only
from fedlora.tensors import TensorDict, is_head

LOCAL = "local."  # store prefix of the client's local adapter l (LoRA tensors only)
GLOBAL = "global."  # store prefix of the global adapter g it last trained


class FedDPAOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    local_weight: float = Field(
        0.5, ge=0, le=1, description="a: the local adapter's weight while it trains (g gets 1−a)"
    )
    max_weight: float = Field(
        0.5, description="λ: w(x) = λ · mean cosine similarity to the client's own examples"
    )
    instances: int = Field(5, ge=1, description="own training examples compared per test example")
    weight_on: Literal["local", "global"] = Field(
        "local",
        description="the adapter w(x) weighs (the other gets 1−w): `local` (the paper's "
        "motivation) or `global` (the official inference code)",
    )


class FedDPA(FedIT):
    name = "feddpa"
    summary = (
        "FedDPA: averaged global + private local adapter, mixed per test example (Yang et al. 2024)"
    )
    Options = FedDPAOptions
    per_client_eval = True
    options: FedDPAOptions

    def personal_phase(
        self, client: int, message: TensorDict, store: TensorDict, round_index: int
    ) -> PersonalPhase | None:
        if round_index == 0:
            return None
        local = stored(store, LOCAL) or lora_only(self.context.initial)
        a = self.options.local_weight
        return PersonalPhase(
            start={**message, **local},
            trainable=lambda name: not is_head(name),
            weight=a,
            added=[Branch(lora_only(message), 1.0 - a, detach=True)],
        )

    def keep_personal(self, client: int, trained: TensorDict, store: TensorDict) -> None:
        store_under(store, LOCAL, lora_only(trained))

    def client_reply(
        self, client: int, trained: TensorDict, message: TensorDict, store: TensorDict
    ) -> TensorDict:
        store_under(store, GLOBAL, trained)
        return trained

    def _adapters(self, store: TensorDict) -> tuple[TensorDict, TensorDict]:
        """(l with g's head, g): what the client holds, the common init before it trained."""
        shared = stored(store, GLOBAL) or dict(self.context.initial)
        local = stored(store, LOCAL) or lora_only(self.context.initial)
        return {**shared, **local}, shared

    def client_model(self, client: int, store: TensorDict) -> TensorDict | None:
        return self._adapters(store)[0] if stored(store, LOCAL) else None

    def client_exports(self, client: int, store: TensorDict) -> dict[str, TensorDict]:
        if not stored(store, GLOBAL):
            return {}
        local, shared = self._adapters(store)
        return {"local": local, "global": shared}

    def client_mixture(self, client: int, store: TensorDict) -> Mixture:
        local, shared = self._adapters(store)
        options = self.options
        return Mixture(
            local=local,
            shared=shared,
            scale=options.max_weight,
            instances=options.instances,
            weighted="shared" if options.weight_on == "global" else "local",
        )
