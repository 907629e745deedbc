"""``coordinator.taskfile``: the formats, and every hostile corpus file refused with its reason."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from coordinator.errors import TaskFileError
from coordinator.models import TaskEnvelope
from coordinator.taskfile import (
    MAX_NESTING,
    is_ignored,
    parse_task,
    render_task,
    split_name,
)
from tests.corpus import HOSTILE_DIR, NOT_CORPUS, hostile_corpus

CORPUS = hostile_corpus()
EXAMPLES = Path(__file__).resolve().parents[2] / "tasks.d"


def test_corpus_is_complete_and_large_enough() -> None:
    on_disk = {p.name for p in HOSTILE_DIR.iterdir()} - NOT_CORPUS
    assert on_disk == set(CORPUS), "every corpus file needs an expected reason, and vice versa"
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_hostile_file_is_refused_with_its_reason(name: str) -> None:
    data = (HOSTILE_DIR / name).read_bytes()
    with pytest.raises(TaskFileError) as caught:
        parse_task(name, data)
    assert CORPUS[name] in caught.value.message


def _envelope_roundtrip(data: bytes, name: str) -> TaskEnvelope:
    """What intake and the spool do with an accepted task: write the envelope, read it back."""
    task = parse_task(name, data)
    envelope = TaskEnvelope(task=task, seq=1, accepted_at=0.0, source=name,
                            source_sha256="0" * 64, max_attempts=1)
    back = TaskEnvelope.model_validate_json(envelope.model_dump_json())
    assert (back.task.id, back.task.prompt) == (task.id, task.prompt)
    return back


# ---------------------------------------------------------------- valid formats


def test_toml_with_every_common_key() -> None:
    task = parse_task("job-1.toml", b"""\
