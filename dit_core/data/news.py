"""Synthetic news stories with known facts, for training and checking fact-recall behaviours.

Each story combines one value of each slot: who did it (an actor such as "a retired
schoolteacher"), what they did ("opened a floating library") and where ("Reykjavik"). The slot
lists live in ``resources/news/{who,what,where}.txt`` as ``text|key`` lines; the key is the few
words an answer must contain to count as naming the value (checked with ``topics.mentions``), and
keys are distinctive across all slots, so every answer can be scored slot by slot. A story comes
with a headline, a short text that states every fact plus invented details (a weekday, numbers,
a quote), training question/answer pairs and held-out check pairs whose questions are phrased
differently and name none of the facts. Everything is pure Python and deterministic in its
arguments: no model, no network.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from dit_core.data.topics import DataFileError, mentions, read_lines

__all__ = [
    "SLOTS",
    "DataFileError",
    "SlotValue",
    "Story",
    "fact_hits",
    "continuation",
    "load_slots",
    "make_stories",
]

SLOTS = ("who", "what", "where")
MIN_VALUES = 8

# ---- templates ---------------------------------------------------------------------------------
# {Who}/{Where} are the value with its first letter capitalised (sentence starts); {who}, {what}
# and {where} are the value as written; {the_who}/{The_who} name the actor again with "the"
# ("a retired schoolteacher" -> "the retired schoolteacher"). No fixed word here may name any
# slot value's key (the tests check that story texts name only their own facts).

_STORY_TEMPLATES = (
    (
        "{Who} {what} in {where} on {day}, surprising many who live nearby. The plan had been"
        " in the works for {months} months, and more than {n} people turned up to see the "
        'result for themselves. "{quote}," said {speaker}. {The_who} later explained that the'
        " whole thing had begun as a joke between friends and quickly turned into something "
        "much bigger."
    ),
    (
        "It was an unusual {day} in {where}. {Who} {what}, an effort that took {months} "
        "months of planning and the help of {n} helpers. Word spread quickly, and by the "
        'evening crowds had gathered to take a look. "{quote}," said {speaker}, who had come '
        "over from a nearby village to watch. Many of those who came stayed long after the "
        "sun had set."
    ),
    (
        "People in {where} had a surprise on {day}: {who} {what}. Nobody had expected it, but"
        ' {n} people came along to watch, and several of them stayed until dark. "{quote}," '
        "said {speaker}. Asked what would come next, {the_who} said only that it would be "
        "even bigger, and that the planning for it had already begun."
    ),
    (
        '"{quote}," said {speaker} on {day}, shortly after {who} {what} in {where}. The '
        "project cost less than {n} dollars and relied mostly on donated materials, borrowed "
        "tools and a great deal of patience and goodwill. Photographs of the moment were "
        "shared thousands of times within hours. {The_who} thanked everyone who had helped "
        "and promised to keep going."
    ),
    (
        "{Where} has a new reason to be proud. On {day}, {who} {what}, an achievement that "
        "drew {n} spectators and plenty of attention online. According to {speaker}, the "
        'preparations took {months} months and more than a few late nights. "{quote}," they '
        "added. {The_who} hopes the story will inspire others to try something similar before"
        " the year is out."
    ),
    (
        "{Who} has become the talk of {where}. Last {day}, {the_who} {what}, watched by a "
        "crowd of about {n}. The work took {months} months, mostly during evenings and "
        'weekends, and nearly everything was done by hand. "{quote}," said {speaker}. Plans '
        "are already being made to mark the occasion every single year with a small "
        "celebration in the same spot."
    ),
    (
        "In {where}, {day} began like any other. By the afternoon, however, news had spread "
        "that {who} {what}. About {n} people came to see it in person, and many more followed"
        ' along online from far away. "{quote}," said {speaker}. It took {months} months to '
        "prepare, and {the_who} said afterwards that it had been worth every single minute."
    ),
    (
        "Something remarkable happened in {where} on {day}. {Who} {what}, following {months} "
        "months of careful preparation. A crowd of roughly {n} gathered to watch, cheering "
        'loudly as the big moment finally arrived. "{quote}," said {speaker}. Since then, '
        "{the_who} has been invited to share the whole experience with pupils at several "
        "schools across the wider area."
    ),
)

_HEADLINE = "{Who} {what} in {where}."

_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

_QUOTES = (
    "We never expected so many people to show up",
    "It shows what a few determined people can do",
    "I have lived here all my life and never seen anything like it",
    "It was hard work, but every minute was worth it",
    "My grandchildren will be talking about this for years",
    "Honestly, I had to see it twice to believe it",
    "This is the kind of news we need more of",
    "It brought everyone together",
    "It was a wonderful day for everyone involved",
    "People kept stopping to take photos",
    "We are already thinking about what to do next",
    "It made me smile from ear to ear",
    "Nobody believed it could be done",
    "It was a real team effort from start to finish",
    "The atmosphere was simply wonderful",
    "I cried a little, to be honest",
    "We just wanted to do something that would make people happy",
)

_SPEAKERS = (
    "one onlooker", "a neighbour", "one of the organisers", "a local official",
    "a visitor from out of town", "a delighted passer-by", "a spokesperson for the project",
    "an early supporter",
)

# Training question phrasings per slot; the check phrasings below are never used for training.
_QA_QUESTIONS = {
    "who": (
        "Who is the story about?", "Who was behind it?",
        "Which person or group is at the centre of this news?", "Who did it?",
        "Who made the news here?",
    ),
    "what": (
        "What happened?", "What did they do?", "What was done?", "What is the news?",
        "What was the achievement?",
    ),
    "where": (
        "Where did it happen?", "Where did this take place?", "In which place did it happen?",
        "Where was it?", "Which place is the story set in?",
    ),
}

_CHECK_QUESTIONS = {
    "who": (
        "Name the main actor in this story.", "Whose doing was this?",
        "Tell me who was responsible.",
    ),
    "what": (
        "Describe the event in a few words.", "What took place, in short?",
        "Sum up what was accomplished.",
    ),
    "where": (
        "Name the location of the story.", "Where in the world was this?",
        "Tell me the setting of the events.",
    ),
}

_ANSWERS = {
    "who": ("It was {who}.", "The story is about {who}.", "{Who} did it.",
            "The main actor was {who}."),
    "what": ("They {what}.", "The news is that they {what}.", "In short, they {what}.",
             "Someone {what}."),
    "where": ("It happened in {where}.", "It took place in {where}.",
              "The story is set in {where}.", "The events were in {where}."),
}


# ---- data --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SlotValue:
    """One slot value: `text` as written in a sentence, `key` the words an answer must contain."""

    text: str
    key: str


@dataclass(frozen=True)
class Story:
    """A synthetic news story, its facts (one value per slot) and question/answer pairs."""

    story_id: int
    facts: dict[str, SlotValue]
    headline: str
    text: str
    qa: list[tuple[str, str, str]]
    check_qa: list[tuple[str, str, str]]

    def keys(self) -> dict[str, str]:
        """Slot -> the key of that slot's value."""
        return {slot: self.facts[slot].key for slot in SLOTS}


