"""Parse a task file's bytes into a validated :class:`Task` (no I/O).

Formats: ``.toml``, ``.json``, and ``.md`` with a TOML front matter block between ``+++`` lines
whose body is the prompt. Every failure raises ``TaskFileError`` whose message says what is wrong,
where, and how to fix it: it is written verbatim into the ``.reason`` file next to a rejected task.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from typing import Any

from pydantic import ValidationError

from coordinator.errors import TaskFileError
from coordinator.models import Task, is_valid_name

TASK_SUFFIXES = (".toml", ".json", ".md")
ALLOWED_KEYS = sorted(Task.model_fields)
IGNORED_NAMES = {"README", "README.md", "README.txt", "4913"}  # 4913: vim's write probe
IGNORED_SUFFIXES = ("~", ".swp", ".swx", ".swo", ".tmp", ".part", ".partial", ".crdownload")


def is_ignored(name: str) -> bool:
    """Dotfiles, editor and download temporaries, and the format's README."""
    return (
        name.startswith((".", "#"))
        or name in IGNORED_NAMES
        or name.endswith(IGNORED_SUFFIXES)
    )


ID_RULE = (
    "letters, digits, '-', '_' and '.', starting with a letter or digit, at most 128 characters"
)


def split_name(filename: str) -> tuple[str, str]:
    """``("job-1", ".toml")`` for ``job-1.toml``; the suffix is lower-cased."""
    for suffix in TASK_SUFFIXES:
        if filename.lower().endswith(suffix) and len(filename) > len(suffix):
            return filename[: -len(suffix)], suffix
    dot = filename.rfind(".")
    return (filename[:dot], filename[dot:].lower()) if dot > 0 else (filename, "")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _decode(data: bytes) -> str:
    # Windows editors save "Unicode" as UTF-16; say so rather than "binary data: NUL byte".
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise TaskFileError(
            "the file is UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8."
        )
    nul = data.find(b"\x00")
    if nul >= 0:
        raise TaskFileError(
            f"binary data: NUL byte at offset {nul}. A task file is UTF-8 text "
            "(TOML, JSON or Markdown with +++ front matter)."
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TaskFileError(
            f"not valid UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} "
            f"({exc.reason}). Save the file as UTF-8."
        ) from exc
    return text.removeprefix("\ufeff")


def _parse_toml(text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TaskFileError(f"TOML syntax error: {exc}. Fix the syntax and drop it again.") from exc
    # tomllib lets two other errors out, and either would escape to the daemon's intake loop
    # and abort every pass there while the file stays in tasks.d: an integer of more than 4300
    # digits (ValueError from int()) and arrays or tables nested past the recursion limit.
    except ValueError as exc:
        raise TaskFileError(_value_error("TOML", exc)) from exc
    except RecursionError as exc:
        raise TaskFileError(_too_deep()) from exc


def _value_error(fmt: str, exc: ValueError) -> str:
    # The interpreter's text ends in advice for programmers ("use sys.set_int_max_str_digits()");
    # keep only the part that says what is wrong with the file.
    detail = str(exc).split(";")[0]
    return f"{fmt} value error: {detail}. Write a huge number as a string, or drop the value."


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last of two equal keys; TOML calls that an error, and a
    # task whose "prompt" appears twice is ambiguous, so JSON says so too.
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise TaskFileError(
                f"duplicate key {key!r} in a JSON object; keep one of them and drop it again."
            )
        seen[key] = value
    return seen


JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "a boolean", type(None): "null"}


def _parse_json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise TaskFileError(
            f"JSON syntax error at line {exc.lineno} column {exc.colno}: {exc.msg}. "
            "Fix the syntax and drop it again."
        ) from exc
    # As for TOML: an integer of more than 4300 digits, or nesting past the recursion limit,
    # must not escape as a foreign exception (it would wedge the intake loop).
    except ValueError as exc:
        raise TaskFileError(_value_error("JSON", exc)) from exc
    except RecursionError as exc:
        raise TaskFileError(_too_deep()) from exc
    if not isinstance(value, dict):
        kind = JSON_TYPES.get(type(value), type(value).__name__)
        raise TaskFileError(
            f'the JSON document is {kind}, not an object; write {{"prompt": "..."}}.'
        )
    return value


# Deeper values than this are refused: pydantic reads JSON only ~200 levels deep and writes
# it ~500 deep, so a deeper ``options`` value would make the spool fail to write the task's
# envelope (aborting the whole intake batch) or, below that, write one nobody can read back.
MAX_NESTING = 32


def _too_deep() -> str:
    return (f"values are nested too deeply (the limit is {MAX_NESTING} levels of arrays and "
            "tables); flatten them.")


def _check_values(document: dict[str, Any]) -> None:
    """Refuse what parses but cannot be stored: deep nesting, lone surrogates (JSON ``\\ud800``)."""
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_NESTING:
                raise TaskFileError(_too_deep())
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                stack.append((key, depth))
                stack.append((item, depth + 1))
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise TaskFileError(
                    f"a string holds an unpaired surrogate escape ({value[exc.start]!r}); "
                    "write the character itself or a valid surrogate pair."
                ) from exc


def _parse_markdown(text: str) -> dict[str, Any]:
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != "+++":
        return {"prompt": text}
    for index in range(1, len(lines)):
        if lines[index].strip() == "+++":
            front = _parse_toml("".join(lines[1:index]))
            if "prompt" in front:
                raise TaskFileError(
                    "a Markdown task takes its prompt from the body; remove 'prompt' from the "
                    "front matter."
                )
            # "\r" too: a file saved with CRLF line ends must not leave one on the prompt.
            front["prompt"] = "".join(lines[index + 1 :]).strip("\r\n")
            return front
    raise TaskFileError(
        "the +++ front matter block is not closed; add a line with only +++ after it."
    )


def _explain(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(document)"
        kind = err["type"]
        if kind == "extra_forbidden":
            problems.append(
                f"unknown key '{loc}' (allowed keys: {', '.join(ALLOWED_KEYS)})"
            )
        elif kind == "missing":
            problems.append(f"missing required key '{loc}'")
        elif loc == "id" and kind == "string_pattern_mismatch":
            problems.append(f"id {err['input']!r} is not valid: use {ID_RULE}")
        elif loc == "agent" and kind == "string_pattern_mismatch":
            problems.append(f"agent {err['input']!r} is not a valid agent spec name")
        else:
            shown = repr(err.get("input"))
            if len(shown) > 60:
                shown = shown[:57] + "..."
            problems.append(f"'{loc}': {err['msg']} (got {shown})")
    return "; ".join(problems)


def parse_task(filename: str, data: bytes, max_prompt_chars: int = 500_000) -> Task:
    """Validate one task file. Raises ``TaskFileError`` with an actionable message."""
    stem, suffix = split_name(filename)
    if suffix not in TASK_SUFFIXES:
        raise TaskFileError(
            f"unsupported file type {suffix or '(none)'!r}; name task files *.toml, *.json "
            "or *.md."
        )
    text = _decode(data)
    if suffix == ".toml":
        raw = _parse_toml(text)
    elif suffix == ".json":
        raw = _parse_json(text)
    else:
        raw = _parse_markdown(text)
    _check_values(raw)
    if "id" not in raw:
        if not is_valid_name(stem):
            raise TaskFileError(
                f"the file name {stem!r} is not a valid task id ({ID_RULE}); rename the file "
                "or set an id key."
            )
        raw["id"] = stem
    prompt = raw.get("prompt")
    if isinstance(prompt, str) and len(prompt) > max_prompt_chars:
        raise TaskFileError(
            f"prompt is {len(prompt)} characters, over the limit of {max_prompt_chars}; "
            "shorten it or raise max_prompt_chars in coordinator.toml."
        )
    try:
        return Task.model_validate(raw)
    except ValidationError as exc:
        raise TaskFileError(f"invalid task: {_explain(exc)}.") from exc


def render_task(task: Task) -> bytes:
    """The canonical JSON form of a task (what ``coordinator submit`` drops)."""
    return json.dumps(task.model_dump(exclude_defaults=True), indent=2).encode("utf-8") + b"\n"