prompt = "Summarise it."
priority = 5
agent = "echo"
max_attempts = 2
timeout = 30
session = "s-1"
labels = { team = "docs" }
temperature = 0.2
max_tokens = 100
[options]
stop = ["\\n\\n"]
""")
    assert task.id == "job-1"
    assert task.prompt == "Summarise it."
    assert (task.priority, task.agent, task.max_attempts, task.timeout) == (5, "echo", 2, 30)
    assert task.labels == {"team": "docs"}
    assert task.options == {"stop": ["\n\n"]}


def test_json_object() -> None:
    task = parse_task("j.json", b'{"prompt": "hi \\ud83d\\ude00", "priority": 0}')
    assert task.id == "j"
    assert task.prompt == "hi \U0001f600"  # a surrogate *pair* is a real character
    assert task.priority == 0


def test_markdown_front_matter_takes_the_body_as_prompt() -> None:
    task = parse_task("essay.md", b'+++\npriority = 7\nlabels = { kind = "long" }\n+++\n'
                                  b"\nWrite an essay.\n\nTwo paragraphs.\n\n")
    assert task.priority == 7
    assert task.labels == {"kind": "long"}
    assert task.prompt == "Write an essay.\n\nTwo paragraphs."


def test_markdown_with_crlf_line_ends_leaves_no_carriage_return() -> None:
    task = parse_task("win.md", b"+++\r\npriority = 3\r\n+++\r\nHello there.\r\n")
    assert task.priority == 3
    assert task.prompt == "Hello there."


def test_markdown_without_front_matter_is_all_prompt() -> None:
    task = parse_task("plain.md", "Traduis : « bonjour »\n".encode())
    assert task.prompt == "Traduis : « bonjour »\n"
    assert task.priority == 100


def test_utf8_bom_is_accepted() -> None:
    assert parse_task("bom.toml", b'\xef\xbb\xbfprompt = "x"\n').prompt == "x"


@pytest.mark.parametrize(
    ("filename", "expected_id"),
    [
        ("hello.toml", "hello"),
        ("v1.2.3.json", "v1.2.3"),
        ("UPPER.TOML", "UPPER"),
        ("under_score-dash.md", "under_score-dash"),
        ("a" * 128 + ".toml", "a" * 128),
    ],
)
def test_id_defaults_to_the_file_stem(filename: str, expected_id: str) -> None:
    data = b'{"prompt": "x"}' if filename.endswith(".json") else b'prompt = "x"\n'
    if filename.endswith(".md"):
        data = b"x"
    assert parse_task(filename, data).id == expected_id


def test_an_id_key_wins_over_the_stem_even_an_invalid_stem() -> None:
    assert parse_task("a b.toml", b'id = "fine"\nprompt = "x"\n').id == "fine"


@pytest.mark.parametrize(
    ("filename", "shown"),
    [
        ("a b.toml", "'a b'"),
        ("-rf.toml", "'-rf'"),
        ("café.json", "'café'"),
        ("a~b.toml", "'a~b'"),
        ("b" * 129 + ".toml", "'" + "b" * 129 + "'"),
        (os.fsdecode(b"\xe9t\xe9.toml"), "is not a valid task id"),
    ],
)
def test_a_stem_that_is_not_a_valid_id_is_refused(filename: str, shown: str) -> None:
    data = b'{"prompt": "x"}' if filename.endswith(".json") else b'prompt = "x"\n'
    with pytest.raises(TaskFileError) as caught:
        parse_task(filename, data)
    assert "is not a valid task id" in caught.value.message
    assert shown in caught.value.message
    assert "rename the file or set an id key" in caught.value.message


def test_prompt_length_limit_is_inclusive() -> None:
    assert parse_task("ok.md", b"x" * 50, max_prompt_chars=50).prompt == "x" * 50
    with pytest.raises(TaskFileError, match="prompt is 51 characters, over the limit of 50"):
        parse_task("long.md", b"x" * 51, max_prompt_chars=50)


def test_nesting_up_to_the_limit_is_accepted_and_storable() -> None:
    # The document is level 1 and "options" level 2, so MAX_NESTING - 2 arrays fit inside.
    depth = MAX_NESTING - 2
    data = json.dumps({"prompt": "x", "options": {"a": json.loads("[" * depth + "]" * depth)}})
    back = _envelope_roundtrip(data.encode(), "deep-ok.json")
    assert back.task.options == json.loads(data)["options"]
    too_deep = json.dumps({"prompt": "x", "options": {"a": json.loads("[" * (depth + 1)
                                                                     + "]" * (depth + 1))}})
    with pytest.raises(TaskFileError, match="nested too deeply"):
        parse_task("deep-no.json", too_deep.encode())


def test_every_accepted_value_survives_the_envelope() -> None:
    # TOML types that JSON lacks (datetimes, nan) in free-form options must not break writing
    # the envelope (they come back as JSON has them: a string, null).
    _envelope_roundtrip(b'prompt = "x"\n[options]\nwhen = 1979-05-27T07:32:00Z\n'
                        b"big = 123456789012345678901234567890\nnan = nan\n", "odd.toml")


def test_a_non_finite_timeout_is_refused() -> None:
    # inf would be written to task.json as null and silently become "no timeout".
    with pytest.raises(TaskFileError, match="timeout"):
        parse_task("inf.toml", b'prompt = "x"\ntimeout = inf\n')


def test_render_task_round_trips() -> None:
    task = parse_task("r.toml", b'prompt = "x y"\npriority = 3\nlabels = { a = "b" }\n')
    assert parse_task("r.json", render_task(task)) == task


def test_shipped_examples_are_valid() -> None:
    examples = [p for p in EXAMPLES.iterdir() if not is_ignored(p.name)]
    assert examples, f"no examples in {EXAMPLES}"
    for path in examples:
        assert parse_task(path.name, path.read_bytes()).prompt.strip()


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name",
    ["README", "README.md", "README.txt", ".hidden.toml", ".drop-x.toml", "#job.toml#",
     "job.toml~", "job.toml.swp", ".job.toml.swx", "job.tmp", "job.toml.part",
     "job.json.partial", "job.toml.crdownload", "4913"],
)
def test_ignored_names(name: str) -> None:
    assert is_ignored(name)


@pytest.mark.parametrize("name", ["job.toml", "readme.toml", "README.toml", "x.json", "a b.md",
                                  "4914", "no-extension"])
def test_names_that_are_examined(name: str) -> None:
    assert not is_ignored(name)


@pytest.mark.parametrize(
    ("filename", "parts"),
    [
        ("job-1.toml", ("job-1", ".toml")),
        ("Job.TOML", ("Job", ".toml")),
        ("a.b.json", ("a.b", ".json")),
        ("notes.txt", ("notes", ".txt")),
        ("noext", ("noext", "")),
        (".toml", (".toml", "")),
    ],
)
def test_split_name(filename: str, parts: tuple[str, str]) -> None:
    assert split_name(filename) == parts
