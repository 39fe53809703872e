"""fedlora: collaborative parameter-efficient fine-tuning of language models.

Importing the package turns tokenizers' thread pool off (forked workers must not inherit it)
and quiets library start-up chatter, before torch, transformers or peft load. It leaves the
hub alone: built-in models and data never reach it, and a hub id is fetched unless the user
set offline mode (``fedlora.hub``).
"""

import logging
import os
import warnings

__version__ = "0.1.0"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# datasets pings a download counter for its packaged json/csv/parquet readers, even for a local
# file: reading one's own file should not touch the network.
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "false")

# bitsandbytes warns at import that an optional GPU-kernel package is absent; irrelevant here.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
warnings.filterwarnings(
    "ignore", message=r".*torch.jit.script_method.*", category=DeprecationWarning
)

# The Python API (after the settings above: it loads no torch until a run starts).
from fedlora.api import RunOutcome, load_run, run  # noqa: E402
from fedlora.config import Config, ConfigError  # noqa: E402
from fedlora.errors import FedloraError, RunError  # noqa: E402

__all__ = [
    "Config",
    "ConfigError",
    "FedloraError",
    "RunError",
    "RunOutcome",
    "__version__",
    "load_run",
    "run",
]
