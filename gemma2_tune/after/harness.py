"""lm-evaluation-harness integration: the benchmark table of the Gemma 2 report, where lm-eval is installed."""

from __future__ import annotations

from ..errors import UserError


def run_tasks(model, tokenizer, tasks: list[str], include_path: str | None, limit: int | None, echo=print) -> dict:
    """Run lm-eval `tasks` on a loaded model; prints and returns {task: metrics}. Raises UserError when
    lm-eval is missing, a task is unknown, or its data can't be loaded."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("--tasks needs lm-evaluation-harness: pip install 'gemma2-tune[eval]' (or lm-eval)") from None
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"--tasks: unknown lm-eval task(s) {unknown}" + ("" if include_path else
                        "; local task YAMLs need --include-path"))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit)
    except (ConnectionError, OSError) as exc:
        raise UserError(f"--tasks: a task's data could not be loaded ({exc}); offline, use local tasks") from None
    table = results["results"]
    for task, metrics in table.items():
        shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and "stderr" not in k)
        echo(f"{task}: {shown}")
    return table
