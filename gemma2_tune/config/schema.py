"""The sections every training method's config shares, and their base `RunConfig`; each method's schema
(config/sft.py, config/distill.py) composes them with its own. One validated object per run is the single
source of truth.

Every default lives here, next to the reason for it. Field descriptions are written once and reused
by `--help`, `validate`, `--dry-run` and the README's config reference.

This module must stay light (pydantic and the standard library only): `validate` and `--help`
answer without importing torch. Rules between fields live in `rules.py`; facts about models in
`gemma2_tune.families`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..families import GEMMA2

REFERENCE_TARGET_MODULES = list(GEMMA2.attention_modules)  # the Gemma 2 launch recipe: q/k/v/o, never the MLP
# Tile of the supervised-only loss (gemma2_tune/training/loss.py): token rows x vocabulary columns, fp32.
LOSS_TOKEN_CHUNK = 1024
LOSS_VOCAB_CHUNK = 8192
# distill's divergence (gemma2_tune/training/divergence.py): vocabulary rows per block (six fp32 buffers of rows x
# vocabulary), from both models' hidden widths: each block reads both lm_heads once, so wide heads want more rows, up
# to where the buffers leave the cache. Measured on 2 CPU cores, forward + backward, 256 positions: hidden 64 + 128 at
# 256,000 entries, 8/16/32/64 rows: 2.27/1.49/1.36/1.26 s (64 positions: 0.49/0.38/0.41/0.42 s); Gemma 3 270M + 1B
# widths (640 + 1,152) at 262,144 entries, bf16 heads, 16/32/64/128/256 rows: 15.9/8.7/6.6/7.5/9.6 s.
DIVERGENCE_ROWS_PER_WIDTH = 12  # (hidden_s + hidden_t) / 12 rows: 16 at 64 + 128, 64 (the cap) at 640 + 1,152
DIVERGENCE_ROWS = (16, 64)  # least and most rows per block: 6 x 64 x 262,144 x 4 B = 384 MiB of buffers at most
# ... and lm_head weights stored in bf16/fp16 are copied to fp32 once per step when both copies fit this budget (a
# Gemma 3 270M student with a 1B teacher: 1.8 GiB), else cast a slice at a time in every block (measured with those
# widths and 256 positions in blocks of 32 rows: 17.5 s forward against 8.6 s with the copies)
DIVERGENCE_CAST_BYTES = 2 * 2**30

Dtype = Literal["bfloat16", "float16", "float32"]

if TYPE_CHECKING:
    from .runs import AdapterRun


class Section(BaseModel):
    """A config section: unknown keys are errors (with a did-you-mean), assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    """Which checkpoint, in which precision, with which attention kernel."""

    name_or_path: str = Field(
        "google/gemma-2-9b",
        description="Hub id or local directory of a Gemma 2 or Gemma 3 text checkpoint; `builtin:tiny-gemma2` "
        "and `builtin:tiny-gemma3` are tiny random models built locally (CPU quickstart and tests); "
        "`builtin:gemma-3-270m` is the real Gemma 3 270M, built from the Python package registry.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    attn_implementation: Literal["eager", "flex_attention", "sdpa", "flash_attention_2"] = Field(
        "eager",
        description="Attention kernel. `eager` keeps Gemma 2's attention soft-capping; `flex_attention` keeps it too "
        "(inside the kernel; trains on CUDA only: no CPU backward); `sdpa` is refused for Gemma 2 (it drops the "
        "soft-cap) and allowed for Gemma 3 (no soft-cap); `flash_attention_2` only with a flash-attn that "
        "supports softcap (Gemma 2).",
    )
    dtype: Dtype = Field(
        "bfloat16",
        description="Weights and compute dtype. bfloat16 is the reference precision; float16 is refused for "
        "Gemma 2 27B (unstable) and warned against elsewhere.",
    )
    trust_remote_code: bool = Field(False, description="Passed to transformers when loading.")
    train_projector: bool = Field(
        False,
        description="Image + text checkpoints: also train the image projector (the layer that maps the image "
        "encoder's features into the decoder: Gemma 3's multi_modal_projector, Gemma 4's embed_vision), fully "
        "(with LoRA too: PEFT's modules_to_save). The image encoder itself always stays frozen.",
    )


