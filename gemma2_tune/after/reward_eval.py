"""`eval --reward-function / --reward-model`: the mean reward of each model's answers to held-out prompts.

Every model (the starting model: the run's base with its adapter switched off; the run; each `--compare` model)
answers the same prompts (each row up to its last user turn, rendered by the run's template), greedily by default
or `samples` times at a temperature (the same seed for every model); each answer is scored by every reward
function and by the reward model exactly as `rl` scores completions (gemma2_tune/rewards.py). One table, a row per
model: the mean of each reward, and how many answers hit the token limit without <end_of_turn>.
"""

from __future__ import annotations

from typing import Any, Callable

from ..config.schema import DataSection
from ..data.gemma4 import split_answer
from ..data.prompts import build_prompts
from ..data.sources import load_rows
from ..rewards import CheckedReward, RewardModelScorer, call_reward_function, columns_line
from .inference import Loaded, Sampling, prompt_ids

Echo = Callable[[str], None]
SEED = 0  # every model samples with the same generator seed


def answers(loaded: Loaded, prompts: list[list[dict[str, str]]], policy: str, sampling: Sampling,
            samples: int) -> tuple[list[list[dict[str, str]]], list[str], int]:
    """`samples` answers per prompt -> (the prompt of each answer, answer texts, answers truncated: no <end_of_turn>
    or <eos> within sampling.max_new_tokens)."""
    import torch

    model, tokenizer = loaded.model, loaded.tokenizer
    kwargs = sampling.generate_kwargs(tokenizer)
    stops = set(kwargs["eos_token_id"])
    torch.manual_seed(SEED)
    asked, texts, truncated = [], [], 0
    for prompt in prompts:
        ids = prompt_ids(prompt, tokenizer, policy, loaded.family, thinking=loaded.thinking,
                         empty_thought=loaded.empty_thought).to(model.device)
        for _ in range(samples):
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                                     **kwargs)[0, ids.shape[1]:].tolist()
            truncated += not out or out[-1] not in stops
            asked.append(prompt)
            if loaded.thinking:  # the answer is what follows the model's thought
                texts.append(split_answer(tokenizer.decode(out, skip_special_tokens=False))[1].strip())
            else:
                texts.append(tokenizer.decode(out, skip_special_tokens=True).strip())
    return asked, texts, truncated


def reward_table(loaded: Loaded, data: DataSection, policy: str, functions: list[CheckedReward],
                 reward_model: RewardModelScorer | None, sampling: Sampling, samples: int, compare_base: bool,
                 others: list[tuple[str, Callable[[], Loaded]]] = (), echo: Echo = print,
                 model_label: str = "model", read: tuple[list, Any] | None = None) -> dict[str, Any]:
    """Mean rewards of the loaded model's answers (and its base's, adapter off, when `compare_base` and it has
    one; and each of `others`, (name, loader), loaded one at a time), printed as one table (`model_label`: the
    row of a model without an adapter). `reward_model`: the scorer rl trains with, or None. Returns {"dataset",
    "prompts", "answers_per_prompt", "results": {name: {reward: mean, ..., "truncated": n, "answers": n,
    "first_answer": text}}}. Each function also gets each prompt's row columns (as `rl` passes them); `read`:
    load_rows(data) when the caller read it already. Raises UserError: no usable prompts, a reward function that
    fails."""
    rows, source = read or load_rows(data)
    prompts, report, columns = build_prompts(rows, loaded.tokenizer, data, loaded.family, sampling.max_new_tokens,
                                             empty_thought=loaded.empty_thought)
    for line in source.lines() + report.summary_lines()[:1] + [columns_line(functions, columns)]:
        if line:
            echo(line)
    mode = "greedy" if sampling.temperature == 0 else f"{samples} at temperature {sampling.temperature}"
    echo(f"answers: {len(prompts)} prompts, {mode}, up to {sampling.max_new_tokens} tokens")
    labels = [f.spec.name for f in functions] + (["reward model"] if reward_model else [])

    asked_columns = [row for row in columns for _ in range(samples)]  # as `answers` asks: each prompt `samples` times

    def score(model_loaded: Loaded) -> dict[str, Any]:
        asked, texts, truncated = answers(model_loaded, prompts, policy, sampling, samples)
        means = {}
        for fn in functions:
            values = call_reward_function(fn, asked, texts, model_loaded.tokenizer, asked_columns)
            means[fn.spec.name] = sum(values) / len(values)
        if reward_model:
            values = reward_model.scores(asked, texts)
            means["reward model"] = sum(values) / len(values)
        return means | {"truncated": truncated, "answers": len(texts), "first_answer": texts[0]}

    results = {}
    model = loaded.model
    if compare_base and hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            results["base"] = score(loaded)
    results["fine-tuned" if hasattr(model, "disable_adapter") else model_label] = score(loaded)
    for name, load_other in others:  # checked by the caller (same family and vocabulary)
        other = load_other()
        results[name] = score(other)
        del other
    width = max(12, *(len(n) + 2 for n in results))
    columns = [max(12, len(label) + 2) for label in labels]
    echo(f"{'':{width}s}" + "".join(f"{label:>{w}s}" for label, w in zip(labels, columns)) + f"{'truncated':>12s}"
         + "  first answer")
    for name, r in results.items():
        echo(f"{name:{width}s}" + "".join(f"{r[label]:{w}.4f}" for label, w in zip(labels, columns))
             + f"{r['truncated']:>7d}/{r['answers']:<4d}  {r['first_answer'][:40]!r}")
    return {"dataset": source.name, "fingerprint": source.fingerprint, "prompts": len(prompts),
            "answers_per_prompt": samples, "results": results}


def reward_scorers(request, family, policy: str) -> tuple[list[CheckedReward], Any]:
    """eval's --reward-function items imported and --reward-model's tokenizer checked, before any model loads:
    (functions, the reward model's tokenizer: its own chat template, else the run's, for `family` and system
    `policy`; or None). Raises UserError naming the option."""
    from ..config.rewards import RewardFunction, reward_function_specs
    from ..errors import UserError
    from ..rewards import load_reward_function, reward_model_tokenizer

    functions = []
    for item, spec in zip(request.reward_functions, reward_function_specs(request.reward_functions) or []):
        if "=" in item:
            raise UserError(f"--reward-function {item}: eval reports each function's mean; weights are for rl's "
                            "summed reward (leave out '=WEIGHT')")
        functions.append(load_reward_function(RewardFunction(**spec), f"--reward-function {item}", flag=True))
    tokenizer = (reward_model_tokenizer(request.reward_model, f"--reward-model {request.reward_model}", family,
                                        policy)[0] if request.reward_model else None)
    return functions, tokenizer


def load_scoring_model(name: str | None, tokenizer: Any, loaded: Loaded) -> RewardModelScorer | None:
    """The reward model (frozen, on the evaluated model's device, in its dtype) with `tokenizer` (reward_scorers'),
    as `rl` scores with it. None without --reward-model."""
    if name is None:
        return None
    from ..rewards import load_reward_model

    dtype = str(loaded.model.dtype).removeprefix("torch.")
    model = load_reward_model(name, f"--reward-model {name}", dtype=dtype)
    return RewardModelScorer(model.to(loaded.model.device), tokenizer)
