"""Simulated adversarial clients (``[attack]``): a listed client tampers with its reply before
sending it, so tests and studies can check what the receiver and the aggregator make of it.

``scale``, ``sign_flip`` and ``noise`` change the client's *update* (reply minus the state it
was sent, where the message has the same tensor; for methods whose replies are updates already
the reference is zero); ``nan`` and ``wrong_shape`` make a message the receiver must refuse.
"""

from __future__ import annotations

import torch

from fedlora.config import AttackConfig
from fedlora.training import derived_seed

TensorDict = dict[str, torch.Tensor]


def tamper(
    reply: TensorDict,
    message: TensorDict,
    attack: AttackConfig,
    client: int,
    seed: int,
    round_index: int,
) -> TensorDict:
    """``reply`` as attacking client ``client`` sends it (unchanged for honest clients)."""
    if client not in attack.clients or not reply:
        return reply
    names = sorted(reply)
    if attack.kind == "nan":
        poisoned = reply[names[0]].clone()
        poisoned.view(-1)[0] = float("nan")
        return {**reply, names[0]: poisoned}
    if attack.kind == "wrong_shape":
        return {**reply, names[0]: torch.cat([reply[names[0]], reply[names[0]][:1]])}
    generator = torch.Generator().manual_seed(derived_seed(seed, round_index, client, 0xA7))
    tampered = {}
    for name in names:
        value = reply[name]
        sent = message.get(name)
        reference = sent if sent is not None and sent.shape == value.shape else None
        update = value if reference is None else value - reference
        if attack.kind == "scale":
            update = attack.factor * update
        elif attack.kind == "sign_flip":
            update = -update
        else:  # noise
            update = update + attack.noise_std * torch.randn(
                value.shape, generator=generator, dtype=value.dtype
            )
        tampered[name] = update if reference is None else reference + update
    return tampered
