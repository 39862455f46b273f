"""params.yaml is the one source of defaults; profiles and --set lay over it; errors name the key."""

import pytest
import yaml

from conftest import PARAMS, ROOT
from dit_core.config import ConfigError, Params, RunInfo, _Section, flatten, load_params, parse_override


def _schema_keys(model: type, prefix: str = "") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, _Section):  # a nested section
            keys |= _schema_keys(sub, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


def test_params_yaml_names_exactly_the_schema_keys():
    in_yaml = set(flatten(yaml.safe_load(PARAMS.read_text())))
    in_schema = _schema_keys(Params) - {f"run.{k}" for k in RunInfo.model_fields}
    assert in_yaml == in_schema, (f"only in params.yaml: {sorted(in_yaml - in_schema)}; "
                                  f"only in dit_core/config.py: {sorted(in_schema - in_yaml)}")


def test_schema_has_no_defaults_of_its_own():
    """A default in code would be a second source: every params.yaml key must be required."""
    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            sub = field.annotation
            if isinstance(sub, type) and issubclass(sub, _Section):
                if sub is not RunInfo:
                    yield from walk(sub, f"{prefix}{name}.")
            elif prefix:
                yield prefix + name, field.is_required()
    with_default = [k for k, required in walk(Params) if not required]
    assert with_default == []


def test_missing_key_in_params_file_is_named(tmp_path):
    tree = yaml.safe_load(PARAMS.read_text())
    del tree["diffs"]["steps"]
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=r"missing key 'diffs.steps'"):
        load_params(f)


def test_missing_or_unreadable_params_file_is_an_error_naming_the_path(tmp_path):
    with pytest.raises(ConfigError, match=str(tmp_path / "missing.yaml")):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml cannot be read"):
        load_params(bad)


def test_overrides_apply_and_are_recorded():
    p = load_params(PARAMS, ["diffs.rank=2", "data.n_topics=16", "diffs.alpha=4"])
    assert p.diffs.rank == 2 and p.data.n_topics == 16
    assert p.diffs.scale == 2.0
    assert p.run.overrides == ["diffs.rank=2", "data.n_topics=16", "diffs.alpha=4"]
    assert p.run.params_file == str(PARAMS)


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match=r"unknown key 'diffs.rnak'"):
        load_params(PARAMS, ["diffs.rnak=2"])


def test_bad_value_names_key_value_and_rule():
    with pytest.raises(ConfigError, match=r"diffs.rank = 0: .*greater than or equal to 1"):
        load_params(PARAMS, ["diffs.rank=0"])
    with pytest.raises(ConfigError, match=r"model.source = 'ftp'"):
        load_params(PARAMS, ["model.source=ftp"])


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
    assert load_params(PARAMS, ["model.autocast=off"]).model.autocast == "off"


@pytest.mark.parametrize("name", sorted(f.stem for f in (ROOT / "profiles").glob("*.yaml")))
def test_every_profile_applies_and_changes_something(name):
    base = flatten(load_params(PARAMS).model_dump(exclude={"run"}))
    p = load_params(PARAMS, profiles=[name])
    laid = flatten(p.model_dump(exclude={"run"}))
    overlay = flatten(yaml.safe_load((ROOT / "profiles" / f"{name}.yaml").read_text()))
    assert overlay and all(laid[k] == v for k, v in overlay.items())
    assert any(base[k] != v for k, v in overlay.items()), f"profiles/{name}.yaml changes nothing"
    assert p.run.profiles == [name]


def test_profiles_compose_in_order_and_set_wins():
    p = load_params(PARAMS, ["diffs.diffs_per_batch=7"], profiles=["paper", "gpu"])
    gpu = yaml.safe_load((ROOT / "profiles" / "gpu.yaml").read_text())
    assert p.data.n_topics == gpu["data"]["n_topics"]  # gpu laid over paper
    assert p.assemble.split_by == "topic"  # from paper, untouched by gpu
    assert p.diffs.diffs_per_batch == 7  # --set over both
    assert p.run.profiles == ["paper", "gpu"]


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"--profile nope: .*profiles here: .*paper"):
        load_params(PARAMS, profiles=["nope"])


def test_profile_with_a_bad_key_names_the_profile(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("diffs:\n  stpes: 3\n")
    with pytest.raises(ConfigError, match=r"mine.yaml.*unknown key 'diffs.stpes'"):
        load_params(PARAMS, profiles=[str(f)])


def test_dvc_set_args_rebuild_the_profile_through_dvcs_own_override_parser(tmp_path):
    """`dit params --profile ... --dvc-args | xargs dvc exp run` gives the experiment the profile's params."""
    import shlex

    from dvc.utils.hydra import apply_overrides

    from dit_core.config import dvc_set_args

    wanted = load_params(PARAMS, ["data.topics_file=my topics.csv"], profiles=["paper", "gpu"])
    args = dvc_set_args(load_params(PARAMS), wanted)
    overrides = [shlex.split(a)[1] for a in args]  # what xargs hands dvc after each -S
    copy = tmp_path / "params.yaml"
    copy.write_text(PARAMS.read_text())
    apply_overrides(copy, overrides)
    assert load_params(copy).model_dump(exclude={"run"}) == wanted.model_dump(exclude={"run"})


def test_configuration_reference_is_generated_from_the_schema():
    """docs/configuration.md is `dit params --doc`: regenerate it when the schema or params.yaml change."""
    from dit_core.config import schema_markdown

    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert doc == schema_markdown(PARAMS), "docs/configuration.md is stale: dit params --doc > docs/configuration.md"
    for key in flatten(yaml.safe_load(PARAMS.read_text())):
        assert f"| `{key.rsplit('.', 1)[-1]}` |" in doc, key
