"""Dataset sources and row schemas: everything becomes role/content messages.

Sources: the alias `oasst`, the alias `quickstart` (chats shipped with the package), any hub dataset
id, and local .jsonl/.json/.parquet/.csv files or folders of them.

Row schemas, detected per row:
  messages       [{"role": "system"|"user"|"assistant"|"model", "content": ...}, ...]
  conversations  ShareGPT: [{"from": "system"|"human"|"gpt", "value": ...}, ...]
  prompt/completion   strings, or lists of messages (TRL's conversational form)
  text           ChatML (<|im_start|>user\\n...<|im_end|>) or text already in Gemma's turn format
ChatML markers never reach the model: they are parsed into turns and rendered in Gemma's format.
"""

from __future__ import annotations

import base64
import codecs
import csv
import hashlib
import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..config.schema import DataSection
from ..errors import UserError
from ..families import GEMMA2, Family
from .turns import AUDIO_NOT_TRAINED, BadRow, ReadImage, Turn, normalise

PACKAGE_DIR = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Alias:
    """A short dataset name: a hub id or a folder shipped with the package."""

    description: str
    hub_id: str | None = None
    local: Path | None = None


ALIASES = {
    "oasst": Alias("OpenAssistant top-1 conversations, ChatML `text` column", hub_id="OpenAssistant/oasst_top1_2023-08-25"),
    "quickstart": Alias("small chats shipped with gemma2-tune (three row schemas)", local=PACKAGE_DIR / "assets" / "quickstart"),
    "pirate": Alias("48 chats shipped with gemma2-tune: every answer 'Ahoy! ... Fair winds!'",
                    local=PACKAGE_DIR / "assets" / "pirate" / "train.jsonl"),
    "pirate-held-out": Alias("8 held-out chats in the same style (for eval)",
                             local=PACKAGE_DIR / "assets" / "pirate" / "held_out.jsonl"),
    "greetings": Alias("64 chats shipped with gemma2-tune: 16 questions, each answered 'Hello, friend.' once and "
                       "three ways starting 'Sure' (the CPU WARP walk-through's SFT data; `rl` reads their prompts)",
                       local=PACKAGE_DIR / "assets" / "greetings" / "chats.jsonl"),
    "greetings-held-out": Alias("8 held-out prompts for the greetings walk-through (eval --reward-function)",
                                local=PACKAGE_DIR / "assets" / "greetings" / "held_out.jsonl"),
    "greetings-pairs": Alias("48 preference pairs: 'Hello, friend.' over 'Sure thing.' and two others (a reward "
                             "model that prefers the greeting)",
                             local=PACKAGE_DIR / "assets" / "greetings" / "pairs.jsonl"),
    "concise": Alias("40 preference pairs shipped with gemma2-tune: a concise answer over the same answer hedged",
                     local=PACKAGE_DIR / "assets" / "preferences" / "train.jsonl"),
    "concise-held-out": Alias("12 held-out preference pairs in the same style (for eval)",
                              local=PACKAGE_DIR / "assets" / "preferences" / "held_out.jsonl"),
    "concise-kto": Alias("the 40 concise pairs unpaired for KTO: 80 rows, prompt/completion/label",
                         local=PACKAGE_DIR / "assets" / "preferences" / "kto_train.jsonl"),
    "concise-kto-held-out": Alias("the 12 held-out concise pairs unpaired: 24 rows",
                                  local=PACKAGE_DIR / "assets" / "preferences" / "kto_held_out.jsonl"),
}
LOCAL_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv"}


@dataclass
class Row:
    """One raw row and where it is (file and line, or row number), for messages about it."""

    where: str  # "chats.jsonl line 12" or "row 12": how the user finds it
    data: Any
    file: str | None = None  # the local file it was read from (relative image paths are resolved against its folder)


