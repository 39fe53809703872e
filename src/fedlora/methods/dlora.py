"""DLoRA: cloud–edge split LoRA with Kill-and-Revive (Gao & Zhang; algorithms.md §3).

Not a federated method: each user (one partition client) trains a personal adapter on its own
device, running the frozen base model on a shared cloud through ``fedlora.dlora.split``. It is
step-based, so it declares ``engine = "split"`` and the round hooks of ``Method`` do not apply;
a "round" is a block of ``train.local_steps`` steps per user, which keeps metrics, evaluation,
checkpoints and resume on the usual round grid.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from fedlora.config import ConfigError
from fedlora.dlora.kill_revive import KillReviveRule, Norm, RevivePolicy
from fedlora.dlora.protocol import HeadOn, KilledForward
from fedlora.methods.base import Method, MethodContext
from fedlora.tensors import TensorDict
from fedlora.training import derived_seed

EDGE = "edge."  # store prefix of a user's adapter state
ACTIVE = "kr.active"  # store key of its active-module mask


class DLoRAOptions(BaseModel):
    """Every knob of §3.2's reconstruction; the defaults are ours (the paper gives none)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    tau: int = Field(50, ge=1, description="Kill-and-Revive check period, in optimizer steps")
    budget: float = Field(
        0.125, gt=0, le=1, description="fraction of modules kept active; 1 = no KR"
    )
    threshold: float | None = Field(
        None, gt=0, description="kill below this variation (replaces budget)"
    )
    norm: Norm = Field("relative", description="variation ||Δθ||, divided by ||θ_old|| if relative")
    revive: int = Field(1, ge=0, description="modules revived per check")
    revive_policy: RevivePolicy = Field(
        "longest_killed_first",
        description="which killed modules a check revives: longest killed first, random "
        "(seeded by step), or round robin",
    )
    killed_forward: KilledForward = Field(
        "cloud",
        description="killed module's output: (a) cloud applies frozen factors, "
        "(b) edge computes it without backward, (c) drop",
    )
    head_on: HeadOn = Field(
        "edge", description="edge: head + loss on the device; cloud: logits sent down"
    )
    users: int | None = Field(
        None, ge=1, description="train the first N partition clients; None: all"
    )


class DLoRA(Method):
    name = "dlora"
    summary = "cloud–edge split LoRA with Kill-and-Revive (Gao & Zhang); one adapter per user"
    Options = DLoRAOptions
    engine = "split"
    keeps_optimizer_state = True
    per_client_eval = True

    def __init__(self, context: MethodContext, options: BaseModel) -> None:
        super().__init__(context, options)
        assert isinstance(options, DLoRAOptions)
        self.opts = options
        clients = len(context.num_examples)
        if options.users is not None and options.users > clients:
            raise ConfigError(
                f"method.users is {options.users}, but the partition has {clients} clients"
            )
        if options.head_on == "cloud" and any(".lora_" not in k for k in context.initial):
            raise ConfigError(
                "method.head_on = 'cloud' needs a model whose head is not trained (a causal LM; "
                "PEFT always trains a classifier's head): the cloud cannot train a head on the "
                "device's private labels"
            )

    @property
    def user_count(self) -> int:
        return self.opts.users or len(self.context.num_examples)

    def rule(self, user: int) -> KillReviveRule:
        o = self.opts
        seed = derived_seed(self.context.config.experiment.seed, user, 0xD1)
        return KillReviveRule(o.tau, o.budget, o.threshold, o.norm, o.revive, o.revive_policy, seed)

    def client_model(self, client: int, store: TensorDict) -> TensorDict | None:
        """The user's adapter as deployed: under option (c) killed modules contribute nothing,
        so their B is zero in the exported and evaluated model."""
        state = {k[len(EDGE) :]: v for k, v in store.items() if k.startswith(EDGE)}
        if not state:
            return None
        if self.opts.killed_forward == "drop" and ACTIVE in store:
            for module, active in zip(self.context.modules, store[ACTIVE].tolist(), strict=True):
                if not active:
                    state[module.b] = state[module.b].new_zeros(state[module.b].shape)
        return state

    # -- the round hooks: the split engine drives DLoRA step by step instead -------------------
    def _not_round_based(self) -> TensorDict:
        raise TypeError("dlora is step-based and runs on the split engine, not in rounds")

    def server_message(self, client: int, round_index: int) -> TensorDict:
        return self._not_round_based()

    def aggregate(
        self, round_index: int, replies: dict[int, TensorDict], weights: dict[int, float]
    ) -> None:
        self._not_round_based()

    def client_start(self, client: int, message: TensorDict, store: TensorDict) -> TensorDict:
        return self._not_round_based()

    def client_reply(
        self, client: int, trained: TensorDict, message: TensorDict, store: TensorDict
    ) -> TensorDict:
        return self._not_round_based()
