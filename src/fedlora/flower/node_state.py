"""A SuperNode's own clients' state between rounds, on the node's disk.

Flower starts a fresh ClientApp process for every message, so what a client keeps across rounds
(its ``store``: FedSA's B, per-client heads, ...; its optimizer state when kept) cannot live in
memory. It stays on the node, never on the server: one safetensors file per client under the
node's state directory (node config ``state-dir``), per run, replaced atomically. One file per
client, not Flower's ``context.state``, because the node may run several of its clients'
ClientApps at once and each writes only its own file.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedlora.tensors import TensorDict

DEFAULT = Path("~/.fedlora/flower")
STORE, OPTIMIZER = "store.", "optimizer."


def run_directory(state_dir: str | None, partition: int, run_id: int) -> Path:
    """Where this node keeps run ``run_id``'s clients (default under ``~/.fedlora/flower``)."""
    root = Path(state_dir) if state_dir else DEFAULT / f"partition-{partition}"
    return root.expanduser() / f"run-{run_id}"


def load(directory: Path, client: int) -> tuple[TensorDict, TensorDict]:
    """Client ``client``'s store and optimizer state ({} and {} before its first round)."""
    from safetensors.torch import load_file

    path = directory / f"client{client}.safetensors"
    if not path.is_file():
        return {}, {}
    tensors = load_file(path)
    store = {k[len(STORE) :]: v for k, v in tensors.items() if k.startswith(STORE)}
    optimizer = {k[len(OPTIMIZER) :]: v for k, v in tensors.items() if k.startswith(OPTIMIZER)}
    return store, optimizer


def save(directory: Path, client: int, store: TensorDict, optimizer: TensorDict) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {STORE + k: v.detach().to("cpu", copy=True).contiguous() for k, v in store.items()}
    tensors |= {
        OPTIMIZER + k: v.detach().to("cpu", copy=True).contiguous() for k, v in optimizer.items()
    }
    partial = directory / f"client{client}.partial"
    save_file(tensors, str(partial))
    os.replace(partial, directory / f"client{client}.safetensors")
