"""The `distill` schema: on-policy distillation from a teacher (TRL's DistillationTrainer).

data.* gives the prompts (each row's conversation up to its last user turn); the student is model/quantization/
lora; `teacher` and `distill` are this method's own sections. sft's packing, loss and kernel keys are unknown
keys here: the student's completions are generated, scored whole, unpacked.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ..families import Shape, family_of_checkpoint
from .memory import DTYPE_BYTES, divergence_bytes, frozen_weight_bytes, trl_tile_bytes
from .rules import MIN_PROMPT_TOKENS, checkpoint_size, generating_model_problem, model_problems, run_problems
from .schema import FrozenModel, OutputSection, RunConfig, Section


class TeacherSection(Section):
    """The model the student learns from: frozen, in eval mode, checked like the student after loading."""

    name_or_path: str = Field(
        "google/gemma-2-27b-it",
        description="Hub id or local directory of the teacher: same family, tokenizer and vocabulary as the "
        "student (Gemma 2 sizes share them); usually larger and instruction-tuned.",
    )
    revision: str | None = Field(None, description="Hub revision of the teacher.")
    load_in: Literal["4bit", "8bit", "full"] = Field(
        "4bit",
        description="Teacher precision: 4-bit NF4 (the student's 4-bit settings), 8-bit, or `full`: unquantized in "
        "model.dtype (bf16 by default; required under ZeRO-3, which shards it).",
    )
    attn_implementation: Literal["eager", "flex_attention", "sdpa", "flash_attention_2"] = Field(
        "eager", description="The teacher's attention kernel; the same rules as model.attn_implementation."
    )
    trust_remote_code: bool = Field(False, description="Passed to transformers when loading the teacher.")


class DistillSection(Section):
    """On-policy distillation (TRL's DistillationTrainer): the student generates, the divergence to the
    teacher's distribution on those completions is minimised."""

    beta: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Generalized Jensen-Shannon divergence: 0 = forward KL(teacher || student), 1 = reverse "
        "KL(student || teacher), 0.5 = JSD (Agarwal et al. 2024, the on-policy distillation Gemma 2 used).",
    )
    temperature: float = Field(
        1.0, gt=0.0, description="Sampling temperature of the student's completions, and of both distributions in "
        "the divergence (the same on both sides).")
    max_completion_length: int = Field(256, gt=0, description="Tokens generated per completion at most.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling of the student's completions.")
    top_k: int = Field(0, ge=0, description="Top-k sampling of the student's completions (0: off).")
    loss: Literal["auto", "completion_rows", "trl"] = Field(
        "auto",
        description="How the divergence is computed. `completion_rows`: at the generated positions only, whole "
        "vocabulary rows in fp32 blocks, each model's lm_head applied once per step and the student's gradient formed "
        "in the same pass. `trl`: TRL's chunked divergence (its Triton kernels on CUDA/XPU; elsewhere it projects "
        "every completion position, padding included, three times per step for the JSD, twice for beta 0 or 1). "
        "`auto`: `trl` where TRL's Triton kernels run (CUDA or XPU with Triton), else `completion_rows` (CPU). TRL's "
        "is kept for a sharded lm_head (ZeRO-3), a bias or a logit scale.",
    )

    @property
    def divergence(self) -> str:
        """What `beta` makes the generalized JSD: 'forward KL', 'reverse KL' or 'JSD(beta=...)'."""
        return "forward KL" if self.beta == 0 else "reverse KL" if self.beta == 1 else f"JSD(beta={self.beta})"