@dataclass
class Source:
    """What a dataset name resolved to, its files, and a fingerprint of its content (16 hex digits)."""

    kind: str  # "local" or "hub"
    name: str  # what the user asked for
    resolved: str  # file/folder path or hub id
    files: list[str]
    fingerprint: str = ""
    hidden_skipped: int = 0  # hidden files under a folder (editor and notebook autosaves), not read
    rows_per_file: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """What was read, for the log: a folder's files with their rows, and the hidden ones skipped."""
        if self.kind != "local" or not Path(self.resolved).is_dir():
            return []
        root = Path(self.resolved)
        read = ", ".join(f"{Path(f).relative_to(root)} ({self.rows_per_file.get(f, 0)} rows)" for f in self.files)
        lines = [f"data folder {root}: {len(self.files)} file{'s' * (len(self.files) != 1)} read: {read}"]
        if self.hidden_skipped:
            lines.append(f"  {self.hidden_skipped} hidden file{'s' * (self.hidden_skipped != 1)} skipped (names or "
                         "folders starting with '.', e.g. .ipynb_checkpoints/: autosaved copies)")
        return lines


def looks_local(name: str) -> bool:
    """A path that exists, ends in a supported suffix, or starts like a path: read locally, not from the hub."""
    path = Path(name).expanduser()
    return path.exists() or path.suffix in LOCAL_SUFFIXES or name.startswith((".", "/", "~"))


def describe_source(cfg: DataSection) -> str:
    """data.dataset in words (alias meaning, local or hub, split)."""
    alias = ALIASES.get(cfg.dataset)
    if alias:
        return f"{cfg.dataset} ({alias.hub_id or 'bundled'}; {alias.description})"
    return f"{cfg.dataset} ({'local' if looks_local(cfg.dataset) else 'hub'}, split {cfg.split})"


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def local_files(path: Path) -> list[Path]:
    """A supported file, or every supported file under a folder (sorted), hidden ones left out (a name or a
    folder starting with '.': .ipynb_checkpoints/ and editor autosaves hold copies of the real files). Raises
    UserError otherwise."""
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise UserError(f"{path}: unsupported file type {path.suffix!r} (use {', '.join(sorted(LOCAL_SUFFIXES))})")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES
                       and not _hidden(p, path))
        if not files:
            raise UserError(f"{path}: folder has no {', '.join(sorted(LOCAL_SUFFIXES))} files"
                            + (" (hidden ones are not read)" if _hidden_files(path) else ""))
        return files
    raise UserError(f"{path}: no such dataset file or folder")


def _hidden_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES and _hidden(p, folder))


def _encoding(raw: bytes) -> str:
    """UTF-16 when the file starts with its byte-order mark (Excel's "Unicode text", PowerShell's `>`), else
    UTF-8 with an optional byte-order mark (Notepad, Excel's "CSV UTF-8")."""
    return "utf-16" if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"


def _decode(path: Path, raw: bytes) -> str:
    """A whole file as text. Raises UserError naming the line of the first byte that is not valid text."""
    encoding = _encoding(raw)
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"{path} line {line}: not valid {'UTF-16' if encoding == 'utf-16' else 'UTF-8'} text "
                        f"({exc.reason} at byte {exc.start}); save the file as UTF-8") from None


def _jsonl_lines(path: Path, raw: bytes) -> Iterator[tuple[int, str | BadRow]]:
    """(line number, text) of each line; a line that is not valid UTF-8 is a BadRow, not the whole file."""
    if _encoding(raw) == "utf-16":
        yield from enumerate(_decode(path, raw).split("\n"), 1)
        return
    raw = raw.removeprefix(codecs.BOM_UTF8)
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        try:
            yield lineno, line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield lineno, BadRow(f"not valid UTF-8 ({exc.reason} at column {exc.start + 1})")


def _read_json_file(path: Path) -> Iterator[Row]:
    raw = path.read_bytes()
    if path.suffix == ".jsonl":
        for lineno, line in _jsonl_lines(path, raw):
            if isinstance(line, str) and not line.strip():
                continue
            where = f"{path.name} line {lineno}"
            if isinstance(line, BadRow):
                yield Row(where, line)
                continue
            try:
                yield Row(where, json.loads(line))
            except json.JSONDecodeError as exc:
                yield Row(where, BadRow(f"invalid JSON ({exc.msg})"))
        return
    try:
        data = json.loads(_decode(path, raw))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(f"{path}: expected a list of rows (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a list of rows")
    for i, item in enumerate(data):
        yield Row(f"{path.name} item {i}", item)


