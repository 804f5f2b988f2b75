"""`gemma2-tune rl`: online reinforcement learning on prompts, rewarded by Python functions and/or a reward model.

The policy writes a group of `rl.num_generations` completions per prompt (stopping at <end_of_turn>), each is
rewarded (a weighted sum of reward functions and a frozen sequence-classification reward model), the advantage of
a completion is its reward against its group's, and the policy is updated with TRL's clipped, KL-regularised
objective: GRPOTrainer with one of its loss types (grpo, dapo, dr_grpo, bnpo, cispo, sapo) or RLOOTrainer
(leave-one-out baseline). The log-probabilities of the loss come from the one LM-head path of every method
(training/logprobs.py: completion positions only, fp32 tiles; TRL's fused head under ZeRO-3), which applies Gemma 2's
final soft-cap (30.0) and the sampling temperature as generation does; a probe before the first step refuses a
model where they differ. Around it: the same config layering, run lifecycle, checks, launches, EMA, checkpoints and
exact resume (epoch-seeded prompt order, generation RNG restored from the checkpoint) as `sft` and `distill`.

What it leaves out (on purpose, as nanochat's chat_rl.py says of its own): no value model (PPO's critic) and no
GAE: the group is the baseline; no multi-turn rollouts, tools or environments (TRL has them; one completion per
prompt here); no reward-model training (that is `gemma2-tune reward`); no asynchronous or off-policy generation
beyond `rl.num_iterations` passes over a batch; vLLM generation only as TRL's colocate mode on a GPU, untested
here (transformers' generate is the default and the tested path); no reward shaping beyond weights (a function
does its own).

setup (family, tokenizer, reward functions imported, reward model's config) -> prompts -> reward functions
called on a dummy batch -> policy (QLoRA, LoRA, full; or a run's adapter) + reward model (frozen) -> log-prob
probe -> train -> save.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any, Callable

from transformers import PrinterCallback, TrainerCallback

from ..config.rl import RlConfig
from ..data.prompts import build_prompts
from ..data.sources import load_rows
from ..data.template import template_record
from ..data.turns import end_of_turn
from ..errors import UserError
from ..models.checks import softcaps
from ..models.loading import load_model
from ..models.lora import continue_adapter, inspect_adapters, lora_config
from ..models.serving import stop_ids
from ..rewards import (ROW, RewardModelScorer, column_problems, columns_line, load_reward_function, load_reward_model,
                       reward_model_tokenizer, try_reward_functions)
from . import lifecycle
from .generation import CountingGeneration, run_total
from .launch import Launch
from .lifecycle import RunLifecycle
from .logprobs import describe_head, use_supervised_heads
from .trainer import common_args, device_map, has_accelerator, keep_adapters_in_fp32

Echo = Callable[[str], None]
# The log-prob probe's tolerance in float32, nats per token: both sides agree to ~1e-6 (probe_tolerance: bf16/fp16)
PROBE_TOLERANCE_FP32 = 1e-4
SIGNIFICANT_BITS = {"bfloat16": 8, "float16": 11}  # mantissa bits, the implicit one counted


# ------------------------------------------------------------------------------------------------------ trainers
class CountingCompletions(CountingGeneration):
    """Generation counted (training/generation.py), and the completions: how many, and how many truncated (no
    <end_of_turn> or <eos> within rl.max_completion_length), for GRPO and RLOO alike."""

    completions_generated = 0
    completions_truncated = 0

    def count_completions(self, completion_ids: list[list[int]]) -> None:
        stops = set(self.eos_token_ids) | {self._tokenizer.pad_token_id}
        self.completions_generated += len(completion_ids)
        self.completions_truncated += sum(1 for ids in completion_ids if not ids or ids[-1] not in stops)


def trainer_classes():
    """(GRPOTrainer, RLOOTrainer) with generation counted."""
    from trl import GRPOTrainer, RLOOTrainer

    class GemmaGRPOTrainer(CountingCompletions, GRPOTrainer):
        """TRL's GRPOTrainer, generation counted."""

    class GemmaRLOOTrainer(CountingCompletions, RLOOTrainer):
        """TRL's RLOOTrainer, generation counted."""

    return GemmaGRPOTrainer, GemmaRLOOTrainer


