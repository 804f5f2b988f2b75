"""`gemma2-tune chat`: one-shot answers, or an interactive session with history that streams replies."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ..data.images import ImageReader
from ..data.turns import BadRow
from ..errors import UserError
from .inference import Loaded, Sampling, TrainedRun, reply

Echo = Callable[[str], None]


def describe(run: TrainedRun, loaded: Loaded, load_in: str, sampling: Sampling) -> str:
    """One line saying what is talking: model (+ adapter), precision, kernel, system policy (Gemma 4: thinking),
    sampling."""
    caps = " (soft-capping on)" if loaded.report.attention_softcap else ""
    precision = loaded.report.load_dtype + (f", {load_in}" if load_in in ("8bit", "4bit") else "")
    thinking = f"thinking {'on' if loaded.thinking else 'off'}, " if loaded.family.turn_format == "gemma4" else ""
    return (f"{run.base_model}{' + ' + str(run.path) if run.is_adapter else ''}, {precision}, "
            f"{loaded.report.attn_implementation} attention{caps}, system policy '{run.system_policy}', {thinking}"
            + ("greedy" if sampling.temperature == 0 else f"temperature {sampling.temperature}, top_p {sampling.top_p}"))


def user_message(text: str, images: Sequence[str] = ()) -> dict[str, Any]:
    """A user message: the text, after the images (`--image` paths, in order) when there are any."""
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image", "image": path} for path in images]
            + [{"type": "text", "text": text}]}


def check_images(loaded: Loaded, images: Sequence[str]) -> None:
    """`--image` paths: the model takes images, and each one is a readable image within the size limit. Raises
    UserError naming the path."""
    if not images:
        return
    if loaded.family.images is None:
        raise UserError(f"--image: {loaded.family.display} takes text only (image + text checkpoints such as Gemma 3 "
                        "4B/12B/27B and Gemma 4 read images)")
    if loaded.images is None:
        raise UserError("--image: this checkpoint has no image processor (no processor_config.json or "
                        "preprocessor_config.json beside its weights or its base's)")
    for path in images:
        try:
            READ_IMAGE.read(path, f"--image {path}")
        except BadRow as exc:
            raise UserError(str(exc)) from None


READ_IMAGE = ImageReader()  # chat reads local files, relative to the working folder


def one_shot(run: TrainedRun, loaded: Loaded, system: str | None, prompt: str, sampling: Sampling,
             on_thought: Echo | None = None, images: Sequence[str] = ()) -> str:
    """The model's answer to one prompt (and an optional system message, and images shown before the prompt);
    a Gemma 4 model's thought goes to `on_thought`. Raises UserError when the conversation can't be rendered the
    way training renders (e.g. a control marker in the prompt) or an image can't be read."""
    check_images(loaded, images)
    history = [{"role": "system", "content": system}] if system else []
    try:
        return reply(loaded, history + [user_message(prompt, images)], run.system_policy, sampling,
                     on_thought=on_thought, read_image=READ_IMAGE)
    except BadRow as exc:
        raise UserError(f"cannot send this conversation: {exc}") from None


def interactive(run: TrainedRun, loaded: Loaded, system: str | None, sampling: Sampling, echo: Echo,
                write: Callable[[str], None], read: Callable[[str], str] = input,
                on_thought: Echo | None = None, images: Sequence[str] = ()) -> None:
    """you> / model> turns until /exit or end of input; /reset clears the history (the system message stays).
    `write` prints without a newline (streamed pieces; a thinking Gemma 4 model's answer comes whole after its
    thought, given to `on_thought`). `images` (--image) are shown with the first message (again after /reset).
    A line that can't be rendered the way training renders is refused with its reason; the session and its
    history go on."""
    check_images(loaded, images)
    start = [{"role": "system", "content": system}] if system else []
    try:
        check(run, loaded, start + [{"role": "user", "content": "?"}])
    except BadRow as exc:
        raise UserError(f"--system: {exc}") from None
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
        first = not any(m["role"] == "user" for m in history)
        attempt = history + [user_message(line, images if first else ())]
        try:
            check(run, loaded, attempt)
        except BadRow as exc:
            echo(f"(not sent: {exc})")
            continue
        history = attempt
        write("model> ")
        answer = reply(loaded, history, run.system_policy, sampling, on_text=write, on_thought=on_thought,
                       read_image=READ_IMAGE)
        if loaded.thinking:
            write(answer)
        echo("")
        history.append({"role": "assistant", "content": answer or "…"})


def check(run: TrainedRun, loaded: Loaded, messages: list[dict]) -> None:
    """Raises BadRow when `messages` can't be rendered as training renders them."""
    from ..data.turns import normalise

    normalise(messages, run.system_policy, allow_open_end=True, family=loaded.family, thinking=loaded.thinking,
              images=READ_IMAGE if loaded.images is not None else None)