class DistillConfig(RunConfig):
    """The `distill` schema: a training run (student = model/quantization/lora) plus a teacher and the
    divergence. data.* gives the prompts: each row's conversation up to its last user turn."""

    method: Literal["distill"] = Field("distill", description=RunConfig.model_fields["method"].description)
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    distill: DistillSection = Field(default_factory=DistillSection)
    output: OutputSection = Field(default_factory=lambda: OutputSection(dir="runs/gemma2-distill"))

    data_kind: ClassVar[str] = "prompts"

    def problems(self) -> tuple[list[str], list[str]]:
        """distill_problems."""
        return distill_problems(self)

    def frozen_models(self) -> list[FrozenModel]:
        """The teacher."""
        t = self.teacher
        return [FrozenModel("teacher", t.name_or_path, t.load_in, t.attn_implementation)]

    @property
    def generation_length(self) -> int:
        """The student's completions: distill.max_completion_length tokens at most."""
        return self.distill.max_completion_length

    @property
    def item_unit(self) -> str:
        """A batch item is a prompt."""
        return "prompt"

    def data_line(self) -> str:
        """Prompts in Gemma turns, prompt + completion within data.max_length."""
        return (f"prompts in Gemma turns (each row up to its last user turn), system messages "
                f"'{self.data.system_policy}', prompt + completion <= {self.data.max_length} tokens")

    def method_lines(self) -> list[str]:
        """The teacher and the divergence."""
        t, d = self.teacher, self.distill
        return [
            f"teacher:      {t.name_or_path} ({t.load_in}, attention {t.attn_implementation}), frozen",
            f"distill:      on-policy: the student writes up to {d.max_completion_length} tokens per prompt "
            f"(temperature {d.temperature}, top_p {d.top_p}); {d.divergence} to the teacher on those tokens",
        ]

    def memory_terms(self, student: Shape, b: int, t: int, n: int, shards: bool,
                     frozen: dict[str, Shape]) -> dict[str, float]:
        """A distillation teacher's memory: weights (4-bit as the student's 4-bit settings, 8-bit with per-row
        scales, or full precision sharded), one layer's forward at a time (no gradients), the student's KV cache
        while it generates (batch x accumulation prompts at once, in model.dtype), and the divergence: the larger
        of ours (divergence_bytes) and TRL's (fp32 tiles of both models' logits, x3 with temporaries, + both hidden
        states), which `auto` picks by device."""
        teacher = frozen.get("teacher") or student
        dtype = DTYPE_BYTES[self.model.dtype]
        weights = frozen_weight_bytes(teacher, self.teacher.load_in, self, n)
        scores = b * teacher.heads * t * t * 6 if self.teacher.attn_implementation == "eager" else 0
        forward = scores + (4 * teacher.hidden + 4 * teacher.intermediate) * b * t * 2
        generation_batch = b * self.training.gradient_accumulation_steps  # prompts generated for at once
        kv_cache = generation_batch * t * student.layers * 2 * student.kv_heads * student.head_dim * dtype
        trl = 2 * trl_tile_bytes(student.vocab, b * t) + b * t * (student.hidden + teacher.hidden) * 8
        ours = divergence_bytes(student, teacher, b * t, weights_fp32=self.model.dtype == "float32")
        loss = {"trl": trl, "completion_rows": ours}.get(self.distill.loss, max(trl, ours))
        return {"teacher weights": weights, "teacher forward (no gradients)": forward, "generation KV cache": kv_cache,
                "loss": loss}


def distill_problems(cfg: "DistillConfig") -> tuple[list[str], list[str]]:
    """A distillation run's rules: the student's (run_problems), then the teacher's: a supported family that
    is the student's (one tokenizer and vocabulary), a kernel that keeps its numerics, and not smaller than
    the student (warned). Decided from names and local config.json files, without torch."""
    errors, warnings = run_problems(cfg)
    if cfg.data.enable_thinking:  # the trainer renders prompts through the template with its defaults
        errors.append(f"data.enable_thinking: not yet for `{cfg.method}` (its prompts are rendered with thinking off)")
    t = cfg.teacher
    problem = generating_model_problem(t.name_or_path, "teacher.name_or_path")
    teacher_errors, teacher_warnings = ([problem], []) if problem else \
        model_problems(t.name_or_path, t.attn_implementation, cfg.model.dtype, "teacher")
    errors += teacher_errors
    warnings += teacher_warnings
    if cfg.data.max_length - cfg.distill.max_completion_length < MIN_PROMPT_TOKENS:
        errors.append(f"distill.max_completion_length ({cfg.distill.max_completion_length}) leaves no room for a "
                      f"prompt in data.max_length ({cfg.data.max_length}), which holds prompt + completion")
    if cfg.data.eval_split:
        errors.append("data.eval_split: distill holds prompts out with data.eval_fraction (the eval divergence is "
                      "measured on the student's own completions)")
    student, teacher = family_of_checkpoint(cfg.model.name_or_path), family_of_checkpoint(t.name_or_path)
    if student and teacher and student is not teacher:
        errors.append(f"teacher.name_or_path: '{t.name_or_path}' is {teacher.display} but the student "
                      f"'{cfg.model.name_or_path}' is {student.display}: distillation compares next-token "
                      "distributions over one vocabulary, so both must share the tokenizer")
    if student and teacher is student:
        s_size, t_size = checkpoint_size(student, cfg.model.name_or_path), checkpoint_size(teacher, t.name_or_path)
        if s_size in student.shapes and t_size in teacher.shapes and (
                teacher.shapes[t_size].total_params < student.shapes[s_size].total_params):
            warnings.append(f"teacher.name_or_path: the teacher ({t_size.upper()}) is smaller than the student "
                            f"({s_size.upper()}); distillation usually goes from a larger model to a smaller one")
    return errors, warnings
