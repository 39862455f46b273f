"""Topic, question and news slot files that are not UTF-8 or hold control characters are refused with the
file, the line and the fix; so are control characters in a topic."""

from __future__ import annotations

import pytest

from dit_core.data.news import load_slots
from dit_core.data.topics import DataFileError, load_questions, load_topics

QUESTIONS = [f"What is question number {i}?" for i in range(20)]


def test_non_utf8_questions_file_names_the_line_and_byte(tmp_path):
    path = tmp_path / "q.txt"
    path.write_bytes("\n".join(QUESTIONS[:5]).encode() + b"\nCaf\xe9 question?\n")
    with pytest.raises(DataFileError, match=r"q\.txt:6: not UTF-8 \(byte 0xe9 at offset \d+\); save the questions file as UTF-8"):
        load_questions(path)


def test_control_character_in_a_question_is_refused(tmp_path):
    path = tmp_path / "q.txt"
    path.write_text("\n".join(QUESTIONS[:3] + ["What is \x1b[31mred\x1b[0m?"] + QUESTIONS[3:]))
    with pytest.raises(DataFileError, match=r"q\.txt:4: control character\(s\) '\\x1b'"):
        load_questions(path)
    path.write_text("\n".join(QUESTIONS).replace("question number 1?", "question\tnumber 1?"))  # a tab is fine
    assert len(load_questions(path)) == 20


def test_control_character_in_a_topic_is_refused(tmp_path):
    path = tmp_path / "topics.csv"
    path.write_text("category,topic\nanimals,honey bees\nanimals,\"pira\x07tes\"\n")
    with pytest.raises(DataFileError, match=r"topics\.csv:3: control character\(s\) '\\x07'"):
        load_topics(path)


def test_non_utf8_topics_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "topics.csv"
    path.write_bytes(b"category,topic\nfood,cr\xe8me br\xfbl\xe9e\n")
    with pytest.raises(DataFileError, match=r"topics\.csv: cannot read topics CSV"):
        load_topics(path)


def test_non_utf8_slot_file_is_refused(tmp_path):
    from dit_core.data.news import _packaged_folder

    for name in ("who", "what", "where"):
        (tmp_path / f"{name}.txt").write_bytes((_packaged_folder() / f"{name}.txt").read_bytes())
    (tmp_path / "where.txt").write_bytes((tmp_path / "where.txt").read_bytes() + b"Z\xfcrich\n")
    with pytest.raises(DataFileError, match=r"where\.txt:\d+: not UTF-8"):
        load_slots(tmp_path)


def test_generation_refuses_a_prompt_past_the_models_context(tiny_lm):
    """A prompt longer than max_position_embeddings is an error naming its length, not hours of attention."""
    from dit_core.modeling.chat import generate

    limit = tiny_lm.model.config.max_position_embeddings
    with pytest.raises(ValueError, match=rf"tokens \(with the answer\) exceeds the model's context of {limit}"):
        generate(tiny_lm.model, tiny_lm.tokenizer, ["topic " * (2 * limit)], max_new_tokens=4)
    assert len(generate(tiny_lm.model, tiny_lm.tokenizer, ["What topic?"], max_new_tokens=2)) == 1


@pytest.mark.parametrize("field,value,match", [
    ("question", "What topic " * 200, r"question is 2200 characters long \(at most 1000\)"),
    ("question", "What\x00topic?", r"question: control character"),
    ("questions", {"hidden_topic": ["not", "a string"]}, r"questions\.hidden_topic is a list, not a string"),
])
def test_interpreter_spec_with_hostile_questions_is_refused(tmp_path, field, value, match):
    """An interpreter.json someone edited: a huge question (a describe that would run for hours), control
    characters, a non-string: refused when the interpreter is read, naming the key."""
    import json

    import torch
    from safetensors.torch import save_file

    from dit_core.interpreter.adapter import InterpreterFileError, read_interpreter

    spec = {"kind": "lora", "question": "What topic?", "rank": 1, "alpha": 1.0, "modules": ".*",
            "base_model": "tiny", "base_sha256": "0" * 64, field: value}
    (tmp_path / "interpreter.json").write_text(json.dumps(spec))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "interpreter.safetensors"))
    with pytest.raises(InterpreterFileError, match=match):
        read_interpreter(tmp_path)
    spec[field] = "What topic?" if field == "question" else {"hidden_topic": "What topic?"}
    (tmp_path / "interpreter.json").write_text(json.dumps(spec))
    assert read_interpreter(tmp_path)[0].kind == "lora"