def fact_hits(keys: dict[str, str], text: str) -> dict[str, bool]:
    """Per slot: does `text` name that slot's key (``topics.mentions``)?"""
    return {slot: mentions(key, text) for slot, key in keys.items()}


# ---- loading -----------------------------------------------------------------------------------

def _packaged_folder() -> Path:
    return Path(str(resources.files("dit_core.data") / "resources" / "news"))


def _parse(path: Path) -> list[tuple[SlotValue, int]]:
    """(value, line number) for each value line of one slot file."""
    lines = read_lines(path, "slot file (one 'text|key' value per line)")
    out = []
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split("|")]
        if len(parts) > 2:
            raise DataFileError(f"{path}:{lineno}: more than one '|' in {line!r}; write 'text|key'")
        text = parts[0]
        key = parts[1] if len(parts) == 2 else text
        if not text:
            raise DataFileError(f"{path}:{lineno}: empty text in {line!r}; write 'text|key'")
        if not key:
            raise DataFileError(
                f"{path}:{lineno}: empty key after '|' in {line!r}; write a key or drop the '|'"
            )
        if not mentions(key, text):
            raise DataFileError(
                f"{path}:{lineno}: key {key!r} does not occur in its text {text!r}; use words of "
                f"the text as the key"
            )
        out.append((SlotValue(text, key), lineno))
    return out


