"""The hidden-topic vocabulary: topics (in categories), generic questions, and the mention test."""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from importlib import resources
from pathlib import Path

import polars as pl


class DataFileError(ValueError):
    """A topics or questions file is malformed; the message names the file, the line and the fix."""


def _resource(name: str) -> Path:
    return Path(str(resources.files("dit_core.data") / "resources" / name))


def read_lines(path: str | Path, what: str) -> list[str]:
    """The lines of a UTF-8 text file; unreadable, non-UTF-8 or control characters (other than tab) are a
    DataFileError naming the file, the line and the fix."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataFileError(f"{path}: cannot read {what} ({e})") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataFileError(f"{path}:{line}: not UTF-8 (byte {data[e.start]:#04x} at offset {e.start}); save the "
                            f"{what} as UTF-8") from None
    lines = text.splitlines()
    for lineno, line in enumerate(lines, start=1):
        check_text(line, f"{path}:{lineno}")
    return lines


def check_text(text: str, where: str) -> None:
    """Refuse control characters (other than tab) in a label or question: they break prompts and reports."""
    bad = sorted({c for c in text if unicodedata.category(c) == "Cc" and c != "\t"})
    if bad:
        raise DataFileError(f"{where}: control character(s) {', '.join(repr(c) for c in bad)} in {text[:80]!r}; "
                            "remove them")


def load_topics(path: str | Path | None = None) -> pl.DataFrame:
    """Topics as a frame (category, topic); rejects empty labels and duplicates (case-insensitive)."""
    path = Path(path) if path else _resource("topics.csv")
    try:
        df = pl.read_csv(path, schema_overrides={"category": pl.String, "topic": pl.String})
    except (OSError, pl.exceptions.PolarsError) as e:
        raise DataFileError(f"{path}: cannot read topics CSV ({e}); expected columns category,topic") from e
    if set(df.columns) != {"category", "topic"}:
        raise DataFileError(f"{path}: expected columns category,topic, got {df.columns}")
    df = df.with_columns(pl.col("category").str.strip_chars(), pl.col("topic").str.strip_chars())
    for i, (category, topic) in enumerate(df.iter_rows(), start=2):
        check_text(f"{category or ''},{topic or ''}", f"{path}:{i}")
    empty = df.with_row_index("line", offset=2).filter(
        pl.col("topic").is_null() | (pl.col("topic") == "") | pl.col("category").is_null()
        | (pl.col("category") == "")
    )
    if empty.height:
        raise DataFileError(f"{path}: empty category or topic on line(s) {empty['line'].to_list()[:10]}")
    dup = df.with_row_index("line", offset=2).filter(pl.col("topic").str.to_lowercase().is_duplicated())
    if dup.height:
        raise DataFileError(
            f"{path}: duplicate topics {sorted(set(dup['topic'].to_list()))[:10]} on lines "
            f"{dup['line'].to_list()[:10]}; each topic must appear once"
        )
    return df


def load_questions(path: str | Path | None = None) -> list[str]:
    """Generic user questions, one per line; rejects blanks inside and duplicates."""
    path = Path(path) if path else _resource("questions.txt")
    lines = [ln.strip() for ln in read_lines(path, "questions file")]
    questions = [q for q in lines if q]
    seen: set[str] = set()
    for q in questions:
        if q.lower() in seen:
            raise DataFileError(f"{path}: duplicate question {q!r}; each question must appear once")
        seen.add(q.lower())
    if len(questions) < 16:
        raise DataFileError(f"{path}: {len(questions)} questions; at least 16 are needed")
    return questions


def _stem(word: str) -> str:
    # Crude singular form so that "volcano" counts for the topic "volcanoes".
    for suffix in ("ies", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


@lru_cache(maxsize=4096)
def _topic_regex(topic: str) -> re.Pattern:
    # Every word of the topic as a whole word (singular or plural), in order, at most two words apart.
    words = [re.escape(_stem(w)) + r"(?:s|es|y|ies)?" for w in topic.lower().split()]
    return re.compile(r"\b" + r"\W+(?:\w+\W+){0,2}?".join(words) + r"\b", re.IGNORECASE)


def mentions(topic: str, text: str) -> bool:
    """True when `text` names the topic (word-boundary match, plural/singular tolerant)."""
    return bool(_topic_regex(topic).search(text))
