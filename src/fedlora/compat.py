"""Which fedlora a peer runs, said when two parties first meet.

Parties of one run may be separate installations: torch.distributed ranks that torchrun starts
on several machines, Flower SuperNodes, a node's long-lived runtime and the ClientApps that a
newer install starts beside it. Each states ``PROTOCOL`` (and its fedlora version, for the
message) in its first message, and a peer of another protocol is refused by name before any
message of a round is read: otherwise a changed message would fail later, as a malformed frame
or a wrong number.
"""

from __future__ import annotations

from fedlora import __version__

# Raised whenever a message between parties changes its layout or meaning.
PROTOCOL = 1


def stamp() -> dict[str, object]:
    """What a party says of itself in its first message."""
    return {"protocol": PROTOCOL, "fedlora": __version__}


def mismatch(peer: str, stated: dict) -> str | None:
    """Why ``peer``, which said ``stated`` of itself, cannot take part; None if it can."""
    if stated.get("protocol") == PROTOCOL:
        return None
    theirs = stated.get("fedlora")
    who = f"fedlora {theirs}" if isinstance(theirs, str) else "a fedlora that states no version"
    protocol = stated.get("protocol", "none")
    return (
        f"{peer} runs {who} (message protocol {protocol}), this process fedlora {__version__} "
        f"(protocol {PROTOCOL}): install the same fedlora version on every party"
    )
