"""lm-evaluation-harness integration: any lm-eval tasks, and the benchmark table of the Gemma 2 launch post
(`eval --suite gemma2-report`) printed next to the published scores of the base it was tuned from."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError

# The launch post's table of pre-trained models ("Welcome Gemma 2 - Google's new open LLM", Hugging Face blog,
# 2024-06-27, "Technical Report results"; the Gemma 2 report, arXiv:2408.00118, gives the same numbers). It holds
# the 9B and 27B bases; no 2B row.
PUBLISHED_SOURCE = "Gemma 2 launch post (huggingface.co/blog/gemma2), technical report table"
PUBLISHED = {
    "27b": {"mmlu": 75.2, "gsm8k": 75.1, "arc_challenge": 71.4, "hellaswag": 86.4, "winogrande": 83.7},
    "9b": {"mmlu": 71.3, "gsm8k": 62.3, "arc_challenge": 68.4, "hellaswag": 81.9, "winogrande": 80.6},
}


@dataclass(frozen=True)
class SuiteTask:
    """One benchmark of a suite: the lm-eval task, its few-shot count and the metric the table reports."""

    label: str
    task: str  # lm-eval task (or group) name
    num_fewshot: int
    metric: str  # key in lm-eval's results: "<metric>,<filter>"
    note: str


# The previous Open LLM Leaderboard settings, which the report's table follows: MMLU 5-shot, GSM8K 5-shot
# (greedy, i.e. maj@1; lm-eval's strict "#### <number>" match), ARC-c 25-shot, HellaSwag 10-shot, Winogrande
# 5-shot (lm-eval scores Winogrande by partial evaluation, the report's "partial scoring").
SUITES = {
    "gemma2-report": (
        SuiteTask("MMLU", "mmlu", 5, "acc,none", "5-shot, accuracy"),
        SuiteTask("GSM8K", "gsm8k", 5, "exact_match,strict-match", "5-shot, greedy (maj@1), strict match"),
        SuiteTask("ARC-c", "arc_challenge", 25, "acc_norm,none", "25-shot, length-normalised accuracy"),
        SuiteTask("HellaSwag", "hellaswag", 10, "acc_norm,none", "10-shot, length-normalised accuracy"),
        SuiteTask("Winogrande", "winogrande", 5, "acc,none", "5-shot, partial scoring"),
    ),
}


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("lm-eval tasks need lm-evaluation-harness: pip install 'gemma2-tune[eval]' (or lm-eval)") from None
    return lm_eval, HFLM, TaskManager


def gemma_lm(model, tokenizer):
    """lm-eval's HFLM over a loaded model, giving every request exactly one <bos> at its start, as Gemma was
    trained (the format is `<bos>` + text; a missing or a doubled <bos> both degrade Gemma's scores badly).

    HFLM alone cannot: with a tokenizer that adds <bos> (every Gemma tokenizer), loglikelihood_rolling
    (perplexity tasks) encodes the document with <bos> and then prefixes its own prefix token, <bos> again
    (lm-evaluation-harness#3333); with one that doesn't, multiple-choice and generation requests get none.
    Here every request is encoded without the tokenizer's special tokens and <bos> is put in front once: by
    the encoder for loglikelihood and generation requests (a <bos> the text already starts with is not
    doubled), by lm-eval's prefix token alone for rolling ones. Raises UserError when lm-eval is missing."""
    _, HFLM, _ = _lm_eval()

    class GemmaLM(HFLM):
        _rolling = False  # inside loglikelihood_rolling: lm-eval puts <bos> (its prefix token) in front itself

        def _without_bos_text(self, string: str) -> str:
            bos = self.tokenizer.bos_token
            return string[len(bos):] if bos and string.startswith(bos) else string

        def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
            ids = self.tokenizer.encode(self._without_bos_text(string), add_special_tokens=False)
            if add_special_tokens is not False and not self._rolling:  # False: a continuation, never first
                ids = [self.tokenizer.bos_token_id] + ids
                if left_truncate_len:
                    return ids[:1] + ids[1:][-(left_truncate_len - 1):]
            return ids[-left_truncate_len:] if left_truncate_len else ids

        def tok_batch_encode(self, strings, padding_side="left", left_truncate_len=None, truncation=False):
            # each string gets <bos> as text; lm-eval sees it and encodes without special tokens
            bos = self.tokenizer.bos_token
            strings = [bos + self._without_bos_text(s) for s in strings]
            return super().tok_batch_encode(strings, padding_side=padding_side, left_truncate_len=left_truncate_len,
                                            truncation=truncation)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            self._rolling = True
            try:
                return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
            finally:
                self._rolling = False

    return GemmaLM(pretrained=model, tokenizer=tokenizer, batch_size=1)


def _evaluate(lm_eval, lm, tasks: list[str], manager, limit: int | None, num_fewshot: int | None = None) -> dict:
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s) {unknown}" + ("" if manager.include_path else
                        "; local task YAMLs need --include-path"))
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                       num_fewshot=num_fewshot)
    except (ConnectionError, OSError) as exc:
        raise UserError(f"a task's data could not be loaded ({str(exc).splitlines()[0][:200]}); offline, point "
                        "--include-path at local task files") from None


