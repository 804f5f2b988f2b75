"""What every method's runner does first, from config files and tokenizers (no weights): the base model's family
with its attention kernel checked for training, and the tokenizer carrying the run's generated chat template.
One place, so a new family or a new template rule reaches every method at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config.schema import RunConfig
from ..data.gemma4 import writes_empty_thought
from ..data.template import use_run_template
from ..families import Family
from ..models.checks import check_kernel_request
from ..models.loading import checkpoint_family, load_tokenizer


@dataclass
class BaseModel:
    """The base checkpoint of a run as its config files say: `family`, transformers' `config` (config.json)."""

    family: Family
    config: Any


@dataclass
class RunTokenizer:
    """The base's tokenizer with the run's template. `empty_thought`: Gemma 4 12B/26B-A4B/31B write the empty
    thought block; `base_chat_template`: the template the checkpoint carried, when it differed (kept beside the
    run as chat_template.base.jinja), else None."""

    tokenizer: Any
    empty_thought: bool
    base_chat_template: str | None


def base_model(cfg: RunConfig) -> BaseModel:
    """cfg.base_model's family and config (no weights), its attention kernel (model.attn_implementation) checked
    for training. Raises UserError: an unsupported model, a kernel the family refuses or that is not installed."""
    m = cfg.model
    family, config = checkpoint_family(cfg.base_model, m.revision, m.trust_remote_code)
    check_kernel_request(family, m.attn_implementation, training=True)
    return BaseModel(family, config)


def run_tokenizer(cfg: RunConfig, family: Family, padding_side: str | None = None) -> RunTokenizer:
    """cfg.base_model's tokenizer, checked (its family's turn markers single tokens), carrying the run's generated
    template (data.system_policy, data.unsupported_fields, the size's empty thought block). `padding_side`: 'left'
    for methods that generate from prompts. Raises UserError."""
    m = cfg.model
    tokenizer = load_tokenizer(cfg.base_model, m.revision, m.trust_remote_code, family)
    empty_thought = writes_empty_thought(family, cfg.base_model)
    before = use_run_template(tokenizer, family, cfg.data.system_policy, cfg.data.unsupported_fields,
                              empty_thought=empty_thought)
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    return RunTokenizer(tokenizer, empty_thought, before)