class QuantizationSection(Section):
    """bitsandbytes 4-bit loading of the base weights (QLoRA)."""

    load_in_4bit: bool = Field(True, description="QLoRA: load the base weights in 4-bit with bitsandbytes.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Dtype | None = Field(None, description="Dtype of 4-bit matmuls; default: model.dtype.")
    quant_storage: Dtype | Literal["uint8"] | None = Field(
        None,
        description="Storage dtype of packed 4-bit weights; default: the compute dtype (needed for ZeRO-3 / FSDP "
        "sharding).",
    )


class LoraSection(Section):
    """LoRA adapters (PEFT): rank, scale, dropout and the modules they adapt."""

    enabled: bool = Field(True, description="Train LoRA adapters; false means full fine-tuning.")
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(REFERENCE_TARGET_MODULES),
        description="Modules to adapt, checked against the model's projections (q/k/v/o_proj, gate/up/down_proj); "
        "the tied lm_head/embed_tokens are refused. Gemma 2 reference: q/k/v/o, never the MLP.",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")


class DataSection(Section):
    """Where rows come from and how they become training tokens."""

    dataset: str = Field(
        "oasst",
        description="`oasst` (OpenAssistant/oasst_top1_2023-08-25), `quickstart` or `pirate` (chats shipped with "
        "the package), a hub dataset id, or a local .jsonl/.json/.parquet/.csv file or folder.",
    )
    config_name: str | None = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", description="Dataset split to train on.")
    revision: str | None = Field(None, description="Hub dataset revision.")
    system_policy: Literal["fold", "drop", "error"] = Field(
        "fold",
        description="System messages: `fold` into the first user turn, `drop` them, or treat them as bad rows "
        "(`error`). Gemma has no system role.",
    )
    unsupported_fields: Literal["bad_row", "ignore"] = Field(
        "bad_row",
        description="Rows with what Gemma's turn format cannot express (`tools`/`functions` definitions, "
        "`images`/`audio`/`video`, messages with `tool_calls`): bad rows naming the field, or `ignore` the field "
        "and train on the text (counted in run.json).",
    )
    enable_thinking: bool = Field(
        False,
        description="Gemma 4: render rows with thinking on, as the -it template does with enable_thinking=True "
        "(<|think|> first in the system turn; a message's `reasoning`/`reasoning_content` in the thought channel). "
        "Rows with reasoning need it; Gemma 2 and Gemma 3 have no thinking mode.",
    )
    on_bad_rows: Literal["skip", "error"] = Field(
        "skip", description="Rows that can't become valid Gemma turns: `skip` (counted, reported) or fail the run."
    )
    max_length: int = Field(1024, gt=8, description="Maximum tokens per training row.")
    max_rows: int | None = Field(None, gt=0, description="Use at most this many rows (after loading).")
    eval_fraction: float = Field(
        0.0, ge=0.0, lt=0.5, description="Hold out this fraction of rows (seeded) for evaluation during training."
    )
    eval_split: str | None = Field(None, description="Or evaluate on this split of the same dataset (e.g. test).")

    def describe(self) -> str:
        """How rows become training text, in a few words (model card, dry run)."""
        return f"system messages '{self.system_policy}'" + (", thinking on" if self.enable_thinking else "")


class SftDataSection(DataSection):
    """Conversations for supervised fine-tuning: how long rows are handled, where the loss is, packing."""

    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="Rows longer than max_length: cut at max_length, or drop the row. Both are counted."
    )
    train_on: Literal["model_turns", "all"] = Field(
        "model_turns",
        description="Loss on model turns only (each with its <end_of_turn>), or on every token.",
    )
    packing: bool = Field(
        True,
        description="Pack rows into blocks of max_length tokens (best-fit), each row masked from the others "
        "(position ids restart, no cache); a batch item is then a block. False: one row per batch item. Rows with "
        "images are never packed (each is a block of its own; the run says how many).",
    )
    pan_and_scan: bool = Field(
        False,
        description="Gemma 3 image + text: also feed crops of wide or tall images (Gemma3Processor's pan-and-scan: "
        "up to 4 crops more, 256 image tokens each), as the model's authors did for non-square images; off as in "
        "their processor's default. Refused for Gemma 4 (its processor keeps each image's aspect ratio instead).",
    )
    max_image_mb: float = Field(
        20.0, gt=0,
        description="Rows with images: an image file (or data: URL) larger than this many MiB makes its row bad "
        "(OpenAI's per-image limit); images over Pillow's decompression-bomb limit (89.5 megapixels) always do.",
    )

    def describe(self) -> str:
        """How rows become training text, in a few words (model card, dry run)."""
        return (f"loss on {self.train_on.replace('_', ' ')}, system messages '{self.system_policy}', packing "
                f"{'on' if self.packing else 'off'}" + (", thinking on" if self.enable_thinking else ""))


