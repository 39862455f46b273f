import pytest

from dit_core.config import ConfigError, load_params, parse_override


def test_defaults_load_and_overrides_apply(tmp_path):
    p = load_params(tmp_path / "missing.yaml", ["diffs.rank=2", "data.n_topics=16", "diffs.alpha=4"])
    assert p.diffs.rank == 2 and p.data.n_topics == 16
    assert p.diffs.scale == 2.0


def test_repo_params_file_is_valid():
    p = load_params("params.yaml")
    assert p.model.source == "embedded"


def test_unknown_key_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'diffs.rnak'"):
        load_params(None, ["diffs.rnak=2"])


def test_bad_value_names_key_value_and_rule():
    with pytest.raises(ConfigError, match=r"diffs.rank = 0: .*greater than or equal to 1"):
        load_params(None, ["diffs.rank=0"])
    with pytest.raises(ConfigError, match=r"model.source = 'ftp'"):
        load_params(None, ["model.source=ftp"])


def test_bad_yaml_file(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_params(f)


def test_parse_override():
    assert parse_override("a.b=1.5") == ("a.b", 1.5)
    assert parse_override("a=null") == ("a", None)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("nokey")


def test_bare_off_means_off():
    from dit_core.config import load_params

    assert load_params(None, ["model.autocast=off"]).model.autocast == "off"