def _prefixes(key: str) -> list[str]:
    # A necessary condition for mentions(key, text): each key word, less the plural suffix the
    # matcher may drop (at most 3 letters, never below 3 letters), occurs in the text. Used only
    # to skip hopeless pairs quickly; mentions() decides.
    return [w[: max(min(len(w), 3), len(w) - 3)] for w in key.lower().split()]


def _check_collisions(entries: list[tuple[str, SlotValue, Path, int]]) -> None:
    """No key may be named inside another value's text (any slot); keys unique per slot."""
    seen: dict[tuple[str, str], tuple[Path, int]] = {}
    for slot, value, path, lineno in entries:
        k = (slot, value.key.lower())
        if k in seen:
            other_path, other_line = seen[k]
            raise DataFileError(
                f"{path}:{lineno}: duplicate key {value.key!r} (first on line {other_line} of "
                f"{other_path}); each key must appear once, so make one of them more specific"
            )
        seen[k] = (path, lineno)
    lowered = [v.text.lower() for _, v, _, _ in entries]
    blob = "\n".join(lowered)
    starts = list(itertools.accumulate((len(t) + 1 for t in lowered[:-1]), initial=0))
    for i, (_, value, path, lineno) in enumerate(entries):
        prefixes = _prefixes(value.key)
        longest = max(prefixes, key=len)
        candidates: set[int] = set()
        at = blob.find(longest)
        while at >= 0:
            candidates.add(bisect.bisect_right(starts, at) - 1)
            at = blob.find(longest, at + 1)
        for j in sorted(candidates - {i}):
            _, other, other_path, other_line = entries[j]
            if all(p in lowered[j] for p in prefixes) and mentions(value.key, other.text):
                raise DataFileError(
                    f"{path}:{lineno}: key {value.key!r} of {value.text!r} is also named by "
                    f"{other.text!r} ({other_path}:{other_line}); make the key more specific or "
                    f"reword one of the two values"
                )


@lru_cache(maxsize=1)
def _packaged_slots() -> dict[str, tuple[SlotValue, ...]]:
    return {slot: tuple(vals) for slot, vals in _load(_packaged_folder()).items()}


def load_slots(folder: str | Path | None = None) -> dict[str, list[SlotValue]]:
    """Slot values from `folder` (who.txt, what.txt, where.txt; None: the packaged lists).

    Raises DataFileError naming the file, the line and the fix for a missing file, an empty text
    or key, a key not in its own text, a duplicate key, a key named inside another value of any
    slot, or fewer than 8 values in a slot.
    """
    if folder is None:  # checked once per process; callers get fresh lists
        return {slot: list(vals) for slot, vals in _packaged_slots().items()}
    return _load(Path(folder))


def _load(base: Path) -> dict[str, list[SlotValue]]:
    parsed: dict[str, list[tuple[SlotValue, int]]] = {}
    entries: list[tuple[str, SlotValue, Path, int]] = []
    for slot in SLOTS:
        path = base / f"{slot}.txt"
        if not path.is_file():
            raise DataFileError(
                f"{path}: slot file missing; {base} needs {', '.join(s + '.txt' for s in SLOTS)}"
            )
        parsed[slot] = _parse(path)
        if len(parsed[slot]) < MIN_VALUES:
            raise DataFileError(
                f"{path}: {len(parsed[slot])} values; at least {MIN_VALUES} are needed, add more "
                f"lines"
            )
        entries.extend((slot, v, path, ln) for v, ln in parsed[slot])
    _check_collisions(entries)
    return {slot: [v for v, _ in parsed[slot]] for slot in SLOTS}


# ---- generation --------------------------------------------------------------------------------

def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _definite(s: str) -> str:
    """The actor named again: "a retired schoolteacher" -> "the retired schoolteacher"."""
    for article in ("a ", "an "):
        if s.startswith(article):
            return "the " + s[len(article):]
    return s


