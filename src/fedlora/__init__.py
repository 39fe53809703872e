"""fedlora: collaborative parameter-efficient fine-tuning of language models.

Importing the package sets the offline defaults (models and data come from installed packages,
never a hub) and quiets library start-up chatter, before torch, transformers or peft load.
"""

import logging
import os
import warnings

__version__ = "0.1.0"

for _name, _value in {
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}.items():
    os.environ.setdefault(_name, _value)

# bitsandbytes warns at import that an optional GPU-kernel package is absent; irrelevant here.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
warnings.filterwarnings(
    "ignore", message=r".*torch.jit.script_method.*", category=DeprecationWarning
)
