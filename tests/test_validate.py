"""validate_dataset: every kind of bad shard is caught and named; skip mode counts and drops them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_corpus import load_job, write_corpus
from raytrainer.config import DataConfig
from raytrainer.data.manifest import DataError, Manifest, source_totals
from raytrainer.data.prepare import prepare_dataset
from raytrainer.data.tokenizers import load_tokenizer
from raytrainer.data.validate import validate_data_config, validate_dataset

BYTE = load_tokenizer("byte").identity()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate")
    inputs, _ = write_corpus(root / "raw")
    prepare_dataset(inputs, str(root / "ds"), "byte", shard_tokens=1500, use_ray=False)
    return root / "ds"


@pytest.fixture
def ds(prepared, tmp_path):
    """A private copy of the prepared dataset, free to damage."""
    return shutil.copytree(prepared, tmp_path / "ds")


def _replace_shard(ds, index: int, table: pa.Table) -> str:
    """Write `table` as shard `index` and make the manifest agree with it (size, hash, counts), so that
    only the content itself is wrong."""
    m = Manifest.load(str(ds))
    shard = m.shards[index]
    pq.write_table(table, ds / shard.path)
    data = (ds / shard.path).read_bytes()
    lengths = table.column("length").to_pylist() if "length" in table.column_names else [0]
    m.shards[index] = dataclasses.replace(
        shard, bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), num_docs=table.num_rows,
        num_tokens=max(sum(lengths), table.num_rows))
    m.sources = source_totals(m.shards, keep=m.sources)
    (ds / "manifest.json").write_text(m.to_json())
    return shard.path


def _shard_table(tokens: list[list[int]], dtype: pa.DataType | None = None, source: str = "books"
                 ) -> pa.Table:
    return pa.table({
        "tokens": pa.array(tokens, pa.list_(dtype or pa.uint16())),
        "length": pa.array([len(t) for t in tokens], pa.int32()),
        "source": pa.array([source] * len(tokens), pa.string()),
        "quality": pa.array([None] * len(tokens), pa.float32()),
    })


def _books_index(ds) -> int:
    return next(i for i, s in enumerate(Manifest.load(str(ds)).shards) if s.source == "books")


def test_a_good_dataset_passes_every_check(ds):
    report = validate_dataset(str(ds), BYTE, check_sha256=True, model_vocab_size=262)
    assert report.ok and report.checked == len(report.manifest.shards) > 3
    assert report.manifest == Manifest.load(str(ds))
    cfg = DataConfig(path=str(ds), tokenizer="byte")
    assert validate_data_config(cfg).ok


def test_missing_shard(ds):
    path = Manifest.load(str(ds)).shards[0].path
    (ds / path).unlink()
    with pytest.raises(DataError, match=rf"{ds}/{path}: missing") as err:
        validate_dataset(str(ds))
    assert "re-run jobs/prepare_data.py" in str(err.value) and "on_bad_shard=skip" in str(err.value)


def test_corrupt_parquet_of_the_recorded_size(ds):
    shard = Manifest.load(str(ds)).shards[1]
    (ds / shard.path).write_bytes(b"\x00" * shard.bytes)
    with pytest.raises(DataError, match=rf"{shard.path}: not a readable Parquet file"):
        validate_dataset(str(ds))


def test_truncated_shard(ds):
    shard = Manifest.load(str(ds)).shards[0]
    data = (ds / shard.path).read_bytes()
    (ds / shard.path).write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"{shard.path}: {len(data) // 2} bytes, but the manifest records"):
        validate_dataset(str(ds))


def test_sha256_mismatch_only_when_asked(ds):
    m = Manifest.load(str(ds))
    m.shards[0] = dataclasses.replace(m.shards[0], sha256="0" * 64)
    (ds / "manifest.json").write_text(m.to_json())
    assert validate_dataset(str(ds)).ok
    with pytest.raises(DataError, match=rf"{m.shards[0].path}: sha256 .* differs"):
        validate_dataset(str(ds), check_sha256=True)


@pytest.mark.parametrize("table, message", [
    (_shard_table([[1, 256]], dtype=pa.int64()), r"column 'tokens' is list<int64>, expected list<uint16>"),
    (_shard_table([[1, 256]]).drop_columns(["quality"]), "no column 'quality'"),
    (_shard_table([[1, 256]]).set_column(1, "length", pa.array([2], pa.int64())), "column 'length' is int64"),
])
def test_wrong_schema(ds, table, message):
    path = _replace_shard(ds, 0, table)
    with pytest.raises(DataError, match=rf"{path}: wrong schema: .*{message}"):
        validate_dataset(str(ds))


def test_token_ids_beyond_the_vocabulary(ds):
    path = _replace_shard(ds, _books_index(ds), _shard_table([[65, 66, 256], [300, 256]]))
    with pytest.raises(DataError, match=rf"{path}: token id 300 >= vocab_size 262 of tokenizer byte"):
        validate_dataset(str(ds))


def test_empty_shard(ds):
    path = _replace_shard(ds, 0, _shard_table([]))
    with pytest.raises(DataError, match=rf"{path}: empty"):
        validate_dataset(str(ds))


def test_counts_disagreeing_with_the_manifest(ds):
    m = Manifest.load(str(ds))
    m.shards[0] = dataclasses.replace(m.shards[0], num_tokens=m.shards[0].num_tokens + 1)
    m.sources = source_totals(m.shards, keep=m.sources)
    (ds / "manifest.json").write_text(m.to_json())
    with pytest.raises(DataError, match=rf"{m.shards[0].path}: \d+ tokens, but the manifest records"):
        validate_dataset(str(ds))


def test_documents_without_eos_and_wrong_source(ds):
    i = _books_index(ds)
    path = _replace_shard(ds, i, _shard_table([[65, 66, 67]]))
    with pytest.raises(DataError, match=rf"{path}: some documents do not end with EOS \(id 256\)"):
        validate_dataset(str(ds))
    path = _replace_shard(ds, i, _shard_table([[65, 256]], source="web"))
    with pytest.raises(DataError, match=rf"{path}: column 'source' holds \['web'\]"):
        validate_dataset(str(ds))


def test_tokenizer_mismatch_names_both(ds):
    expected = (r"tokenised with byte \(hash [0-9a-f]{12}, vocab_size 262\), but the configured tokenizer is "
                r"gpt2 \(hash [0-9a-f]{12}, vocab_size 50262\)")
    with pytest.raises(DataError, match=expected):
        validate_dataset(str(ds), load_tokenizer("gpt2").identity())
    renamed = {**BYTE, "name": "my-bytes"}  # the hash decides; names are labels
    assert validate_dataset(str(ds), renamed).ok
    with pytest.raises(DataError, match="model.vocab_size=100"):
        validate_dataset(str(ds), model_vocab_size=100)


def test_skip_mode_counts_logs_and_drops_bad_shards(ds, caplog):
    m = Manifest.load(str(ds))
    bad = [m.shards[0].path, m.shards[2].path]
    (ds / bad[0]).unlink()
    (ds / bad[1]).write_bytes(b"junk")
    with caplog.at_level(logging.WARNING, logger="raytrainer.data.validate"):
        report = validate_dataset(str(ds), BYTE, on_bad_shard="skip")
    assert [s.path for s in report.skipped] == bad and not report.ok
    assert "missing" in report.skipped[0].reason and "bytes, but the manifest" in report.skipped[1].reason
    assert report.checked == len(m.shards)
    assert [s.path for s in report.manifest.shards] == [s.path for s in m.shards if s.path not in bad]
    assert report.manifest.num_tokens == m.num_tokens - m.shards[0].num_tokens - m.shards[2].num_tokens
    report.manifest.validate()
    assert "skipped 2 of" in caplog.text and bad[0] in caplog.text


def test_skip_mode_with_nothing_left_fails(ds):
    for shard in Manifest.load(str(ds)).shards:
        (ds / shard.path).unlink()
    with pytest.raises(DataError, match="every shard is bad"):
        validate_dataset(str(ds), on_bad_shard="skip")


def test_bad_manifest_and_missing_dataset(ds, tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path}/nowhere/manifest.json: not found"):
        validate_dataset(str(tmp_path / "nowhere"))
    raw = Manifest.load(str(ds)).to_dict() | {"shards": 3}
    (ds / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match=rf"{ds}/manifest.json: key 'shards' = 3 must be a list"):
        validate_dataset(str(ds))


def test_cli_validate_reports_and_exits_nonzero(ds, capsys):
    main = load_job("prepare_data").main
    assert main(["--validate", str(ds), "--sha256", "--quiet"]) == 0
    assert "shards good" in capsys.readouterr().out
    (ds / Manifest.load(str(ds)).shards[0].path).unlink()
    assert main(["--validate", str(ds), "--quiet"]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["--validate", str(ds), "--on-bad-shard", "skip", "--quiet"]) == 0
    assert "(1 skipped)" in capsys.readouterr().out
