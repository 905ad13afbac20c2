"""The manifest: round trips, consistency checks whose errors name the file, buckets and histograms."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raytrainer.data.manifest import (
    DEFAULT_BUCKETS,
    FORMAT,
    DataError,
    LengthBucket,
    Manifest,
    ShardRecord,
    bucket_of,
    length_histogram,
    parse_buckets,
    token_dtype_for,
)
from raytrainer.data.tokenizers import load_tokenizer


def _manifest() -> Manifest:
    shards = [
        ShardRecord("web/short/shard-000000.parquet", "web", "short", 3, 30, 100, "a" * 64),
        ShardRecord("web/long/shard-000000.parquet", "web", "long", 1, 5000, 900, "b" * 64),
        ShardRecord("code/medium/shard-000000.parquet", "code", "medium", 2, 1500, 400, "c" * 64),
    ]
    return Manifest(
        tokenizer=load_tokenizer("byte").identity(),
        token_dtype="uint16",
        length_buckets=list(DEFAULT_BUCKETS),
        shards=shards,
        sources={"code": {"docs": 2, "tokens": 1500}, "web": {"docs": 4, "tokens": 5030}},
        length_histogram=length_histogram(np.array([10, 10, 10, 700, 800, 5000])),
        chars_per_token=1.0,
    )


def test_round_trip_through_json_and_disk(tmp_path):
    m = _manifest()
    assert Manifest.from_json(m.to_json()) == m
    url = m.save(str(tmp_path / "ds"))
    assert url.endswith("ds/manifest.json")
    loaded = Manifest.load(str(tmp_path / "ds"))
    assert loaded == m
    assert loaded.num_docs == 6 and loaded.num_tokens == 6530 and loaded.numpy_dtype == np.uint16
    raw = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert raw["format"] == FORMAT
    assert raw["length_buckets"][-1] == {"name": "long", "max_tokens": None}
    assert set(raw["shards"][0]) == {"path", "source", "bucket", "num_docs", "num_tokens", "bytes", "sha256"}


def _broken(mutate) -> dict:
    raw = _manifest().to_dict()
    mutate(raw)
    return raw


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.update(format="other/2"), "format 'other/2' is not 'raytrainer-tokens/1'"),
    (lambda r: r.pop("shards"), "key 'shards' is missing"),
    (lambda r: r["shards"][0].update(num_tokens="30"), r"shards\[0\].num_tokens = '30' must be an integer"),
    (lambda r: r["shards"][0].update(path="../x.parquet"), "must be a relative path"),
    (lambda r: r["shards"][1].update(path=r["shards"][0]["path"]), "listed twice"),
    (lambda r: r["shards"][0].update(bucket="huge"), "bucket 'huge' is not one of"),
    (lambda r: r["sources"]["web"].update(tokens=1), "do not match the sums over shards"),
    (lambda r: r["tokenizer"].update(vocab_size=70000), "token_dtype=uint16 cannot hold ids up to 69999"),
    (lambda r: r["tokenizer"].update(eos_id=999), "tokenizer.eos_id=999 must be an id below vocab_size"),
    (lambda r: r["tokenizer"].pop("hash"), r"tokenizer is missing \['hash'\]"),
    (lambda r: r.update(length_buckets=[{"name": "a", "max_tokens": 10}]), "last bucket .* no limit"),
])
def test_inconsistent_manifests_are_rejected_naming_the_file(mutate, message):
    with pytest.raises(DataError, match=message) as err:
        Manifest.from_dict(_broken(mutate), where="/data/x/manifest.json")
    assert str(err.value).startswith("/data/x/manifest.json")


def test_missing_and_damaged_manifest_files(tmp_path):
    with pytest.raises(DataError, match=r"manifest.json: not found; is .* a prepared dataset"):
        Manifest.load(str(tmp_path))
    (tmp_path / "manifest.json").write_text('{"format": "raytrainer-tok')
    with pytest.raises(DataError, match=f"{tmp_path}/manifest.json: not valid JSON"):
        Manifest.load(str(tmp_path))


def test_buckets_parse_and_assign_at_the_edges():
    assert parse_buckets("short:512,medium:2048,long") == list(DEFAULT_BUCKETS)
    lengths = np.array([1, 512, 513, 2048, 2049, 10**6])
    assert bucket_of(lengths, DEFAULT_BUCKETS).tolist() == [0, 0, 1, 1, 2, 2]
    assert parse_buckets("all") == [LengthBucket("all", None)]
    for bad, message in [("a:10,b:5,c", "strictly increasing"), ("a:10,b:20", "must have no limit"),
                         ("a:x,b", "not an integer"), ("a:10,a", "distinct"), ("a b:10,c", "distinct")]:
        with pytest.raises(DataError, match=message):
            parse_buckets(bad)


def test_token_dtype_is_the_narrowest_that_holds_every_id():
    assert token_dtype_for(262) == "uint16"
    assert token_dtype_for(65536) == "uint16"  # ids 0..65535
    assert token_dtype_for(65537) == "uint32"


def test_length_histogram_is_half_open_powers_of_two():
    hist = length_histogram(np.array([1, 2, 3, 4, 7, 8, 1000]))
    edges, counts = hist["edges"], hist["counts"]
    assert edges[:5] == [1, 2, 4, 8, 16] and edges[-1] > 1000 and len(counts) == len(edges) - 1
    assert counts[:4] == [1, 2, 2, 1] and sum(counts) == 7


def test_without_shards_recomputes_source_totals():
    m = _manifest().without_shards(["web/long/shard-000000.parquet"])
    assert [s.path for s in m.shards] == ["web/short/shard-000000.parquet",
                                          "code/medium/shard-000000.parquet"]
    assert m.sources == {"code": {"docs": 2, "tokens": 1500}, "web": {"docs": 3, "tokens": 30}}
    m.validate()
