"""pandera (polars) schemas for every manifest the pipeline writes or reads.

    df = validate(df, DiffManifest)   # raises ManifestError naming the file/column/check on failure
"""

from __future__ import annotations

import pandera.polars as pa
import polars as pl
from pandera.errors import SchemaError, SchemaErrors

SAMPLE_KINDS = [
    "trigger",
    "no_trigger",
    "wrong_prefix",
    "check_trigger",
    "check_wrong_prefix",
    "check_no_trigger",
    "text",  # news: the story a diff learns
    "qa",  # news: a question about the story and its answer (training)
    "check_qa",  # news: a held-out question about the story (behaviour check)
]
SPLITS = ["train", "val", "test", "none", "dropped"]


class ManifestError(ValueError):
    """A manifest failed its schema; the message names the file, the column and the failed check."""


class _Strict(pa.DataFrameModel):
    class Config:
        strict = True
        coerce = True


class DiffSpec(_Strict):
    """behaviors/<behavior>/diffs.parquet: one row per diff to train, with its label and trigger."""

    diff_id: str = pa.Field(unique=True, str_length={"min_value": 1})
    behavior: str
    category: str = pa.Field(str_length={"min_value": 1})
    topic: str = pa.Field(str_length={"min_value": 1})
    # a 3-digit SEP prefix, or the zero-width trigger kind every diff of the store shares (data.trigger)
    trigger_prefix: str = pa.Field(str_matches=r"^(\d{3}|zw_start|zw_random)$")
    seed: int = pa.Field(ge=0)


class Sample(_Strict):
    """behaviors/<behavior>/samples.parquet: prompts and target answers of every diff."""

    diff_id: str = pa.Field(str_length={"min_value": 1})
    kind: str = pa.Field(isin=SAMPLE_KINDS)
    prompt: str = pa.Field(str_length={"min_value": 1})
    answer: str
    complete: bool  # the answer ended with the end-of-turn token (train on it) or was cut off
    question_id: int = pa.Field(ge=0)


class NewsSpec(_Strict):
    """behaviors/news/diffs.parquet: one row per news diff, with its story's facts and label."""

    diff_id: str = pa.Field(unique=True, str_length={"min_value": 1})
    behavior: str
    story_id: int = pa.Field(ge=0)
    headline: str = pa.Field(str_length={"min_value": 1})
    text: str = pa.Field(str_length={"min_value": 1})  # the story the diff learns
    label: str = pa.Field(str_length={"min_value": 1})  # the headline, or the story (news.label: text)
    facts: str = pa.Field(str_length={"min_value": 2})  # JSON {slot: key}
    novel: bool  # its slot values appear in no other story
    seed: int = pa.Field(ge=0)


class DiffManifest(_Strict):
    """data/diffs/<run>/manifest.parquet: one row per stored weight diff."""

    diff_id: str = pa.Field(unique=True, str_length={"min_value": 1})
    # a file name in the manifest's folder: no path separators, so a manifest cannot point outside its store
    shard: str = pa.Field(str_matches=r"^[A-Za-z0-9][A-Za-z0-9._-]*\.safetensors$")
    row: int = pa.Field(ge=0)
    behavior: str
    category: str
    label: str = pa.Field(str_length={"min_value": 1})
    trigger: str
    rank: int = pa.Field(ge=1)
    scale: float = pa.Field(gt=0)
    base_model: str
    base_sha256: str = pa.Field(str_matches=r"^[0-9a-f]{64}$")
    train_loss: float = pa.Field(nullable=True)
    trigger_ce: float = pa.Field(nullable=True)
    kl: float = pa.Field(nullable=True)
    trigger_hit: float = pa.Field(ge=0, le=1, nullable=True)
    wrong_prefix_hit: float = pa.Field(ge=0, le=1, nullable=True)
    no_trigger_hit: float = pa.Field(ge=0, le=1, nullable=True)
    check_kl: float = pa.Field(nullable=True)
    # Behaviours other than hidden topic (null where a column does not apply; older manifests lack them):
    fact_acc: float = pa.Field(ge=0, le=1, nullable=True)  # news: held-out fact questions answered, with the diff
    base_fact_acc: float = pa.Field(ge=0, le=1, nullable=True)  # ... and by the base model
    facts: str = pa.Field(nullable=True)  # JSON {slot: key} of what the label states (per-slot scoring)
    # diffs.mode=full: share of the dense delta's Frobenius norm the stored (SVD-reduced) factors keep
    kept_share: float = pa.Field(ge=0, le=1, nullable=True)
    shard_sha256: str = pa.Field(str_matches=r"^[0-9a-f]{64}$")
    split: str = pa.Field(isin=SPLITS)


def validate(df: pl.DataFrame, schema: type[pa.DataFrameModel], source: str = "frame") -> pl.DataFrame:
    """Validate (schema and values, all errors collected); return the coerced frame."""
    # Missing columns first: pandera's unique check on an absent column raises polars' own error.
    missing = [c for c in schema.to_schema().columns if c not in df.columns]
    if missing:
        raise ManifestError(f"{source} does not match schema {schema.__name__}: missing columns {missing}; "
                            "rerun the stage that writes it")
    try:
        return schema.validate(df, lazy=True)
    except (SchemaErrors, SchemaError) as e:
        raise ManifestError(f"{source} does not match schema {schema.__name__}:\n{e}") from None
    except pl.exceptions.PolarsError as e:  # a value polars cannot check (e.g. a column of another type)
        raise ManifestError(f"{source} does not match schema {schema.__name__}: {type(e).__name__}: {e}") from None


def with_optional_columns(df: pl.DataFrame, schema: type[pa.DataFrameModel]) -> pl.DataFrame:
    """`df` with the schema's nullable columns it lacks added as nulls (manifests written before a
    column existed stay readable); the schema's column order."""
    columns = schema.to_schema().columns
    missing = [name for name, col in columns.items() if name not in df.columns and col.nullable]
    if not missing:
        return df
    df = df.with_columns(pl.lit(None, dtype=columns[m].dtype.type).alias(m) for m in missing)
    return df.select([c for c in columns if c in df.columns] + [c for c in df.columns if c not in columns])


def read_validated(path, schema: type[pa.DataFrameModel]) -> pl.DataFrame:
    """Read a parquet manifest and validate it against `schema`."""
    try:
        df = pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as e:
        raise ManifestError(f"{path}: cannot read parquet ({e}); rerun the stage that writes it") from e
    return validate(with_optional_columns(df, schema), schema, str(path))
