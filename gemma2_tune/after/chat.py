"""`gemma2-tune chat`: one-shot answers, or an interactive session with history that streams replies."""

from __future__ import annotations

from typing import Callable

from .inference import Loaded, Sampling, TrainedRun, reply

Echo = Callable[[str], None]


def describe(run: TrainedRun, loaded: Loaded, load_in: str, sampling: Sampling) -> str:
    """One line saying what is talking: model (+ adapter), precision, kernel, system policy, sampling."""
    caps = " (soft-capping on)" if loaded.report.attention_softcap else ""
    return (f"{run.base_model}{' + ' + str(run.path) if run.is_adapter else ''}, {load_in}, "
            f"{loaded.report.attn_implementation} attention{caps}, system policy '{run.system_policy}', "
            + ("greedy" if sampling.temperature == 0 else f"temperature {sampling.temperature}, top_p {sampling.top_p}"))


def one_shot(run: TrainedRun, loaded: Loaded, system: str | None, prompt: str, sampling: Sampling) -> str:
    """The model's answer to one prompt (and an optional system message)."""
    history = [{"role": "system", "content": system}] if system else []
    return reply(loaded, history + [{"role": "user", "content": prompt}], run.system_policy, sampling)


def interactive(run: TrainedRun, loaded: Loaded, system: str | None, sampling: Sampling, echo: Echo,
                write: Callable[[str], None], read: Callable[[str], str] = input) -> None:
    """you> / model> turns until /exit or end of input; /reset clears the history (the system message stays).
    `write` prints without a newline (streamed pieces)."""
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            echo("")
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = list(start)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        write("model> ")
        answer = reply(loaded, history, run.system_policy, sampling, on_text=write)
        echo("")
        history.append({"role": "assistant", "content": answer or "…"})