def check_suite_data(suite: str, include_path: str | None) -> None:
    """Load every benchmark of `suite` (lm-eval downloads and caches its data) before any model is loaded, so
    missing data fails in seconds, not after loading a 27B. Raises UserError naming the benchmark."""
    lm_eval, _, TaskManager = _lm_eval()
    from lm_eval.tasks import get_task_dict

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    for item in SUITES[suite]:
        if item.task not in manager.all_tasks:
            raise UserError(f"--suite {suite}: lm-eval has no task '{item.task}' ({item.label})")
        try:
            get_task_dict([item.task], manager)
        except Exception as exc:  # noqa: BLE001 - unreachable hub, gated data, a broken local file: one message
            raise UserError(f"--suite {suite}: the data of {item.label} ('{item.task}') could not be loaded "
                            f"({str(exc).splitlines()[0][:200]}); offline, point --include-path at local task files "
                            "named mmlu, gsm8k, arc_challenge, hellaswag, winogrande") from None


def run_tasks(model, tokenizer, tasks: list[str], include_path: str | None, limit: int | None, echo=print) -> dict:
    """Run lm-eval `tasks` on a loaded model; prints and returns {task: metrics}. Raises UserError when
    lm-eval is missing, a task is unknown, or its data can't be loaded."""
    lm_eval, _, TaskManager = _lm_eval()
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    lm = gemma_lm(model, tokenizer)
    table = _evaluate(lm_eval, lm, tasks, manager, limit)["results"]
    for task, metrics in table.items():
        shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and "stderr" not in k)
        echo(f"{task}: {shown}")
    return table


def run_suite(model, tokenizer, suite: str, size: str | None, include_path: str | None, limit: int | None,
              echo=print) -> dict:
    """Run a suite's benchmarks, each with its own few-shot count, and print them beside the published scores
    for the base of `size` ("9b", "27b"; none for other sizes). Returns {label: {score, published, ...}}.
    Scores are percentages. Raises UserError: an unknown suite, lm-eval missing, a task's data unavailable."""
    if suite not in SUITES:
        raise UserError(f"--suite {suite}: unknown; available: {', '.join(SUITES)}")
    lm_eval, _, TaskManager = _lm_eval()
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    lm = gemma_lm(model, tokenizer)
    published = PUBLISHED.get(size or "")
    rows = {}
    for item in SUITES[suite]:
        echo(f"{item.label}: lm-eval '{item.task}', {item.note}" + (f", first {limit} examples" if limit else ""))
        output = _evaluate(lm_eval, lm, [item.task], manager, limit, item.num_fewshot)
        metrics = output["results"].get(item.task, {})
        if item.metric not in metrics:
            raise UserError(f"--suite {suite}: lm-eval's '{item.task}' reported no '{item.metric}' "
                            f"(it reported {sorted(k for k in metrics if 'stderr' not in k)})")
        score = 100.0 * float(metrics[item.metric])
        rows[item.label] = {"task": item.task, "num_fewshot": item.num_fewshot, "metric": item.metric,
                            "num_fewshot_run": (output.get("n-shot") or {}).get(item.task),
                            "examples": ((output.get("n-samples") or {}).get(item.task) or {}).get("effective"),
                            "score": score, "published": published.get(item.task) if published else None}
    header = f"published (Gemma 2 {size.upper()} base)" if published else "published"
    echo(f"{'benchmark':12s}{'shots':>6s}{'score':>9s}{header:>32s}{'difference':>12s}")
    for label, r in rows.items():
        pub = r["published"]
        echo(f"{label:12s}{r['num_fewshot']:6d}{r['score']:9.1f}" + (f"{pub:32.1f}{r['score'] - pub:+12.1f}" if pub is
             not None else f"{'-':>32s}{'-':>12s}"))
    echo(f"published: {PUBLISHED_SOURCE}" if published else
         f"no published scores for this size in the launch post (it lists the {' and '.join(PUBLISHED)} bases)")
    if limit:
        echo(f"scores over the first {limit} examples of each benchmark: not comparable with the published ones")
    return rows
