"""Rewards, as `rl` trains on them and `eval` scores with them: Python reward functions and reward models.

A reward function has TRL's signature, `f(prompts, completions, **columns) -> list[float]` (prompts and completions
are message lists; completion[0]['content'] is the answer's text without <end_of_turn>), one finite number per
completion; anything else stops with a UserError naming `path:name`. A reward model is a sequence classifier with
one output: a whole folder or hub id, or a `gemma2-tune reward` run (a SEQ_CLS LoRA adapter whose score head is
saved with it: its base is loaded as a sequence classifier and the adapter put on it, merged where the weights are
not quantized). RewardModelScorer says what text it reads (the same in `rl` and in `eval`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import sys
from pathlib import Path
from typing import Any, Callable

from .config.rl import RewardFunction, adapter_base, reward_model_path_problem, reward_run
from .config.rules import sequence_classifier
from .errors import UserError

Messages = list[dict[str, str]]


# ---------------------------------------------------------------------------------------------- reward functions
class CheckedReward:
    """A user's reward function, checked on every call: it must return one finite number per completion.
    Anything else stops the run with a UserError naming `path:name` (TRL would turn None into NaN and go on)."""

    def __init__(self, fn: Callable, spec: RewardFunction):
        self.fn, self.spec = fn, spec
        self.__name__ = spec.name  # TRL logs rewards/<name>/mean

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        label = self.spec.label
        try:
            out = self.fn(prompts=prompts, completions=completions, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the user's code: say which function, and what it raised
            raise UserError(f"reward function {label}: raised {type(exc).__name__}: {exc}") from None
        try:
            values = [float(x) for x in out]
        except (TypeError, ValueError):
            raise UserError(f"reward function {label}: must return a list of numbers (one per completion), "
                            f"returned {type(out).__name__}: {str(out)[:120]}") from None
        if len(values) != len(completions):
            raise UserError(f"reward function {label}: returned {len(values)} rewards for {len(completions)} "
                            "completions (one per completion)")
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            raise UserError(f"reward function {label}: returned {values[bad[0]]} for completion {bad[0]} "
                            f"({completions[bad[0]]!r:.120}); rewards must be finite numbers")
        return values


def load_reward_function(spec: RewardFunction, key: str, flag: bool = False) -> CheckedReward:
    """Import `spec.path` and take `spec.name` from it. `key` names it in messages: a config key
    (rl.reward_functions[0], whose .path/.name are named) or, with `flag`, the command-line option. Raises
    UserError for a missing file, code that fails on import, a missing name or something not callable."""
    path_key, name_key = (key, key) if flag else (f"{key}.path", f"{key}.name")
    path = Path(spec.path).expanduser()
    if not path.is_file():
        raise UserError(f"{path_key}: {spec.path}: no such file")
    digest = hashlib.sha256(f"{path.resolve()}:{key}".encode()).hexdigest()[:12]
    module_name = f"gemma2_tune_reward_{digest}_{path.stem}"
    try:
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module  # pickling (dataloader workers) finds it
        loader_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's file
        raise UserError(f"{path_key}: importing {spec.path} failed: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, spec.name, None)
    if fn is None:
        defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                         and getattr(v, "__module__", None) == module_name)
        raise UserError(f"{name_key}: {spec.path} defines no '{spec.name}' (functions there: "
                        f"{', '.join(defined) or 'none'})")
    if not callable(fn):
        raise UserError(f"{name_key}: {spec.label} is a {type(fn).__name__}, not a function")
    return CheckedReward(fn, spec)


def try_reward_functions(functions: list[CheckedReward], prompt: Messages, tokenizer) -> None:
    """Call every reward function on a dummy batch (one prompt, an empty completion and a short one), with the
    keyword arguments TRL passes, before anything is written. Raises UserError as CheckedReward does."""
    texts = ["", "Hello."]
    for fn in functions:
        call_reward_function(fn, [prompt] * len(texts), texts, tokenizer)


def call_reward_function(fn: CheckedReward, prompts: list[Messages], texts: list[str], tokenizer) -> list[float]:
    """`fn` on conversational prompts and completion texts, with the keyword arguments TRL passes."""
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    return fn(prompts, completions, completion_ids=ids, trainer_state=None,
              log_extra=lambda *a, **k: None, log_metric=lambda *a, **k: None)


# ------------------------------------------------------------------------------------------------- reward models
def reward_model_tokenizer(name: str, key: str, family, system_policy: str, unsupported: str = "bad_row",
                           trust_remote_code: bool = False):
    """A reward model's tokenizer, after checking it is a sequence classifier with one output (a reward run's
    base is loaded as one), with its own chat template, else the run's (`family`, `system_policy`,
    `unsupported`: our rendering). Returns (tokenizer, "own" | "run"). Raises UserError naming `key`."""
    from transformers import AutoConfig, AutoTokenizer

    from .models.loading import model_location

    problem = reward_model_path_problem(name, key)
    if problem:
        raise UserError(problem)
    location = model_location(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
        if not reward_run(name):
            config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
            architectures = getattr(config, "architectures", None) or []
            if not sequence_classifier(architectures) or config.num_labels != 1:
                found = ", ".join(architectures) or "no architecture"
                if sequence_classifier(architectures):
                    found += f" with {config.num_labels} outputs"
                raise UserError(f"{key}: {name} is not a reward model: it must be a sequence classifier with one "
                                f"output (found {found})")
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - missing, offline, not a model folder
        raise UserError(f"{key}: cannot load {name}'s config and tokenizer ({type(exc).__name__}: "
                        f"{str(exc)[:200]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template:
        return tokenizer, "own"
    from .data.template import use_run_template

    use_run_template(tokenizer, family, system_policy, unsupported)
    return tokenizer, "run"


def load_reward_model(name: str, key: str, *, dtype: str, bits: str | None = None, quantization: Any = None,
                      compute_dtype: str | None = None, quant_storage: str | None = None,
                      attn_implementation: str = "eager", trust_remote_code: bool = False, device_map: Any = None):
    """The reward model, frozen (no gradients) and in eval mode. `bits`: None, "8bit" or "4bit" (with the run's
    `quantization` section's type and double-quant); a reward run's adapter is merged into unquantized weights
    and kept as a PEFT wrapper on quantized ones. Raises UserError naming `key`."""
    from transformers import AutoModelForSequenceClassification

    from .models.loading import model_location, quiet_transformers
    from .models.quantization import bnb_config, torch_dtype

    q = quantization
    quant = bnb_config(bits, dtype, q.quant_type if q else "nf4", q.double_quant if q else True, compute_dtype,
                       quant_storage)
    if quant is not None:
        quant.llm_int8_skip_modules = ["score"]  # the one-output head stays unquantized
    is_run = reward_run(name)
    location = adapter_base(Path(name).expanduser()) if is_run else name
    try:
        # a reward run's base has no score head (the adapter brings it): transformers' missing-weights report is noise
        with quiet_transformers(is_run):
            model = AutoModelForSequenceClassification.from_pretrained(
                model_location(location), num_labels=1, dtype=torch_dtype(dtype),
                attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
                quantization_config=quant, device_map=device_map)
        if is_run:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(Path(name).expanduser()))
            if quant is None:
                model = model.merge_and_unload()
    except Exception as exc:  # noqa: BLE001 - a damaged folder, an adapter for another base
        raise UserError(f"{key}: cannot load {name} ({type(exc).__name__}: {str(exc)[:200]})") from None
    model.requires_grad_(False)
    model.eval()
    return model


class RewardModelScorer:
    """A reward model as a reward function (TRL's signature): one score per completion, batched.

    The text scored: with a chat template gemma2-tune generated (a `gemma2-tune reward` run's, or the run's for a
    reward model without one), the prompt rendered with the model-turn header, the answer, <end_of_turn> and the
    newline, which is exactly the template's rendering of prompt + answer, and stays defined for an empty answer
    (a policy that stops at once), which the template refuses as a conversation; with a reward model's own
    foreign template, the whole conversation through it, as TRL's GRPOTrainer renders for a reward model
    (trl.data_utils.apply_chat_template). Read right-padded, no added special tokens, at `logits[:, 0]`.
    `model` may be replaced after construction (rl puts TRL's prepared copy here). `ours`: the tokenizer's template
    is one gemma2-tune generated. Raises UserError when a foreign template refuses a conversation."""

    __name__ = "reward_model"  # TRL logs rewards/reward_model/mean

    def __init__(self, model, tokenizer, batch_size: int = 8):
        from .data.template import is_generated

        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.ours = is_generated(tokenizer.chat_template)
        if model is not None and model.config.pad_token_id is None:  # where a padded batch's last token is read
            model.config.pad_token_id = tokenizer.pad_token_id

    def text(self, prompt: Messages, answer: str) -> str:
        """What the reward model reads for `prompt` answered with `answer`."""
        if self.ours:
            from .models.serving import end_of_turn_token

            head = self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            return f"{head}{answer.strip()}{end_of_turn_token(self.tokenizer)}\n"
        from trl.data_utils import apply_chat_template

        try:
            return apply_chat_template({"messages": prompt + [{"role": "assistant", "content": answer}]},
                                       self.tokenizer)["text"]
        except Exception as exc:  # noqa: BLE001 - the reward model's own template
            raise UserError(f"reward model: its chat template refused a prompt + answer ({type(exc).__name__}: "
                            f"{str(exc)[:200]}); answer {answer!r:.80}") from None

    def scores(self, prompts: list[Messages], texts: list[str]) -> list[float]:
        """Scores of each prompt answered with the matching text."""
        import torch

        device = next(self.model.parameters()).device
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = [self.text(p, t) for p, t in zip(prompts[start:start + self.batch_size],
                                                      texts[start:start + self.batch_size])]
            inputs = self.tokenizer(text=batch, return_tensors="pt", padding=True, padding_side="right",
                                    add_special_tokens=False).to(device)
            with torch.inference_mode():
                out += self.model(**inputs).logits[:, 0].float().tolist()
        return out

    def __call__(self, prompts, completions, **kwargs) -> list[float]:  # noqa: ARG002 - TRL's keyword columns
        return self.scores(prompts, [c[0]["content"] if isinstance(c, list) else c for c in completions])
