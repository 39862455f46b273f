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
