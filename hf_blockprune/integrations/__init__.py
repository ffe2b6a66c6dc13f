"""Other libraries, one file each, registered with the core when they are installed (the core never imports them).

- `peft`: LoRA layers under the masks, PEFT models' checkpoints and compacted saves.
- `sentence_transformers`: sentence-transformers models (recognized by their class; the package is not imported).
"""

from transformers.utils import is_peft_available

from . import sentence_transformers  # noqa: F401  (registers its model wrapper)

if is_peft_available():
    from . import peft  # noqa: F401  (registers the LoRA layers, the module check and the model wrapper)