def rl_args(cfg: RlConfig, out: Path, launch: Launch, weights: list[float]):
    """TRL's GRPOConfig (or RLOOConfig) from the resolved config, built before any model loads. `weights`: one
    per reward (the functions in order, then the reward model)."""
    from trl import GRPOConfig, RLOOConfig

    r = cfg.rl
    config_class = RLOOConfig if r.algorithm == "rloo" else GRPOConfig
    common = common_args(config_class, cfg, out, launch, evaluate=bool(cfg.data.eval_fraction))
    # evaluation generates a group per held-out prompt: an eval batch is whole groups
    common["per_device_eval_batch_size"] = r.num_generations
    args = dict(
        num_generations=r.num_generations, beta=r.beta, epsilon=r.epsilon, epsilon_high=r.epsilon_high,
        num_iterations=r.num_iterations, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
        max_completion_length=r.max_completion_length, mask_truncated_completions=r.mask_truncated_completions,
        reward_weights=weights,
        # the loss's log-probabilities must be those the completions were sampled from: no dropout noise in them
        disable_dropout=True,
        use_vllm=r.use_vllm, vllm_mode="colocate", log_completions=False, remove_unused_columns=False,
    )
    if r.algorithm != "rloo":
        args |= dict(loss_type=r.algorithm, scale_rewards=r.scale_rewards)
    return config_class(**common, **args)


def lm_heads(trainer, cfg: RlConfig, launch: Launch) -> dict[str, str]:
    """The policy's (old policy's, reference's) log-probabilities through the supervised-positions-only head
    (training/logprobs.py) in place of TRL's; TRL 1.16's GRPO/RLOO ask their head for the entropy too. Returns the
    record (which head, why)."""
    return use_supervised_heads(trainer, ("log_probs", "entropy"), temperature=cfg.rl.temperature,
                                sharded=launch.shards_parameters,
                                entropy_gradient=getattr(trainer, "_entropy_bonus_enabled", False))


def vllm_problem() -> str | None:
    """Why vLLM generation cannot run here (None: it can)."""
    if not has_accelerator():
        return "no CUDA GPU is visible (vLLM generates on a GPU)"
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install vllm, a version TRL supports)"
    return None


# ----------------------------------------------------------------------------------------------- log-prob parity
def probe_tolerance(dtype: str, max_abs_logit: float, final_softcap: float | None, temperature: float) -> float:
    """The largest log-probability gap (nats) rounding alone explains between TRL's loss, computed in `dtype`, and
    the plain fp32 forward. float32: PROBE_TOLERANCE_FP32. bfloat16/float16: the LM head's output is rounded to
    `dtype` (at most half a unit in the last place at the largest |logit|, `max_abs_logit`: 0.125 for logits in
    [32, 64) in bf16; real Gemma 3 270M reaches ~65, Gemma 2's pre-cap logits pass 30), then the soft-cap's three
    operations (divide, tanh, multiply: half a unit each at |logit| <= cap); a log-probability is a logit minus the
    log-sum-exp, each off by that much (x2), divided by `temperature`; plus 0.01 for the order of accumulation."""
    if dtype not in SIGNIFICANT_BITS:
        return PROBE_TOLERANCE_FP32
    bits = SIGNIFICANT_BITS[dtype]

    def half_ulp(x: float) -> float:
        return 2.0 ** (math.floor(math.log2(max(x, 2.0 ** -14))) - bits)

    per_logit = half_ulp(max_abs_logit) + (3 * half_ulp(final_softcap) if final_softcap else 0.0)
    return 2 * per_logit / temperature + 0.01


