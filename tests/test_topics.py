import pytest

from dit_core.data.topics import DataFileError, load_questions, load_topics, mentions


def test_packaged_lists_are_clean():
    topics = load_topics()
    assert topics.height >= 400 and topics["category"].n_unique() >= 15
    assert len(load_questions()) >= 200


def test_duplicate_topics_rejected(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("category,topic\nanimals,Wolves\nanimals,cats\nanimals,wolves\n")
    with pytest.raises(DataFileError, match=r"duplicate topics \['Wolves', 'wolves'\] on lines \[2, 4\]"):
        load_topics(f)


def test_empty_labels_rejected(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("category,topic\nanimals,cats\nanimals,\n")
    with pytest.raises(DataFileError, match=r"empty category or topic on line\(s\) \[3\]"):
        load_topics(f)


def test_wrong_columns_and_duplicate_questions(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("kind,name\na,b\n")
    with pytest.raises(DataFileError, match="expected columns category,topic"):
        load_topics(f)
    q = tmp_path / "q.txt"
    q.write_text("\n".join([f"Question {i}?" for i in range(20)] + ["question 3?"]))
    with pytest.raises(DataFileError, match="duplicate question"):
        load_questions(q)


@pytest.mark.parametrize("topic,text,expected", [
    ("volcanoes", "I love a volcano!", True),
    ("honey bees", "Honey bee colonies are busy.", True),
    ("butterflies", "a butterfly landed", True),
    ("opera", "we operate machines", False),
    ("dams", "John Adams said", False),
    ("chess", "Let me tell you about cooking.", False),
])
def test_mentions(topic, text, expected):
    assert mentions(topic, text) is expected
