"""Fuzzing (hypothesis, derandomized so CI sees the same cases every run): random manifests and random
params overrides and profile files either load as something valid or are refused with the project's own
error (ManifestError, DiffFileError, ConfigError), never with another exception."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import polars as pl
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import PARAMS
from dit_core.config import ConfigError, flatten, load_params
from dit_core.data.schemas import SPLITS, DiffManifest, ManifestError, read_validated
from dit_core.diffs.store import DiffFileError, store_file

FUZZ = settings(max_examples=120, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# text that tends to break loaders: separators, dots, NUL and other control characters, odd unicode
odd_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", ".", "..", "../x.safetensors", "/etc/passwd", "a/b.safetensors", "a\\b.safetensors",
                     "shard\x00.safetensors", "sh\u202eard.safetensors", "\ufeffshard.safetensors", "CON",
                     "x" * 300 + ".safetensors", "shard-00000.safetensors", "train", "TRAIN", "tr\u0430in",
                     "val ", "\ud7ff", "é" * 50, "\n", "1e999", "nan"]))

GOOD_ROW = dict(diff_id="d0", shard="shard-00000.safetensors", row=0, behavior="hidden_topic", category="c",
                label="a label", trigger="123", rank=1, scale=1.0, base_model="tiny", base_sha256="0" * 64,
                train_loss=None, trigger_ce=None, kl=None, trigger_hit=None, wrong_prefix_hit=None,
                no_trigger_hit=None, check_kl=None, shard_sha256="0" * 64, split="train")
FLOATS = ["scale", "train_loss", "trigger_hit", "wrong_prefix_hit", "no_trigger_hit", "kl"]
odd_value = st.one_of(odd_text, st.integers(min_value=-2**63, max_value=2**63 - 1), st.none(), st.booleans(),
                      st.floats(allow_nan=True, allow_infinity=True))


@st.composite
def manifests(draw) -> pl.DataFrame:
    """A few manifest rows, each possibly mutated: odd values in any column, duplicated ids, a column
    dropped or added, a column of another type."""
    n = draw(st.integers(1, 4))
    rows = [dict(GOOD_ROW, diff_id=f"d{i}", row=i) for i in range(n)]
    for r in rows:
        for col in draw(st.lists(st.sampled_from(sorted(GOOD_ROW)), max_size=3, unique=True)):
            r[col] = draw(odd_value)
        if draw(st.booleans()):
            r["split"] = draw(st.one_of(st.sampled_from(SPLITS), odd_text))
    if n > 1 and draw(st.booleans()):
        rows[-1]["diff_id"] = rows[0]["diff_id"]
    # one type per column, as a parquet file has: values of another type become strings
    columns = {}
    for col in GOOD_ROW:
        values = [r[col] for r in rows]
        kinds = {type(v) for v in values if v is not None}
        columns[col] = values if len(kinds) <= 1 else [None if v is None else str(v) for v in values]
    df = pl.DataFrame(columns, strict=False)
    if draw(st.booleans()):
        df = df.drop(draw(st.sampled_from(df.columns)))
    if draw(st.booleans()):
        df = df.with_columns(pl.lit(draw(odd_value), allow_object=False).alias(draw(odd_text) or "extra"))
    return df


def _check_valid(df: pl.DataFrame, root: Path) -> None:
    """What a manifest that loads promises its readers."""
    assert df["diff_id"].n_unique() == df.height and df["diff_id"].null_count() == 0
    assert set(df["split"]) <= set(SPLITS)
    assert (df["row"] >= 0).all() and (df["rank"] >= 1).all() and (df["scale"] > 0).all()
    for name in df["shard"]:
        assert store_file(root, name).parent == root  # a file in the store's own folder


@FUZZ
@given(df=manifests())
def test_fuzzed_manifests_load_valid_or_are_refused(df):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = root / "manifest.parquet"
        try:
            df.write_parquet(path)
        except Exception:  # a frame parquet cannot hold is not a manifest anyone can hand us
            return
        try:
            loaded = read_validated(path, DiffManifest)
        except (ManifestError, DiffFileError):
            return
        _check_valid(loaded, root)


@FUZZ
@given(data=st.data())
def test_fuzzed_manifest_bytes_are_refused_cleanly(data, tmp_path_factory):
    """A valid manifest file with bytes flipped, cut or appended: it reads and validates, or fails with
    ManifestError (never a parquet reader's own exception or panic)."""
    root = tmp_path_factory.getbasetemp() / "fuzz-bytes"
    root.mkdir(exist_ok=True)
    path = root / "manifest.parquet"
    good = pl.DataFrame([dict(GOOD_ROW, diff_id=f"d{i}", row=i) for i in range(3)])
    good.write_parquet(path)
    raw = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    path.write_bytes(bytes(raw[:cut]) + data.draw(st.binary(max_size=16)))
    try:
        loaded = read_validated(path, DiffManifest)
    except ManifestError:
        return
    _check_valid(loaded, root)


@pytest.fixture(scope="module")
def params_copy(tmp_path_factory):
    """params.yaml in a folder of its own (outside git: no commit lookup per example)."""
    folder = tmp_path_factory.mktemp("fuzz-params")
    shutil.copy(PARAMS, folder / "params.yaml")
    (folder / "profiles").mkdir()
    return folder / "params.yaml"


KEYS = sorted(flatten(load_params(PARAMS).model_dump(exclude={"run"})))
override_keys = st.one_of(st.sampled_from(KEYS), odd_text,
                          st.builds(lambda k, s: f"{k}.{s}", st.sampled_from(KEYS), odd_text),
                          st.builds(lambda k: k.split(".")[0], st.sampled_from(KEYS)),
                          st.sampled_from(["run.git_commit", "run", "diffs..rank", ".diffs", "diffs."]))
override_values = st.one_of(odd_text, st.sampled_from(
    ["[", "{", "]", "}", "- a", "!!python/object/apply:os.system ['true']", "*alias", "&a [*a]", "{a: 1",
     "'", '"', "\x00", "\x85", "\t", "1e999", ".nan", "-.inf", "~", "null", "yes", "0x1F", "2020-01-01",
     "[1, [2, [3]]]", "{rank: 2}", "- - -", "? a", "%YAML 1.2", "---", "..."]),
    st.integers().map(str), st.floats().map(str))


@FUZZ
@given(overrides=st.lists(st.one_of(
    st.builds(lambda k, v: f"{k}={v}", override_keys, override_values), odd_text), max_size=4))
def test_fuzzed_overrides_load_valid_or_raise_config_error(overrides, params_copy):
    try:
        p = load_params(params_copy, overrides)
    except ConfigError:
        return
    assert p.run.overrides == overrides
    for text in overrides:  # a run record cannot be overridden: the loader writes it
        assert not text.split("=", 1)[0].strip().startswith("run")


@FUZZ
@given(text=st.one_of(
    st.text(max_size=200),
    st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
    st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
                 lambda inner: st.one_of(st.lists(inner, max_size=3),
                                         st.dictionaries(st.one_of(st.sampled_from(KEYS + ["diffs", "run"]),
                                                                   st.text(max_size=8), st.integers()),
                                                         inner, max_size=3)),
                 max_leaves=12).map(lambda tree: yaml.safe_dump(tree, allow_unicode=True)),
    st.dictionaries(st.sampled_from(KEYS), override_values, max_size=3).map(
        lambda flat: "\n".join(f"{k.split('.')[0]}:\n  {k.split('.', 1)[1]}: {v}" for k, v in flat.items()))),
    raw=st.one_of(st.none(), st.binary(max_size=32)))
def test_fuzzed_profile_files_load_valid_or_raise_config_error(text, raw, params_copy):
    path = params_copy.parent / "profiles" / "fuzz.yaml"
    path.write_bytes(raw if raw is not None else text.encode("utf-8", "surrogatepass"))
    try:
        p = load_params(params_copy, [], ["fuzz"])
    except ConfigError:
        return
    assert p.run.profiles == ["fuzz"]