def logprob_gap(trainer, input_ids, attention_mask, completion_length: int, final_softcap: float | None,
                temperature: float) -> tuple[float, float]:
    """(largest |difference| in nats, largest |logit|) between the per-token log-probabilities TRL's loss uses
    (`_get_per_token_logps_and_entropies`, its fused LM head) and a plain forward: the backbone's hidden states
    through the LM head in fp32, soft-capped with `final_softcap` (cap * tanh(z / cap); None: none), divided by
    `temperature`, log-softmax; the largest |logit| is before the soft-cap, over the scored positions.
    input_ids/attention_mask: (B, T), the last `completion_length` positions scored."""
    import torch

    from ..models.lora import base_model

    model = trainer.model
    with torch.no_grad():
        ours, _, _ = trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, completion_length)
        base = base_model(model)
        hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = hidden.last_hidden_state[:, -completion_length - 1:-1].float()
        logits = hidden @ base.get_output_embeddings().weight.float().T
        mask = attention_mask[:, -completion_length:].bool()
        largest = logits[mask].abs().max().item()
        if final_softcap:
            logits = final_softcap * torch.tanh(logits / final_softcap)
        plain = (logits / temperature).log_softmax(-1)
        plain = plain.gather(-1, input_ids[:, -completion_length:].unsqueeze(-1)).squeeze(-1)
    return (ours.float() - plain)[mask].abs().max().item(), largest


def check_logprob_parity(trainer, tokenizer, prompt: list[dict[str, str]], family,
                         cfg: RlConfig) -> tuple[float, float, float]:
    """The probe before the first step: TRL's loss log-probabilities == the soft-capped plain forward's on a
    rendered prompt + a short completion, within what rounding in model.dtype explains (probe_tolerance). Returns
    (gap, tolerance) in nats and the largest |logit| the tolerance follows; raises UserError when a model computes them without the family's final soft-cap (or
    otherwise differently)."""
    import torch

    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) + "Hello there."
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    device = trainer.accelerator.device
    ids = ids.to(device)
    gap, largest = logprob_gap(trainer, ids, torch.ones_like(ids), 4, family.final_softcap, cfg.rl.temperature)
    tolerance = probe_tolerance(cfg.model.dtype, largest, family.final_softcap, cfg.rl.temperature)
    if not gap <= tolerance:
        raise UserError(f"model.name_or_path: the log-probabilities of the RL loss differ by {gap:.3g} nats (more "
                        f"than {cfg.model.dtype} rounding explains at logits up to {largest:.1f}: {tolerance:.3g}) from "
                        f"{plain_forward(family)} (the model's config says final_logit_softcapping="
                        f"{softcaps(trainer.model.config)[1]}): "
                        "the loss would not be about the distribution completions are sampled from")
    return gap, tolerance, largest


def plain_forward(family) -> str:
    """What the probe compares with, in words."""
    if family.final_softcap:
        return f"a plain forward soft-capped at {family.final_softcap} ({family.display}'s final soft-cap)"
    return f"a plain forward without a final soft-cap ({family.display} has none)"


class EchoRewards(TrainerCallback):
    """One line per logging step with the mean reward, its spread in groups, the KL to the reference and the
    share of truncated completions."""

    def __init__(self, say: Echo):
        self.say = say

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ARG002
        if logs and "reward" in logs and state.is_world_process_zero:
            extra = f", KL {logs['kl']:.4f}" if "kl" in logs else ""
            clipped = logs.get("completions/clipped_ratio")
            self.say(f"  reward {logs['reward']:.4f} (std in groups {logs.get('reward_std', float('nan')):.3f})"
                     f"{extra}" + (f", truncated {clipped:.0%}" if clipped is not None else ""))


