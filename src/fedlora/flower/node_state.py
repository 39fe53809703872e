"""A SuperNode's own clients' state between rounds, on the node's disk.

What a client keeps across rounds (its ``store``: FedSA's B, per-client heads, ...; its
optimizer state when kept) lives on its node, never on the server: one safetensors file per
client and version under the node's state directory (node config ``state-dir``), per run,
replaced atomically. One file per client, not Flower's ``context.state``, because the node may
answer several of its clients at once and each writes only its own file.

A version is the round from which it holds: the state a client trained in round r is saved as
version r + 1, and round r's training starts from the newest version ≤ r. So a round the server
replays after a restart (``fedlora flower-run --resume``: it resumes from its last checkpoint,
after round r − 1) starts from the state the client had then, whatever the interrupted attempt
wrote; the two newest versions are kept. The directory is named by the run (``run-<key>``: the
run directory's name and a digest of its path, from ``fedlora flower-app``), so it survives a new
Flower run id.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from fedlora.tensors import TensorDict

DEFAULT = Path("~/.fedlora/flower")
STORE, OPTIMIZER = "store.", "optimizer."
KEEP = 2  # versions per client: the newest, and the one a replayed round may need


def node_root(state_dir: str | None, partition: int) -> Path:
    """The node's state directory (default under ``~/.fedlora/flower``)."""
    root = Path(state_dir) if state_dir else DEFAULT / f"partition-{partition}"
    return root.expanduser()


def run_directory(state_dir: str | None, partition: int, run_key: str) -> Path:
    """Where this node keeps run ``run_key``'s clients."""
    return node_root(state_dir, partition) / f"run-{run_key}"


def _versions(directory: Path, client: int) -> list[tuple[int, Path]]:
    pattern = re.compile(rf"client{client}\.r(\d+)\.safetensors")
    found = []
    if directory.is_dir():
        for path in directory.iterdir():
            if match := pattern.fullmatch(path.name):
                found.append((int(match.group(1)), path))
    return sorted(found)


def load(directory: Path, client: int, round_index: int) -> tuple[TensorDict, TensorDict]:
    """Client ``client``'s store and optimizer state at the start of round ``round_index`` ({}
    and {} before its first training)."""
    from safetensors.torch import load_file

    usable = [path for version, path in _versions(directory, client) if version <= round_index]
    if not usable:
        return {}, {}
    tensors = load_file(usable[-1])
    store = {k[len(STORE) :]: v for k, v in tensors.items() if k.startswith(STORE)}
    optimizer = {k[len(OPTIMIZER) :]: v for k, v in tensors.items() if k.startswith(OPTIMIZER)}
    return store, optimizer


def save(
    directory: Path, client: int, store: TensorDict, optimizer: TensorDict, version: int
) -> None:
    """The state client ``client`` holds from round ``version`` on; older versions but one go."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {STORE + k: v.detach().to("cpu", copy=True).contiguous() for k, v in store.items()}
    tensors |= {
        OPTIMIZER + k: v.detach().to("cpu", copy=True).contiguous() for k, v in optimizer.items()
    }
    partial = directory / f"client{client}.partial"
    save_file(tensors, str(partial))
    os.replace(partial, directory / f"client{client}.r{version}.safetensors")
    for older, path in _versions(directory, client)[:-KEEP]:
        if older < version:
            path.unlink(missing_ok=True)
