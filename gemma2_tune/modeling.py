"""Model and tokenizer: quantization, attention, LoRA, and the checks made after loading.

The pure config -> BitsAndBytesConfig / LoraConfig functions come first; `load_model` then loads,
checks what was actually loaded (architecture, attention kernel, soft-caps, adapter placement) and
returns a ModelReport that goes into the manifest.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .chat import END, GEMMA_CHAT_TEMPLATE, START
from .config import ATTENTION_SOFTCAP, FINAL_SOFTCAP, RunConfig
from .errors import UserError
from .tiny import builtin_path, is_builtin

GEMMA2_27B_HIDDEN = 4608
# flash-attn gained the softcap argument in 2.6.0; older builds silently compute without it.
FLASH_ATTN_SOFTCAP_VERSION = (2, 6, 0)


def torch_dtype(name: str) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}[name]


def bnb_config(cfg: RunConfig):
    """4-bit NF4 with double quantization; quant storage = compute dtype (shardable by ZeRO-3/FSDP)."""
    if not cfg.quantization.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quantization.quant_type,
        bnb_4bit_use_double_quant=cfg.quantization.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(cfg.compute_dtype),
        bnb_4bit_quant_storage=torch_dtype(cfg.quant_storage),
    )


def lora_config(cfg: RunConfig):
    if not cfg.lora.enabled:
        return None
    from peft import LoraConfig

    # Set explicitly: PEFT's own default for Gemma 2 is q/v only.
    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        bias=cfg.lora.bias,
        task_type="CAUSAL_LM",
    )


def model_location(name_or_path: str) -> str:
    return str(builtin_path(name_or_path)) if is_builtin(name_or_path) else name_or_path


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    location = model_location(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - missing, offline, gated: one clear message
        raise UserError(_loading_hint("tokenizer", name_or_path, exc)) from None
    check_tokenizer(tokenizer, name_or_path)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    return tokenizer


def check_tokenizer(tokenizer: Any, name: str) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{name}: a fast tokenizer (tokenizer.json) is needed to map supervised spans to tokens")
    for marker in (START, END, tokenizer.bos_token or "<bos>"):
        ids = tokenizer.encode(marker, add_special_tokens=False)
        if len(ids) != 1:
            raise UserError(
                f"{name}: the tokenizer splits {marker} into {len(ids)} tokens; this is not a Gemma tokenizer"
            )


def _loading_hint(what: str, name: str, exc: Exception) -> str:
    local = Path(name).expanduser().exists()
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    where = "local folder" if local else "Hugging Face Hub"
    return (
        f"model.name_or_path: could not load the {what} of '{name}' from the {where}: {first}\n"
        + ("" if local else "If you are offline or the model is gated, log in (`hf auth login`) and download it "
           "once, or pass a local checkpoint folder with --model path/to/gemma-2.")
    )


def check_architecture(name: str, revision: str | None, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_location(name), revision=revision, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise UserError(_loading_hint("config", name, exc)) from None
    if config.model_type != "gemma2":
        raise UserError(
            f"model.name_or_path: '{name}' is a '{config.model_type}' model, not Gemma 2; gemma2-tune trains "
            "Gemma 2 checkpoints only (google/gemma-2-2b, -9b, -27b and their -it versions, or conversions)"
        )
    return config


def check_attention_request(cfg: RunConfig) -> None:
    if cfg.model.attn_implementation != "flash_attention_2":
        return
    try:
        version = importlib.metadata.version("flash-attn")
    except importlib.metadata.PackageNotFoundError:
        raise UserError("model.attn_implementation: flash_attention_2 requested but flash-attn is not installed; use eager") from None
    parts = tuple(int(p) for p in version.split(".")[:3] if p.isdigit())
    if parts < FLASH_ATTN_SOFTCAP_VERSION:
        raise UserError(f"model.attn_implementation: flash-attn {version} has no softcap support (needs >= 2.6.0); use eager")


@dataclass
class ModelReport:
    name_or_path: str
    location: str
    attn_implementation: str
    attention_softcap: float | None
    final_softcap: float | None
    layer_types: list[str]
    hidden_size: int
    num_layers: int
    load_dtype: str
    quantization: dict[str, Any] | None
    lora_targets: list[str] = field(default_factory=list)
    lora_modules: int = 0
    trainable_params: int = 0
    total_params: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary_lines(self) -> list[str]:
        pct = 100 * self.trainable_params / max(self.total_params, 1)
        return [
            f"model: {self.name_or_path} ({self.num_layers} layers, hidden {self.hidden_size}, {self.load_dtype}"
            + (f", 4-bit {self.quantization['bnb_4bit_quant_type']}" if self.quantization else "") + ")",
            f"attention: {self.attn_implementation}, soft-caps attention {self.attention_softcap} / final {self.final_softcap}",
            f"trainable params: {self.trainable_params:,} of {self.total_params:,} ({pct:.3f}%)"
            + (f" in {self.lora_modules} LoRA modules on {self.lora_targets}" if self.lora_modules else ""),
        ]


def _softcaps(config) -> tuple[float | None, float | None]:
    return getattr(config, "attn_logit_softcapping", None), getattr(config, "final_logit_softcapping", None)


def check_loaded(model, cfg: RunConfig) -> list[str]:
    """What is actually in use, checked against what was asked. Returns warnings; raises on contradictions."""
    in_use = model.config._attn_implementation
    if in_use != cfg.model.attn_implementation:
        raise UserError(
            f"model.attn_implementation: asked for {cfg.model.attn_implementation} but the model runs {in_use}"
        )
    found = []
    attn_cap, final_cap = _softcaps(model.config)
    if attn_cap is None or final_cap is None:
        found.append(f"soft-capping is disabled in this checkpoint's config (attention {attn_cap}, final {final_cap})")
    elif (attn_cap, final_cap) != (ATTENTION_SOFTCAP, FINAL_SOFTCAP):
        found.append(f"unusual soft-caps: attention {attn_cap}, final {final_cap} (Gemma 2: {ATTENTION_SOFTCAP}/{FINAL_SOFTCAP})")
    if model.config.hidden_size == GEMMA2_27B_HIDDEN and cfg.model.dtype == "float16":
        raise UserError("model.dtype: float16 is unstable for Gemma 2 27B (this checkpoint has 27B's shape); use bfloat16")
    return found


def keep_4bit_layout_trainable(model) -> int:
    """On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for an inference kernel on the first
    eval-mode forward (e.g. an evaluation during training). That kernel has no backward: training steps after
    it would silently lose the gradient through every 4-bit layer. Keep the layout the training kernel uses."""
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def inspect_adapters(model, cfg: RunConfig, report: ModelReport) -> None:
    """After PEFT wrapped the model: LoRA sits exactly where asked, and what trains is counted."""
    if cfg.lora.enabled:
        targets, count = lora_placement(model)
        if targets != sorted(cfg.lora.target_modules):
            raise UserError(
                f"lora.target_modules: asked for {sorted(cfg.lora.target_modules)} but LoRA landed on {targets}"
            )
        report.lora_targets, report.lora_modules = targets, count
    report.trainable_params, report.total_params = count_params(model)


def lora_placement(model) -> tuple[list[str], int]:
    """Leaf names of modules carrying LoRA weights, and how many there are."""
    names = [name for name, module in model.named_modules() if hasattr(module, "lora_A") and len(module.lora_A)]
    return sorted({n.rsplit(".", 1)[-1] for n in names}), len(names)


def count_params(model) -> tuple[int, int]:
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 leaves each rank an empty placeholder
        if p.__class__.__name__ == "Params4bit":
            n *= p.element_size() * 2  # each stored byte packs two 4-bit weights
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def load_model(cfg: RunConfig, device_map: Any = None):
    """Load the Gemma 2 model as configured and check it; -> (model, ModelReport). LoRA is applied by the trainer."""
    from transformers import AutoModelForCausalLM

    check_attention_request(cfg)
    check_architecture(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
    location = model_location(cfg.model.name_or_path)
    quant = bnb_config(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location,
            revision=cfg.model.revision,
            trust_remote_code=cfg.model.trust_remote_code,
            attn_implementation=cfg.model.attn_implementation,
            dtype=torch_dtype(cfg.model.dtype),
            quantization_config=quant,
            device_map=device_map,
        )
    except Exception as exc:  # noqa: BLE001
        raise UserError(_loading_hint("weights", cfg.model.name_or_path, exc)) from None
    model.config.use_cache = False  # training; the cache also breaks per-document masking of packed rows
    keep_4bit_layout_trainable(model)
    found = check_loaded(model, cfg)
    attn_cap, final_cap = _softcaps(model.config)
    report = ModelReport(
        name_or_path=cfg.model.name_or_path,
        location=location,
        attn_implementation=model.config._attn_implementation,
        attention_softcap=attn_cap,
        final_softcap=final_cap,
        layer_types=list(getattr(model.config, "layer_types", []) or []),
        hidden_size=model.config.hidden_size,
        num_layers=model.config.num_hidden_layers,
        load_dtype=cfg.model.dtype,
        quantization=quant.to_dict() if quant is not None else None,
        warnings=found,
    )
    return model, report
