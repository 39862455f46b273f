"""Write failures: a disk that fills up (an injected ENOSPC at the rename of shard 1) stops the run with
an error naming the file and the fix; shard 0 and everything else written before stay intact, no
temporary file is left, and a rerun finishes."""

import errno
import os

import pytest

from conftest import PARAMS, tiny_overrides
from dit_core.config import load_params
from dit_core.io import WriteError, write_json_atomic


def test_disk_full_during_a_shard_keeps_earlier_outputs(tiny_model_dir, tmp_path, monkeypatch):
    from dit_core import io
    from tasks.stage_runs import download, generate_diffs, make_data

    sets = tiny_overrides(tiny_model_dir, tmp_path / "data") + ["diffs.diffs_per_batch=2", "tracking.enabled=false"]
    params = load_params(PARAMS, sets).model_dump()
    download(params)
    make_data(params)
    store = tmp_path / "data" / "diffs" / "hidden_topic"
    real_replace = os.replace

    def full_disk(src, dst):
        if str(dst).endswith("shard-00001.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", full_disk)
    with pytest.raises(WriteError, match=r"cannot write .*shard-00001.safetensors: No space left on device\. "
                                         r"Free disk space"):
        generate_diffs(params)
    before = {p.name: p.read_bytes() for p in store.iterdir() if p.is_file()}
    assert "shard-00000.safetensors" in before and "shard-00000.rows.parquet" in before
    assert not [n for n in before if n.startswith("shard-00001") or n.endswith(".tmp")]
    assert "manifest.parquet" not in before

    monkeypatch.setattr(io.os, "replace", real_replace)
    done = generate_diffs(params)
    assert done["n_diffs"] == 6 and done["shards_skipped"] == 1
    assert (store / "shard-00000.safetensors").read_bytes() == before["shard-00000.safetensors"]


def test_unwritable_directory_is_a_clear_error_and_the_old_file_stays(tmp_path, monkeypatch):
    from dit_core import io

    target = tmp_path / "summary.json"
    write_json_atomic(target, {"v": 1})

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(io.tempfile, "mkstemp", denied)
    with pytest.raises(WriteError, match=r"cannot write .*summary.json: Permission denied\. .*fix the permissions"):
        write_json_atomic(target, {"v": 2})
    assert target.read_text().strip().endswith("}") and '"v": 1' in target.read_text()


def test_reports_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """table.md and the plots go through a temp file: a write that dies midway leaves the old file whole
    and no temp file behind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dit_core import io
    from dit_core.io import save_figure_atomic, write_text_atomic

    table, png = tmp_path / "table.md", tmp_path / "scores.png"
    write_text_atomic(table, "| old |\n")
    fig = plt.figure()
    save_figure_atomic(fig, png)
    old_png = png.read_bytes()
    assert old_png[:8] == b"\x89PNG\r\n\x1a\n"  # the suffix decides the format, not the temp name

    def dies(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "replace", dies)
    with pytest.raises(WriteError, match="table.md: No space left"):
        write_text_atomic(table, "| new |\n")
    with pytest.raises(WriteError, match="scores.png: No space left"):
        save_figure_atomic(fig, png, dpi=50)
    plt.close(fig)
    assert table.read_text() == "| old |\n" and png.read_bytes() == old_png
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.png", "table.md"]