class PreferenceDataSection(DataSection):
    """Preference pairs (dpo, reward) or unpaired labelled completions (kto): how over-long pairs are handled."""

    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="Pairs longer than max_length (prompt + answer, per side): cut both answers at the "
        "same point (the prompt is never cut), or drop the pair. Both are counted."
    )
    eval_dataset: str | None = Field(
        None, description="Held-out pairs from another dataset (e.g. `concise-held-out`), read and checked like the "
        "training pairs; evaluated every training.eval_steps and at the end (preference accuracy, reward margin)."
    )


class TrainingSection(Section):
    """Optimizer, schedule, batch shape, checkpointing and logging (passed to TRL's SFTConfig)."""

    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    per_device_train_batch_size: int = Field(1, gt=0, description="Rows per device per micro-batch.")
    gradient_accumulation_steps: int = Field(4, gt=0, description="Micro-batches per optimizer step.")
    num_train_epochs: float = Field(1.0, gt=0, description="Epochs over the data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps to run; overrides num_train_epochs.")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule."
    )
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optim: str = Field("adamw_torch", description="transformers optimizer name (e.g. adamw_torch, paged_adamw_8bit).")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward to save memory.")
    logging_steps: int = Field(10, gt=0, description="Log loss every N optimizer steps.")
    eval_steps: int = Field(100, gt=0, description="Evaluate on the held-out rows every N steps (and at the end).")
    save_steps: int | None = Field(
        500, gt=0, description="Save a resumable checkpoint every N optimizer steps (null: none, only the final output)."
    )
    save_total_limit: int = Field(2, gt=0, description="Keep only the newest K checkpoints.")
    seed: int = Field(42, description="Seed for data order, LoRA init and dropout.")
    ema_decay: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="Keep an exponential moving average of the trainable weights with this decay (e.g. 0.999; the "
        "first stage of Gemma 2's WARP), updated after every optimizer step, kept in float32, carried by "
        "checkpoints and written as a second adapter or model in `<output.dir>/ema/` (null: none).",
    )
    report_to: Literal["none", "wandb", "tensorboard"] = Field("none", description="Experiment tracker.")


class SftTrainingSection(TrainingSection):
    """Supervised fine-tuning's own training settings: accumulation folding, kernels, the loss."""

    fold_accumulation: Literal["auto"] | bool = Field(
        "auto",
        description="Run the accumulated micro-batches of a step as fewer, larger ones (same items and tokens per "
        "optimizer step, same gradient): `auto` folds as far as `plan`'s memory model says the GPU allows (not on "
        "CPU), `true` folds all of them into one, `false` runs them as configured.",
    )
    torch_compile: Literal["off", "regional"] = Field(
        "off",
        description="`regional`: torch.compile each decoder layer in place (PyTorch's regional compilation), after "
        "a check that the compiled logits and first-layer trainable gradients equal eager ones on a probe batch; "
        "fuses a layer's small kernels on CUDA. `off`: plain eager modules.",
    )
    use_liger_kernel: bool = Field(
        False,
        description="Liger's Triton kernels for Gemma's RMSNorm (with its +1 offset), GeGLU and RoPE (CUDA only; "
        "pip install 'gemma2-tune[liger]'), applied after a check that logits and trainable gradients on a probe "
        "batch equal the plain model's. Attention, soft-caps and `training.loss` are unchanged.",
    )
    loss: Literal["supervised_chunked", "supervised_liger", "trl"] = Field(
        "supervised_chunked",
        description="`supervised_chunked`: lm_head, soft-cap and cross-entropy only at supervised positions, in "
        "fp32 tiles (no full logits). `supervised_liger`: the same positions through Liger's fused linear "
        "cross-entropy with the final soft-cap (CUDA only; lm_head in the model's dtype), after a probe check "
        "against `supervised_chunked`. `trl`: TRL's own loss. Under ZeRO-3 TRL's loss is used (`supervised_liger` "
        "is refused there).",
    )