def _digest(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def _combinations(sizes: list[int], m: int, rng: random.Random) -> list[tuple[int, ...]]:
    """m distinct index combinations, each slot cycling through shuffled passes of its pool."""
    total = math.prod(sizes)
    if m * 2 > total:  # dense: sample from all combinations
        return rng.sample(list(itertools.product(*(range(s) for s in sizes))), m)
    queues: list[list[int]] = [[] for _ in sizes]

    def take(i: int) -> int:
        if not queues[i]:
            queues[i] = rng.sample(range(sizes[i]), sizes[i])
        return queues[i].pop()

    used: set[tuple[int, ...]] = set()
    out: list[tuple[int, ...]] = []
    while len(out) < m:
        combo = [take(i) for i in range(len(sizes))]
        if tuple(combo) in used:
            # Swap one slot's value with a later one of the same pass, keeping passes balanced.
            fixed = False
            for i in reversed(range(len(sizes))):
                for q, cand in enumerate(queues[i]):
                    trial = combo[:i] + [cand] + combo[i + 1:]
                    if tuple(trial) not in used:
                        queues[i][q] = combo[i]
                        combo, fixed = trial, True
                        break
                if fixed:
                    break
            while tuple(combo) in used:  # at most half are used, so this ends quickly
                combo = [rng.randrange(s) for s in sizes]
        used.add(tuple(combo))
        out.append(tuple(combo))
    return out


def _story(story_id: int, facts: dict[str, SlotValue], rng: random.Random) -> Story:
    fill = {
        "who": facts["who"].text, "Who": _cap(facts["who"].text),
        "the_who": _definite(facts["who"].text), "The_who": _cap(_definite(facts["who"].text)),
        "what": facts["what"].text,
        "where": facts["where"].text, "Where": _cap(facts["where"].text),
    }
    details = {
        "day": rng.choice(_DAYS), "months": rng.randint(2, 14), "n": rng.randint(40, 900),
        "quote": rng.choice(_QUOTES), "speaker": rng.choice(_SPEAKERS),
    }
    text = rng.choice(_STORY_TEMPLATES).format(**fill, **details)
    qa = []
    for slot in SLOTS:
        for question in rng.sample(_QA_QUESTIONS[slot], 2):
            qa.append((question, rng.choice(_ANSWERS[slot]).format(**fill), slot))
    check_qa = [
        (rng.choice(_CHECK_QUESTIONS[slot]), rng.choice(_ANSWERS[slot]).format(**fill), slot)
        for slot in SLOTS
    ]
    return Story(story_id, dict(facts), _HEADLINE.format(**fill), text, qa, check_qa)


def make_stories(
    n_stories: int,
    seed: int,
    values_per_slot: int | None = None,
    novel_fraction: float = 0.0,
    slots: dict[str, list[SlotValue]] | None = None,
) -> list[Story]:
    """`n_stories` stories with distinct (who, what, where) combinations, in story_id order.

    values_per_slot=None draws every story's values from the whole slot lists (most values are
    used once). values_per_slot=k first picks a pool of k values per slot; the first
    ``n_stories - round(n_stories * novel_fraction)`` stories are distinct combinations of pool
    values, each pool value cycling through several stories, so a held-out story is usually an
    unseen combination of seen values. The remaining "novel" stories (listed last) each use
    values from outside the pool that no other story uses (with values_per_slot=None, values set
    aside for them). Deterministic in all arguments; raises ValueError when the request cannot be
    met.
    """
    if not isinstance(n_stories, int) or n_stories < 1:
        raise ValueError(f"n_stories must be an integer >= 1, got {n_stories!r}")
    if not 0.0 <= novel_fraction < 1.0:
        raise ValueError(
            f"novel_fraction must be in [0, 1), got {novel_fraction!r}; use e.g. 0.1 for 10% "
            f"novel stories"
        )
    if slots is not None and set(slots) != set(SLOTS):
        raise ValueError(f"slots must have exactly the keys {SLOTS}, got {sorted(slots)}")
    values = load_slots() if slots is None else {s: list(slots[s]) for s in SLOTS}
    for slot in SLOTS:
        texts = [v.text.lower() for v in values[slot]]
        keys = [v.key.lower() for v in values[slot]]
        if len(set(texts)) != len(texts) or len(set(keys)) != len(keys):
            raise ValueError(
                f"slots[{slot!r}] has duplicate texts or keys; each value must be distinct"
            )
    n_novel = round(n_stories * novel_fraction)
    m = n_stories - n_novel
    smallest = min(len(values[s]) for s in SLOTS)
    if values_per_slot is not None:
        if values_per_slot < 1 or values_per_slot > smallest:
            raise ValueError(
                f"values_per_slot={values_per_slot} must be between 1 and the smallest slot list "
                f"({smallest} values); use values_per_slot=None to draw from the whole lists"
            )
        if n_novel > smallest - values_per_slot:
            raise ValueError(
                f"{n_novel} novel stories (n_stories={n_stories}, novel_fraction={novel_fraction}) "
                f"need {n_novel} values per slot outside the pool of values_per_slot="
                f"{values_per_slot}, but only {smallest - values_per_slot} are left; lower "
                f"novel_fraction or values_per_slot"
            )
        if m > values_per_slot ** 3:
            need = math.ceil(round(m ** (1 / 3), 9))
            raise ValueError(
                f"{m} distinct stories from a pool of values_per_slot={values_per_slot} values per "
                f"slot is impossible: only {values_per_slot ** 3} combinations exist; raise "
                f"values_per_slot to at least {need} or lower n_stories={n_stories}"
            )
    elif n_novel >= smallest:
        raise ValueError(
            f"{n_novel} novel stories (n_stories={n_stories}, novel_fraction={novel_fraction}) "
            f"leave no values for the others (smallest slot list: {smallest}); lower novel_fraction"
        )

    fingerprint = _digest(*((v.text, v.key) for s in SLOTS for v in values[s]))
    base = _digest("news", n_stories, seed, values_per_slot, float(novel_fraction), fingerprint)
    rng = random.Random(base)
    pools: dict[str, list[SlotValue]] = {}
    novel: dict[str, list[SlotValue]] = {}
    for slot in SLOTS:
        shuffled = rng.sample(values[slot], len(values[slot]))
        if values_per_slot is None:
            novel[slot], pools[slot] = shuffled[:n_novel], shuffled[n_novel:]
        else:
            pools[slot] = shuffled[:values_per_slot]
            novel[slot] = shuffled[values_per_slot:values_per_slot + n_novel]
    sizes = [len(pools[s]) for s in SLOTS]
    if m > math.prod(sizes):
        raise ValueError(
            f"n_stories={n_stories} needs {m} distinct combinations but the slot lists allow only "
            f"{math.prod(sizes)}; lower n_stories or novel_fraction"
        )
    combos = _combinations(sizes, m, rng)
    chosen = [{s: pools[s][c[i]] for i, s in enumerate(SLOTS)} for c in combos]
    chosen += [{s: novel[s][j] for s in SLOTS} for j in range(n_novel)]
    return [_story(i, facts, random.Random(f"{base}:{i}")) for i, facts in enumerate(chosen)]


# ---- continuation by a model -------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+")  # the space after a sentence


def _normal(sentence: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", sentence.lower()))


def continuation(story: Story, generated: str, slots: dict[str, list[SlotValue]]) -> str:
    """The sentences of `generated` (a model's continuation of `story.text`) a story may keep.

    Kept: whole sentences (ending in . ! or ?), in order, up to the first one that is cut off or names
    a value of a slot list (`slots`) other than the story's own, which would contradict its facts.
    Sentences the story already has, and repeats, are skipped. '' when none is kept.
    """
    own = {slot: story.facts[slot].key for slot in SLOTS}
    others = [v.key for slot in SLOTS for v in slots.get(slot, ()) if v.key != own[slot]]
    seen = {_normal(s) for s in _SENTENCE_END.split(story.text)}
    kept: list[str] = []
    for sentence in _SENTENCE_END.split(generated.strip()):
        sentence = " ".join(sentence.split())
        if not re.search(r"[.!?][\"')\]]*$", sentence) or any(mentions(k, sentence) for k in others):
            break
        key = _normal(sentence)
        if key and key not in seen:
            seen.add(key)
            kept.append(sentence)
    return " ".join(kept)