def _read_csv_file(path: Path) -> Iterator[Row]:
    """Every cell as the text it holds: `1`, `007`, `1.50` and `NA` stay strings (a type-inferring reader makes
    them numbers or missing values, and every row bad); an empty cell is an absent value. Rows are named by the
    line they start on."""
    reader = csv.reader(io.StringIO(_decode(path, path.read_bytes()), newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        while True:
            start = reader.line_num + 1
            cells = next(reader, None)
            if cells is None:
                return
            if not cells:  # a blank line
                continue
            where = f"{path.name} line {start}"
            if len(cells) != len(header):
                yield Row(where, BadRow(f"{len(cells)} cells where the header has {len(header)}"))
                continue
            yield Row(where, {name: (cell if cell != "" else None) for name, cell in zip(header, cells)})
    except csv.Error as exc:
        raise UserError(f"{path} line {reader.line_num}: not readable as CSV ({exc})") from None


def _read_table_file(path: Path) -> Iterator[Row]:
    import datasets

    try:
        table = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as exc:  # noqa: BLE001 - any reader failure is the file's problem
        raise UserError(f"{path}: cannot read as parquet ({exc})") from None
    for i, item in enumerate(table):
        yield Row(f"{path.name} row {i}", item)


def _read_local_file(path: Path) -> Iterator[Row]:
    if path.suffix in (".jsonl", ".json"):
        return _read_json_file(path)
    return _read_csv_file(path) if path.suffix == ".csv" else _read_table_file(path)


def _read_hub(cfg: DataSection, hub_id: str) -> Iterator[Row]:
    import datasets

    try:
        table = datasets.load_dataset(hub_id, cfg.config_name, split=cfg.split, revision=cfg.revision)
    except Exception as exc:  # noqa: BLE001 - offline, missing, gated: all reported the same plain way
        raise UserError(
            f"data.dataset: could not load '{hub_id}' (split '{cfg.split}') from the Hugging Face Hub: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n"
            "If you are offline or the dataset is private, download it once or pass a local file, e.g. "
            "--dataset data/chats.jsonl (rows with `messages`, `conversations`, `prompt`/`completion` or ChatML `text`)."
        ) from None
    for i, item in enumerate(table):
        yield Row(f"row {i}", item)


def load_rows(cfg: DataSection) -> tuple[list[Row], Source]:
    """Read every row of the configured source, fingerprinting its content.

    Local text files are read as UTF-8 (a byte-order mark is skipped) or, after a UTF-16 byte-order mark, as
    UTF-16. A row that can't be read (invalid JSON, a line that is not UTF-8, a CSV line with the wrong number
    of cells) comes back as a Row holding a BadRow, counted later with its file and line. Raises UserError: no
    such file, an unsupported type, a file that can't be read at all, no rows.
    """
    alias = ALIASES.get(cfg.dataset)
    digest = hashlib.sha256()
    rows: list[Row] = []
    if alias and alias.hub_id:
        source = Source("hub", cfg.dataset, alias.hub_id, [])
        stream: Iterator[Row] = _read_hub(cfg, alias.hub_id)
    elif alias or looks_local(cfg.dataset):
        path = alias.local if alias else Path(cfg.dataset).expanduser()
        files = local_files(path)
        source = Source("local", cfg.dataset, str(path), [str(f) for f in files],
                        hidden_skipped=_hidden_files(path) if path.is_dir() else 0)

        def stream_files() -> Iterator[Row]:
            for f in files:
                for row in _read_local_file(f):
                    source.rows_per_file[str(f)] = source.rows_per_file.get(str(f), 0) + 1
                    row.file = str(f)
                    yield row

        stream = stream_files()
    else:
        source = Source("hub", cfg.dataset, cfg.dataset, [])
        stream = _read_hub(cfg, cfg.dataset)
    for row in stream:
        digest.update(json.dumps(row.data, sort_keys=True, default=str).encode())
        rows.append(row)
        if cfg.max_rows and len(rows) >= cfg.max_rows:
            break
    if not rows:
        raise UserError(f"data.dataset: '{cfg.dataset}' has no rows")
    source.fingerprint = digest.hexdigest()[:16]
    return rows, source


_CHATML_TURN = re.compile(r"<\|im_start\|>([^\n<]*)\n(.*?)<\|im_end\|>", re.DOTALL)
_GEMMA_TURN = re.compile(r"<start_of_turn>([^\n<]*)\n(.*?)<end_of_turn>", re.DOTALL)


# End markers of other tokenizers that exports leave after the last turn; stripped (and counted).
FOREIGN_END_MARKERS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<|eot_id|>", "<|end|>")
FOREIGN_END_STRIPPED = "foreign end marker after the last turn stripped"
# Fields Gemma's turn format cannot express; training on the text alone would learn answers without them.
UNEXPRESSIBLE_ROW_FIELDS = {"tools": "tool definitions", "functions": "function definitions", "images": "images",
                            "image": "an image", "audio": "audio", "audios": "audio", "videos": "videos",
                            "video": "a video"}
UNEXPRESSIBLE_MESSAGE_FIELDS = {"tool_calls": "tool calls", "function_call": "a function call"}


def parse_marked_text(text: str, notes: Counter | None = None) -> list[dict[str, str]]:
    """ChatML or Gemma-format text -> messages; anything else in between is an error (BadRow naming it).
    Another tokenizer's end marker after the last turn (e.g. <|endoftext|>) is stripped and counted."""
    if "<|im_start|>" in text:
        pattern, name = _CHATML_TURN, "ChatML"
    elif "<start_of_turn>" in text:
        pattern, name = _GEMMA_TURN, "Gemma-format"
    else:
        raise BadRow("text has no ChatML (<|im_start|>) or Gemma (<start_of_turn>) turn markers")
    messages, pos = [], 0
    for match in pattern.finditer(text):
        gap = text[pos : match.start()].replace("<bos>", "").replace("<eos>", "").strip()
        if gap:
            raise BadRow(f"unparseable {name} text: stray text {gap[:30]!r} between turns")
        messages.append({"role": match.group(1).strip(), "content": match.group(2)})
        pos = match.end()
    opener = "<|im_start|>" if name == "ChatML" else "<start_of_turn>"
    tail, stripped = text[pos:].replace("<eos>", "").strip(), False
    while tail.endswith(FOREIGN_END_MARKERS):
        tail = tail[: -len(next(m for m in FOREIGN_END_MARKERS if tail.endswith(m)))].rstrip()
        stripped = True
    if tail or not messages:
        cause = ("unterminated turn" if opener in tail else
                 f"text after the last turn: {tail[:30]!r}" if tail else "no complete turn")
        raise BadRow(f"unparseable {name} text: {cause}")
    if stripped and notes is not None:
        notes[FOREIGN_END_STRIPPED] += 1
    return messages


def _as_messages(value: Any, field: str) -> list[Any]:
    if isinstance(value, str):  # a JSON-encoded list (CSV files)
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise BadRow(f"'{field}' is text, not a list of messages") from None
    if not isinstance(value, list):
        raise BadRow(f"'{field}' is not a list of messages")
    return value


# What Gemma 4's turn format reads that Gemma 2/3's cannot: tool definitions (the row's `tools`) and tool calls.
# What it does not read: OpenAI's legacy function fields (its template reads `tools` and `tool_calls`), and media,
# which gemma2-tune does not train yet.
GEMMA4_EXPRESSIBLE = ("tools", "tool_calls")
GEMMA4_UNREAD = {"functions": "(OpenAI's legacy function definitions), which Gemma 4's template does not read (write "
                              "definitions as 'tools')",
                 "function_call": "(OpenAI's legacy function call), which Gemma 4's template does not read (write "
                                  "calls as 'tool_calls')"}


def row_to_messages(data: Any, unsupported: str = "bad_row", notes: Counter | None = None, *,
                    family: Family = GEMMA2, images: bool = False) -> list[Any]:
    """One raw row in any supported schema -> role/content messages (not yet validated).

    Fields the family's turn format cannot express (Gemma 2/3: tool definitions, media, tool calls; Gemma 4: media,
    OpenAI's legacy `functions`/`function_call`) make the row bad, naming the field, unless `unsupported` is
    'ignore' (then they are counted in `notes`). A Gemma 4 row's `tools` are read by `row_turns`. With `images`
    (a caller that reads images, for a family that takes them), an `images` (or `image`) column is read: each
    `<image>` placeholder in a message's text, or image part naming no image, takes the next one
    (`with_image_column`). Raises BadRow.
    """
    if isinstance(data, BadRow):
        raise data
    if not isinstance(data, dict):
        raise BadRow("row is not an object")
    gemma4 = family.turn_format == "gemma4"
    read_images = images and family.images is not None
    for field, what in UNEXPRESSIBLE_ROW_FIELDS.items():
        if field in IMAGE_COLUMNS and read_images:
            continue
        if data.get(field) and not (gemma4 and field in GEMMA4_EXPRESSIBLE):
            _unexpressible(f"row has '{field}' ({what})", field, unsupported, notes, gemma4, family)
    messages = _row_messages(data, notes)
    if read_images:
        column = next((data[k] for k in IMAGE_COLUMNS if data.get(k) is not None), None)
        messages = with_image_column(messages, column)
    for i, message in enumerate(messages):
        for field, what in UNEXPRESSIBLE_MESSAGE_FIELDS.items():
            if isinstance(message, dict) and message.get(field) and not (gemma4 and field in GEMMA4_EXPRESSIBLE):
                _unexpressible(f"message {i} has '{field}' ({what})", field, unsupported, notes, gemma4)
    return messages


def row_turns(data: Any, cfg: DataSection, family: Family, *, allow_open_end: bool = False,
              notes: Counter | None = None, images: ReadImage | None = None) -> list[Turn]:
    """One raw row -> the family's turns, as training renders them: its messages (`row_to_messages`), its `tools`
    (Gemma 4), the data section's system policy and thinking; `images` reads its images (data/images.py
    ImageReader; None: images are refused). Raises BadRow saying why the row can't be trained."""
    messages = row_to_messages(data, cfg.unsupported_fields, notes, family=family, images=images is not None)
    tools = data.get("tools") if family.turn_format == "gemma4" else None
    return normalise(messages, cfg.system_policy, allow_open_end=allow_open_end, family=family, notes=notes,
                     tools=tools, thinking=cfg.enable_thinking, images=images)


IMAGE_COLUMNS = ("images", "image")  # LLaVA/ShareGPT-style rows: image paths beside messages with <image> in them
IMAGE_PLACEHOLDER = "<image>"


def _column_image(value: Any, k: int) -> dict[str, Any]:
    """One entry of an `images` column as an image content part: a path or URL string, a {"path": ...} or
    {"bytes": ...} object (Hugging Face datasets' Image feature), or a PIL image. Raises BadRow."""
    if isinstance(value, str):
        return {"type": "image", "image": value}
    if isinstance(value, dict) and isinstance(value.get("bytes"), (bytes, bytearray)):
        return {"type": "image", "image": "data:image;base64," + base64.b64encode(value["bytes"]).decode()}
    if isinstance(value, dict) and isinstance(value.get("path"), str):
        return {"type": "image", "image": value["path"]}
    if hasattr(value, "save") and hasattr(value, "size"):  # a decoded PIL image (a parquet Image column)
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return {"type": "image", "image": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()}
    raise BadRow(f"images[{k}] is not an image path, URL or image object")


def with_image_column(messages: list[Any], column: Any) -> list[Any]:
    """Messages with the row's `images` column put in place, in order: each `<image>` in a string content becomes
    an image part between its text (LLaVA/ShareGPT style), and each image part naming no image (TRL's datasets:
    {"type": "image"}) takes the next entry. Raises BadRow when the column and the places for images disagree in
    number, or the column is not a list."""
    if column is None:
        return messages
    if not isinstance(column, (list, tuple)):
        column = [column]
    queue = [_column_image(v, k) for k, v in enumerate(column)]
    places, out = 0, []
    for message in messages:
        if not isinstance(message, dict):
            out.append(message)
            continue
        content = message.get("content")
        if isinstance(content, str) and IMAGE_PLACEHOLDER in content:
            parts = []
            for k, text in enumerate(content.split(IMAGE_PLACEHOLDER)):
                if k:
                    parts.append(queue[places] if places < len(queue) else {"type": "image"})
                    places += 1
                if text.strip():
                    parts.append({"type": "text", "text": text})
            message = message | {"content": parts}
        elif isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image" and not any(
                        isinstance(part.get(k), str) for k in ("image", "url", "path")):
                    part = queue[places] if places < len(queue) else part
                    places += 1
                parts.append(part)
            message = message | {"content": parts}
        out.append(message)
    if places != len(queue):
        raise BadRow(f"the row's images column has {len(queue)} image{'s' * (len(queue) != 1)} but its messages have "
                     f"{places} place{'s' * (places != 1)} for one ({IMAGE_PLACEHOLDER} in the text, or image parts "
                     "naming no image)")
    return out


def _unexpressible(what: str, field: str, unsupported: str, notes: Counter | None, gemma4: bool = False,
                   family: Family | None = None) -> None:
    if unsupported != "ignore":
        if field in IMAGE_COLUMNS and family is not None and family.images is not None:
            what += (", which this command does not read (images are trained by sft and evaluated by eval; chat "
                     "--image and serve take them)")
        elif gemma4 and field in GEMMA4_UNREAD:
            what = f"{what.split(' (')[0]} {GEMMA4_UNREAD[field]}"
        elif field in ("audio", "audios"):
            what += f", {AUDIO_NOT_TRAINED}"
        elif gemma4:
            what += ", which gemma2-tune does not train on Gemma 4 yet (text, reasoning, tools and images only)"
        else:
            what += ", which Gemma's turn format cannot express"
        raise BadRow(f"{what}; data.unsupported_fields=ignore trains on the text without it")
    if notes is not None:
        notes[f"'{field}' ignored (data.unsupported_fields=ignore)"] += 1


def _row_messages(data: dict, notes: Counter | None) -> list[Any]:
    if data.get("messages") is not None:
        return _as_messages(data["messages"], "messages")
    if data.get("conversations") is not None:
        convo = _as_messages(data["conversations"], "conversations")
        return [
            {"role": m.get("from", m.get("role")), "content": m.get("value", m.get("content"))}
            if isinstance(m, dict) else m
            for m in convo
        ]
    if data.get("chosen") is not None and data.get("rejected") is not None and data.get("completion") is None:
        raise BadRow("a preference pair (chosen/rejected), not a chat: `dpo` and `reward` train on pairs, and `eval` "
                     "scores pairs for a reward model")
    if data.get("prompt") is not None or data.get("completion") is not None:
        prompt, completion = data.get("prompt"), data.get("completion")
        if prompt is None or completion is None:
            raise BadRow("row has only one of 'prompt' and 'completion'")
        prompt_msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _as_messages(prompt, "prompt")
        completion_msgs = (
            [{"role": "assistant", "content": completion}]
            if isinstance(completion, str)
            else _as_messages(completion, "completion")
        )
        return prompt_msgs + completion_msgs
    if isinstance(data.get("text"), str):
        return parse_marked_text(data["text"], notes)
    present = sorted(k for k, v in data.items() if v is not None)
    raise BadRow(f"no known schema (has {present}; expected messages, conversations, prompt/completion or text)")