class OutputSection(Section):
    """Where the run writes, and whether it may replace a previous run there."""

    dir: str = Field("runs/gemma2-sft", description="Output directory for adapter, tokenizer, config and manifest.")
    overwrite: bool = Field(False, description="Allow replacing the output of a previous run in `dir`.")


class FrozenModel(NamedTuple):
    """A model a method loads beside the one it trains (a teacher, a reference, a reward model): frozen, never
    saved. `key` is its config section (teacher, ...); `load_in` 4bit, 8bit or full (model.dtype)."""

    key: str
    name_or_path: str
    load_in: str
    attn_implementation: str


class RunConfig(Section):
    """What every training method's config has: the model trained, its quantization and adapters, the data,
    the optimizer and schedule, the output folder. A method's schema (config/sft.py, config/distill.py, ...)
    composes these with its own sections, narrows `method`, and declares its rules (`problems`), the models
    it loads beside the trained one (`frozen_models`), and its dry-run lines (`method_lines`); nothing outside
    a method's own modules asks which method is running. Resolved: defaults < recipe < --set < flags."""

    method: str = Field("sft", description="The training method (sft, distill, dpo, reward, rl): picks the schema; "
                        "recipes without it are sft, or the method whose own section they have (`teacher`/`distill`: "
                        "distill, `dpo`: dpo, `reward`: reward, `rl`: rl).")
    model: ModelSection = Field(default_factory=ModelSection)
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection = Field(default_factory=DataSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    output: OutputSection = Field(default_factory=OutputSection)

    # What the data rows become for this method: "conversations" (sft), "prompts" (distill, rl), "preference
    # pairs" (dpo, reward). Read by the dry run, the data summary and `plan`.
    data_kind: ClassVar[str] = "conversations"
    # For a method that writes completions to prompts: who writes them, and what is done with them (the preview).
    completion_writer: ClassVar[tuple[str, str]] = ("the student", "scored against the teacher")

    def reward_functions(self) -> list[Any]:
        """The Python reward functions the run calls (rl's), each with path, name and weight; none by default."""
        return []

    # The run may fold accumulated micro-batches into one forward (training/batching.py; `plan` shows the
    # micro-batch it will use).
    folds_accumulation: ClassVar[bool] = False

    def problems(self) -> tuple[list[str], list[str]]:
        """The method's rules between fields: (errors, warnings), each naming its key(s). Overridden by every
        method (most start from `rules.run_problems`)."""
        return [], []

    def memory_terms(self, shape: Any, b: int, t: int, n: int, shards: bool,
                     frozen: dict[str, Any]) -> dict[str, float]:
        """The bytes per process the method adds to the shared terms of config/memory.estimate (its loss at least,
        the models it runs beside the trained one): {term: bytes}. `shape`: the trained model's (families.Shape);
        `b` items per forward of `t` tokens; `n` processes sharding the parameters (1 without sharding); `frozen`:
        the shapes of the models it loads beside the trained one, by config key. Every method defines it."""
        raise NotImplementedError(f"{type(self).__name__} defines no memory terms")

    def launch_problems(self, launch: Any) -> list[str]:
        """The method's own keys against how its processes are started (training/launch.py's Launch: read its
        capabilities, never its mode); the shared rules are training/launch.launch_problems'. None by default."""
        return []

    @property
    def preference_kind(self) -> str:
        """How a method reads preference data: 'paired' (chosen/rejected) or 'unpaired' (KTO's labelled answers)."""
        return "paired"

    # What the trained model outputs: "causal-lm" (next-token logits) or "sequence-classification" (one score per
    # sequence: reward models). Read by the model card and by the commands that load a run (chat, merge).
    head: ClassVar[str] = "causal-lm"

    # Whether model.name_or_path may be a run folder with a LoRA adapter (the previous stage's run, taken as it is:
    # its adapter is trained further on its base): dpo, reward and rl. Other methods refuse one (rules).
    continues_runs: ClassVar[bool] = False

    @model_validator(mode="before")
    @classmethod
    def _continuing_a_run(cls, data: Any) -> Any:
        """model.name_or_path naming a folder with a LoRA adapter, for a method that continues runs: the raw
        settings as `continue_run` gives them (unreadable folders are left to the rules, which name them)."""
        if not cls.continues_runs or not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            return data
        name = data["model"].get("name_or_path")
        if not isinstance(name, str):
            return data
        from .runs import adapter_run

        try:
            start = adapter_run(name)
        except ValueError:
            return data
        return cls.continue_run(data, start) if start else data

    @classmethod
    def continue_run(cls, data: dict[str, Any], start: "AdapterRun") -> dict[str, Any]:
        """The raw settings of a run that trains `start`'s adapter further: lora.r, lora.alpha and
        lora.target_modules not given are the adapter's (given ones must equal them: rules.start_problems)."""
        from .runs import with_adapter_lora

        return with_adapter_lora(data, start)

    @property
    def start(self) -> "AdapterRun | None":
        """The run this one continues (runs.adapter_run: the folder with the adapter trained further, and its
        base), for a method that continues runs; None otherwise, or when the folder can't be read (the rules
        say why)."""
        if not self.continues_runs:
            return None
        from .runs import adapter_run

        try:
            return adapter_run(self.model.name_or_path)
        except ValueError:
            return None

    @property
    def base_model(self) -> str:
        """The base checkpoint under the trained weights (what the run's adapter is applied to): the base of the run
        it continues (`start`), else model.name_or_path."""
        start = self.start
        return start.base if start else self.model.name_or_path

    def frozen_models(self) -> list[FrozenModel]:
        """Models loaded beside the trained one (their weights count in `plan`, they are inputs the output folder
        must not hold, and a sharded launch places them): none by default."""
        return []

    @property
    def item_unit(self) -> str:
        """What one batch item is, in words (row, packed block, prompt, pair)."""
        return "row"

    def data_line(self) -> str:
        """How the method reads its rows, for the dry run's data line (after the source)."""
        return f"{self.data_kind}, system messages '{self.data.system_policy}', max {self.data.max_length} tokens"

    def method_lines(self) -> list[str]:
        """What the dry run says about the method beyond the shared lines (model, data, training, output)."""
        return []

    @property
    def generation_length(self) -> int:
        """Tokens generated per prompt during training (0: the method generates nothing)."""
        return 0

    # Derived values: computed here once, read everywhere else.
    @property
    def compute_dtype(self) -> str:
        """Dtype of 4-bit matmuls: quantization.compute_dtype, else model.dtype."""
        return self.quantization.compute_dtype or self.model.dtype

    @property
    def quant_storage(self) -> str:
        """Storage dtype of packed 4-bit weights: quantization.quant_storage, else the compute dtype."""
        return self.quantization.quant_storage or self.compute_dtype

    @property
    def rows_per_optimizer_step(self) -> int:
        """Batch items (rows, or packed blocks) per optimizer step per process: batch x accumulation."""
        return self.training.per_device_train_batch_size * self.training.gradient_accumulation_steps


def sections(schema: type[Section]) -> dict[str, type[Section]]:
    """{section name: section class} of a command's schema, in order (for the config reference)."""
    return {name: f.annotation for name, f in schema.model_fields.items()
            if isinstance(f.annotation, type) and issubclass(f.annotation, Section)}


def method_schemas() -> list[type[RunConfig]]:
    """Every method's schema (the subclasses of RunConfig; config/__init__ imports them all), in import order."""
    found, todo = [], list(RunConfig.__subclasses__())
    while todo:
        sub = todo.pop(0)
        found.append(sub)
        todo[:0] = sub.__subclasses__()
    return found
