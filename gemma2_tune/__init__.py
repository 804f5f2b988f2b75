"""gemma2-tune: QLoRA fine-tuning of Gemma 2 on chat data, correct by construction."""

import logging as _logging
import warnings as _warnings

__version__ = "0.1.0"

# Set before any third-party import. bitsandbytes logs at import that an optional CPU kernel package
# is missing (its fallback is exact); PEFT still calls transformers' pre-5.x gradient-checkpointing
# names, which now warn on every call; DeepSpeed calls torch.distributed collectives that warn on every step.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
_warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing\w*` is deprecated", category=FutureWarning)
_warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
