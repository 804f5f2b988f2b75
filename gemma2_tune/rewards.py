"""Rewards, as `rl` trains on them and `eval` scores with them: Python reward functions and reward models.

A reward function has TRL's signature, `f(prompts, completions, **kwargs) -> list[float]` (prompts and completions
are message lists; completion[0]['content'] is the answer's text without <end_of_turn>; kwargs: TRL's other
arguments and each prompt's row columns, e.g. a GSM8K `answer`), sync or `async def`, one finite number per
completion; anything else stops with a UserError naming `path:name`. A reward model is a sequence classifier with
one output: a whole folder or hub id, or a `gemma2-tune reward` run (a SEQ_CLS LoRA adapter whose score head is
saved with it: its base is loaded as a sequence classifier and the adapter put on it, merged where the weights are
not quantized). RewardModelScorer says what text it reads (the same in `rl` and in `eval`).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib.util
import inspect
import math
import numbers
import sys
from pathlib import Path
from typing import Any, Callable

from .config.rewards import RewardFunction, reward_model_path_problem, reward_run
from .config.runs import adapter_run
from .config.rules import sequence_classifier
from .errors import UserError

Messages = list[dict[str, str]]


# ---------------------------------------------------------------------------------------------- reward functions
# What TRL 1.16's GRPOTrainer passes every reward function besides the dataset's columns (_calculate_rewards).
PASSED = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")
# The dataset column rl adds beside "prompt": each prompt's index into CheckedReward.rows, whose columns are passed
# as they were read (a datasets.Dataset would retype them: mixed types refused, missing nested keys filled).
ROW = "gemma2_tune_row"
# Larger rewards break TRL's float32 arithmetic: it sums the weighted rewards, and the group's std squares their
# deviations (float32 overflows at 3.4e38: a deviation of 1.8e19), and 1e39 itself is inf in float32. 1e15 keeps
# the sums and squares of a batch of thousands of completions finite, far above any reward scale in use.
MAX_REWARD = 1e15


def is_async(fn: Any) -> bool:
    """Whether calling `fn` returns a coroutine: an `async def` function, a partial of one, or an object whose
    __call__ is (TRL 1.16's trainer.utils.is_async_callable, which decides that TRL awaits it)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def keyword_parameters(fn: Any) -> tuple[set[str] | None, list[str]]:
    """(the keyword arguments `fn` accepts, None when it takes **kwargs or its signature can't be read; the
    parameters it requires: no default, not positional-only, not *args/**kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None, []
    if any(p.kind is p.VAR_KEYWORD for p in params):
        accepted = None
    else:
        accepted = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    required = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and p.default is p.empty]
    return accepted, required


class CheckedReward:
    """A user's reward function, called as TRL calls it and checked on every call.

    It gets `prompts`, `completions`, `completion_ids`, `trainer_state`, `log_extra`, `log_metric` and each
    prompt's row columns (one list per column, a value per completion: None for a row without it), those its
    signature accepts (everything when it takes **kwargs). It must return one number per completion (a list,
    tuple or 1-D array of ints, floats or bools), finite and within MAX_REWARD. Anything else (an exception, a
    dict, strings, None, NaN, sys.exit) stops the run with a UserError naming `path:name` (TRL would turn None
    into NaN, score a dict by its keys and go on). `rows`: the columns of the prompts rl trains and evaluates on,
    indexed by the ROW column TRL passes."""

    def __init__(self, fn: Callable, spec: RewardFunction):
        self.fn, self.spec = fn, spec
        self.__name__ = spec.name  # TRL logs rewards/<name>/mean
        self.accepted, self.required = keyword_parameters(fn)
        self.rows: list[dict[str, Any]] = []

    def arguments(self, prompts, completions, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments of one call: TRL's, the rows' columns in place of ROW, those `fn` accepts."""
        kwargs = dict(kwargs)
        index = kwargs.pop(ROW, None)
        if index is not None:
            kwargs |= columns_as_lists([self.rows[i] for i in index])
        args = dict(prompts=prompts, completions=completions, **kwargs)
        return args if self.accepted is None else {k: v for k, v in args.items() if k in self.accepted}

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        try:
            out = self.fn(**self.arguments(prompts, completions, kwargs))
        except UserError:
            raise
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's code: say which function, and what it did
            raise UserError(failure(self.spec.label, exc)) from None
        return checked_rewards(self.spec.label, out, completions)


class AsyncCheckedReward(CheckedReward):
    """An `async def` reward function: awaited by TRL on its event loop, beside the other async ones (as TRL 1.16
    runs them); checked as CheckedReward."""

    async def __call__(self, prompts, completions, **kwargs) -> list[float]:
        try:
            out = await self.fn(**self.arguments(prompts, completions, kwargs))
        except UserError:
            raise
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - SystemExit would end TRL's event-loop thread
            raise UserError(failure(self.spec.label, exc)) from None
        return checked_rewards(self.spec.label, out, completions)


def failure(label: str, exc: BaseException) -> str:
    """A reward function's exception (or sys.exit) as the message that stops the run."""
    if isinstance(exc, SystemExit):
        return (f"reward function {label}: called sys.exit({exc.code!r}); a reward function returns its rewards "
                "(the run stops here)")
    return f"reward function {label}: raised {type(exc).__name__}: {exc}"


def columns_as_lists(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Row columns as TRL passes a dataset's: {column: [value of each row, None where a row has none]}."""
    names = dict.fromkeys(name for row in rows for name in row)
    return {name: [row.get(name) for row in rows] for name in names}


def checked_rewards(label: str, out: Any, completions: list) -> list[float]:
    """`out`, what reward function `label` returned for `completions`, as floats; raises UserError unless it is one
    number per completion (a list, tuple or 1-D array of ints, floats or bools), finite, within MAX_REWARD."""
    if hasattr(out, "tolist") and getattr(out, "ndim", None) == 1:  # a numpy array, a torch tensor
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise UserError(f"reward function {label}: must return a list of numbers (one per completion), returned "
                        f"{type(out).__name__}: {str(out)[:120]}")
    if len(out) != len(completions):
        raise UserError(f"reward function {label}: returned {len(out)} rewards for {len(completions)} completions "
                        "(one per completion)")
    values = []
    for i, value in enumerate(out):
        if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a numpy or torch scalar
            value = value.item()
        if not isinstance(value, numbers.Real):
            raise UserError(f"reward function {label}: returned {value!r:.60} ({type(value).__name__}) for "
                            f"completion {i} ({completions[i]!r:.120}); rewards must be numbers")
        value = float(value)
        if not math.isfinite(value) or abs(value) > MAX_REWARD:
            what = "rewards must be finite numbers" if not math.isfinite(value) else (
                f"a reward's magnitude must stay within {MAX_REWARD:g} (TRL computes the group's mean and spread in "
                "float32)")
            raise UserError(f"reward function {label}: returned {value:g} for completion {i} "
                            f"({completions[i]!r:.120}); {what}")
        values.append(value)
    return values


def load_reward_function(spec: RewardFunction, key: str, flag: bool = False) -> CheckedReward:
    """Import `spec.path` and take `spec.name` from it. `key` names it in messages: a config key
    (rl.reward_functions[0], whose .path/.name are named) or, with `flag`, the command-line option. Raises
    UserError for a missing file, code that fails on import (sys.exit included), a missing name or something not
    callable. An `async def` function is an AsyncCheckedReward."""
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
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's file
        sys.modules.pop(module_name, None)
        what = f"called sys.exit({exc.code!r})" if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"
        raise UserError(f"{path_key}: importing {spec.path} failed: {what}") from None
    fn = getattr(module, spec.name, None)
    if fn is None:
        defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                         and getattr(v, "__module__", None) == module_name)
        raise UserError(f"{name_key}: {spec.path} defines no '{spec.name}' (functions there: "
                        f"{', '.join(defined) or 'none'})")
    if not callable(fn):
        raise UserError(f"{name_key}: {spec.label} is a {type(fn).__name__}, not a function")
    return AsyncCheckedReward(fn, spec) if is_async(fn) else CheckedReward(fn, spec)


def column_problems(functions: list[CheckedReward], columns: list[dict[str, Any]]) -> list[str]:
    """What stops reward `functions` from getting their arguments from prompts with row `columns`: a parameter a
    function requires that neither TRL's arguments (PASSED) nor any row's columns give, naming the function, the
    parameter and the columns there are; a column named like one of TRL's own arguments (TRL would pass its own
    value, or fail with 'multiple values')."""
    names = sorted({name for row in columns for name in row})
    problems = [f"data: column '{name}' has the name of an argument TRL passes every reward function itself "
                f"({', '.join(PASSED)}); rename it" for name in names if name in PASSED]
    for fn in functions:
        for name in fn.required:
            if name not in PASSED and name not in names:
                problems.append(f"reward function {fn.spec.label}: its parameter '{name}' is no column of any prompt "
                                f"row (the rows' columns: {', '.join(names) or 'none'}); besides them a reward "
                                f"function gets {', '.join(PASSED)}")
    return problems


def columns_line(functions: list[CheckedReward], columns: list[dict[str, Any]]) -> str | None:
    """'reward functions get each prompt's row columns as keyword arguments: answer (16 of 16 prompts), id (16 of
    16)' (None without reward functions)."""
    from .data.prompts import describe_columns

    if not functions:
        return None
    return f"reward functions get each prompt's row columns as keyword arguments: {describe_columns(columns)}"


def try_reward_functions(functions: list[CheckedReward], prompt: Messages, tokenizer,
                         columns: dict[str, Any] | None = None) -> None:
    """Call every reward function on a dummy batch (one prompt, an empty completion and a short one), with the
    keyword arguments TRL passes and the prompt's row `columns`, before anything is written. Raises UserError as
    CheckedReward does."""
    texts = ["", "Hello."]
    for fn in functions:
        call_reward_function(fn, [prompt] * len(texts), texts, tokenizer, [columns or {}] * len(texts))


def call_reward_function(fn: CheckedReward, prompts: list[Messages], texts: list[str], tokenizer,
                         columns: list[dict[str, Any]] | None = None) -> list[float]:
    """`fn` on conversational prompts and completion texts, with the keyword arguments TRL passes and each
    prompt's row `columns` (one dict per text); an async function is run to its end here."""
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    result = fn(prompts, completions, completion_ids=ids, trainer_state=None, log_extra=lambda *a, **k: None,
                log_metric=lambda *a, **k: None, **columns_as_lists(columns or [{}] * len(texts)))
    return _event_loop().run_until_complete(result) if inspect.isawaitable(result) else result


_LOOP: asyncio.AbstractEventLoop | None = None


def _event_loop() -> asyncio.AbstractEventLoop:
    """One event loop for the async reward functions called outside TRL (eval, the dummy batch): a function's
    clients bound to a loop keep working from call to call, as on TRL's own loop."""
    global _LOOP
    if _LOOP is None or _LOOP.is_closed():
        _LOOP = asyncio.new_event_loop()
    return _LOOP


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
    try:
        start = adapter_run(name) if is_run else None
    except ValueError as exc:
        raise UserError(f"{key}: {exc}") from None
    location = start.base if start else name
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