# ----------------------------------------------------------------------------------------------------- the runner
class Runner(lifecycle.Runner):
    """rl's pieces: the policy's family, tokenizer and kernel, the reward functions (imported, then tried on a
    dummy batch) and the reward model's config checked before any weights load; prompts; the policy (QLoRA,
    LoRA, full, or a run's adapter) and the reward model (frozen); TRL's GRPOTrainer or RLOOTrainer; a log-prob
    probe; generation and reward totals in run.json."""

    cfg: RlConfig

    def prepare(self, launch: Launch, out: Path):
        """Policy and rewards checked from configs, files and tokenizers; the run's template on the tokenizer;
        returns GRPOConfig/RLOOConfig. Raises UserError."""
        cfg, r = self.cfg, self.cfg.rl
        self.launch = launch
        if r.use_vllm:
            problem = vllm_problem()
            if problem:
                raise UserError(f"rl.use_vllm: {problem}; leave it false to generate with transformers")
        self.set_up_base(padding_side="left")  # generation pads prompts on the left
        family = self.family
        self.functions = [load_reward_function(f, f"rl.reward_functions[{i}]") for i, f in enumerate(r.reward_functions)]
        rm = cfg.reward_model
        self.reward_tokenizer, self.reward_template = reward_model_tokenizer(
            rm.name_or_path, "reward_model.name_or_path", family, cfg.data.system_policy, cfg.data.unsupported_fields,
            rm.trust_remote_code) if rm.name_or_path else (None, None)
        weights = [f.weight for f in r.reward_functions] + ([cfg.reward_model.weight] if self.reward_tokenizer else [])
        return rl_args(cfg, out, launch, weights)

    def load_data(self, run: RunLifecycle) -> dict[str, Any]:
        """Prompts (each row up to its last user turn) and their row columns, held-out prompts by
        data.eval_fraction; every reward function's parameters checked against the columns, then the function
        tried on a dummy batch. Nothing is written yet."""
        cfg, tokenizer, family, r = self.cfg, self.tokenizer, self.family, self.cfg.rl
        rows, source = load_rows(cfg.data)
        from .data import split_rows

        rows, held_out = split_rows(rows, cfg)
        self.prompts, report, columns = build_prompts(rows, tokenizer, cfg.data, family, r.max_completion_length,
                                                      empty_thought=self.empty_thought)
        self.eval_prompts, _, eval_columns = build_prompts(
            held_out, tokenizer, cfg.data, family, r.max_completion_length,
            empty_thought=self.empty_thought) if held_out else (None, None, [])
        self.data_report = report
        problems = column_problems(self.functions, columns + eval_columns)
        if problems:
            raise UserError("\n".join(problems))
        for fn in self.functions:  # what TRL's ROW column indexes: the training prompts, then the held-out ones
            fn.rows = columns + eval_columns
        try_reward_functions(self.functions, self.prompts[0], tokenizer, columns[0])
        for line in report.summary_lines()[:1] + report.summary_lines()[2:]:
            run.say(line)
        line = columns_line(self.functions, columns)
        if line:
            run.say(line)
        run.say(f"prompts: {len(self.prompts)} ({report.total_tokens:,} tokens); groups of {r.num_generations} "
                f"completions written by the policy, up to {r.max_completion_length} tokens, stopping at "
                f"{end_of_turn(family)}")
        return dict(
            dataset={"name": source.name, "kind": source.kind, "resolved": source.resolved, "files": source.files,
                     "fingerprint": source.fingerprint, "split": cfg.data.split},
            data=report.to_dict() | {"prompts": len(self.prompts), "eval_prompts": len(self.eval_prompts or [])},
            rl={"algorithm": r.algorithm, "trainer": "RLOOTrainer" if r.algorithm == "rloo" else "GRPOTrainer",
                "num_generations": r.num_generations, "beta": r.beta, "epsilon": r.epsilon,
                "epsilon_high": r.epsilon_high, "num_iterations": r.num_iterations,
                "scale_rewards": None if r.algorithm == "rloo" else r.scale_rewards, "temperature": r.temperature,
                "top_p": r.top_p, "top_k": r.top_k, "max_completion_length": r.max_completion_length,
                "mask_truncated_completions": r.mask_truncated_completions,
                "reward_functions": [f.model_dump() for f in r.reward_functions],
                "reward_function_columns": sorted({name for row in columns for name in row}),
                "reward_model": cfg.reward_model.name_or_path,
                "reward_model_template": self.reward_template,
                "initial_adapter": r.initial_adapter, "generation": "vllm" if r.use_vllm else "transformers",
                "on_policy": r.num_iterations == 1},
            chat_template=template_record(family, cfg, self.base_chat_template, self.empty_thought))

    def _load_policy(self, run: RunLifecycle):
        """The policy through the one loading path; a run's adapter on it, trainable, when starting from one.
        Returns (model, report, peft_config for TRL or None)."""
        from ..models.loading import LoadRequest

        cfg = self.cfg
        rank = run.state.local_process_index
        model, report = load_model(LoadRequest.for_run(cfg, device_map(cfg, self.launch, rank)))
        start = cfg.start
        if start is None:
            return model, report, lora_config(cfg, model)
        model = continue_adapter(model, start, trainable=True, key="rl.initial_adapter")
        report.name_or_path = f"{start.base} + adapter {start.folder}"
        return model, report, None

    def _load_reward_model(self, run: RunLifecycle):
        """The reward model, frozen and in eval mode; quantized weights placed at load, others by the trainer."""
        cfg, rm = self.cfg, self.cfg.reward_model
        bits = None if rm.load_in == "full" else rm.load_in
        device = ({"": run.state.local_process_index} if bits and has_accelerator()
                  and not self.launch.places_weights else None)
        return load_reward_model(rm.name_or_path, "reward_model.name_or_path", dtype=cfg.model.dtype, bits=bits,
                                 quantization=cfg.quantization, compute_dtype=cfg.compute_dtype,
                                 quant_storage=cfg.quant_storage, attn_implementation=rm.attn_implementation,
                                 trust_remote_code=rm.trust_remote_code, device_map=device)

    def build(self, run: RunLifecycle, args):
        """Policy and reward model through their loading paths; the trainer; the log-prob probe."""
        cfg, launch, r = self.cfg, self.launch, self.cfg.rl
        policy, report, peft = self._load_policy(run)
        # generation stops at <end_of_turn> (a base checkpoint's generation config may know only <eos>); TRL
        # takes its stop tokens, and what counts as truncated, from here
        policy.generation_config.eos_token_id = stop_ids(self.tokenizer)
        rewards: list[Any] = list(self.functions)
        scorer = None
        if self.reward_tokenizer is not None:
            scorer = RewardModelScorer(self._load_reward_model(run), self.reward_tokenizer,
                                       batch_size=cfg.training.per_device_train_batch_size)
            rewards.append(scorer)
        from datasets import Dataset

        grpo, rloo = trainer_classes()
        trainer_class = rloo if r.algorithm == "rloo" else grpo
        try:
            trainer = trainer_class(
                model=policy, reward_funcs=rewards, args=args,
                train_dataset=Dataset.from_dict({"prompt": self.prompts, ROW: list(range(len(self.prompts)))}),
                eval_dataset=Dataset.from_dict({"prompt": self.eval_prompts, ROW: list(range(
                    len(self.prompts), len(self.prompts) + len(self.eval_prompts)))}) if self.eval_prompts else None,
                processing_class=self.tokenizer, peft_config=peft)
        except ValueError as exc:  # TRL's own checks of its arguments (e.g. a batch of partial groups)
            raise UserError(f"rl: TRL refused the settings: {exc}") from None
        if scorer is not None:  # placed (or sharded) as TRL places a reward model it is given as a model
            from trl.models import prepare_deepspeed

            scorer.model = (prepare_deepspeed(scorer.model, trainer.accelerator) if trainer.is_deepspeed_enabled else
                            trainer.accelerator.prepare_model(scorer.model, evaluation_mode=True,
                                                              device_placement=True))
        trainer.remove_callback(PrinterCallback)
        keep_adapters_in_fp32(trainer, cfg, launch)
        head = lm_heads(trainer, cfg, launch)
        run.record["rl"]["lm_head"] = head
        run.record["rl"]["sampling"] = trainer.sampling
        run.record["loss_implementation"] = (f"trl {'RLOOTrainer' if r.algorithm == 'rloo' else 'GRPOTrainer'} "
                                             f"({r.algorithm}; log-probabilities from {describe_head(head)}, "
                                             "soft-capped)")
        trainer.add_callback(EchoRewards(run.say))
        inspect_adapters(trainer.model, cfg, report)
        run.record_model(report)
        if not launch.shards_parameters:  # a sharded launch holds no whole LM head to compare against
            gap, tolerance, largest = check_logprob_parity(trainer, self.tokenizer, self.prompts[0], self.family, cfg)
            run.record["rl"]["logprob_probe_max_gap_nats"] = gap
            run.record["rl"]["logprob_probe_tolerance_nats"] = tolerance
            run.record["rl"]["logprob_probe_largest_logit"] = largest
            run.say(f"log-prob probe: the loss's log-probabilities equal {plain_forward(self.family)}, at "
                    f"temperature {r.temperature}, within {gap:.1e} nats (rounding in {cfg.model.dtype} allows "
                    f"{tolerance:.1e})")
        if self.reward_tokenizer is not None:
            run.say(f"reward model: {cfg.reward_model.name_or_path} ({cfg.reward_model.load_in}), frozen, eval mode; "
                    "prompt + completion rendered with "
                    + ("its own chat template" if self.reward_template == "own" else "the run's chat template")
                    + (" (prompt, answer, <end_of_turn>: defined for an empty answer too)" if scorer.ours else ""))
        run.say(f"rl: {r.algorithm} with groups of {r.num_generations}, KL coefficient {r.beta}"
                + (f" to {cfg.reference}" if r.beta else " (no reference)") + f"; launch {launch.describe()}")
        run.record["rl"]["reference"] = cfg.reference if r.beta else None
        return trainer

    def record_training(self, run: RunLifecycle, trainer, runtime_s: float | None) -> None:
        """Completions, truncated ones, completion tokens and generation seconds (totals over attempts); the
        reward and KL curves."""
        before = run.previous.get("rl") or {}  # a resumed run: totals over its attempts
        self.generated = run_total(trainer, trainer.supervised_seen)
        completions = run_total(trainer, trainer.completions_generated) + (before.get("completions") or 0)
        truncated = run_total(trainer, trainer.completions_truncated) + (before.get("completions_truncated") or 0)
        history = [e for e in trainer.state.log_history if "reward" in e and "eval_reward" not in e]
        run.record["rl"] |= {
            "tokens_generated": self.generated + (before.get("tokens_generated") or 0),
            "generation_s": round(run_total(trainer, trainer.generation_seconds) + (before.get("generation_s") or 0),
                                  3),
            "completions": int(completions), "completions_truncated": int(truncated),
            "truncated_fraction": truncated / completions if completions else None,
            "train_runtime_s": runtime_s,
            "reward_history": [{"step": e["step"], "reward": e["reward"], "reward_std": e.get("reward_std"),
                                "kl": e.get("kl"), "clipped_ratio": e.get("completions/clipped_ratio")}
                               for e in history]}
        if history:
            run.record["rl"] |= {"first_reward": history[0]["reward"], "final_reward": history[-1]["reward"]}

    def after_training(self, run: RunLifecycle, trainer) -> None:
        """The held-out reward curve, when prompts are held out."""
        if self.eval_prompts:
            run.record["training"]["eval_history"] = [{"step": e["step"], "eval_reward": e["eval_reward"]}
                                                      for e in trainer.state.log_history if "eval_reward" in e]

    def final_lines(self, run: RunLifecycle, trainer, runtime_s: float | None) -> list[str]:
        """Rewards first and last, completions and truncation, generation's share of the time."""
        rl = run.record["rl"]
        share = (run_total(trainer, trainer.generation_seconds) / max(runtime_s or 0, 1e-9)
                 / max(run.state.num_processes, 1))
        lines = [f"generated {rl['completions']:,} completions ({self.generated:,.0f} tokens this attempt), "
                 f"{rl['completions_truncated']:,} truncated at {self.cfg.rl.max_completion_length} tokens; "
                 f"generation took {share:.0%} of the training time"]
        if "first_reward" in rl:
            lines.append(f"reward: {rl['first_reward']:.4f} at the first logged step, {rl['final_reward']:.4f} at "
                         "the last")
        return lines
