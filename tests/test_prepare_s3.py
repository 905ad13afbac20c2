"""prepare_dataset reading from and writing to a real S3 server (SeaweedFS), then validating there."""

from __future__ import annotations

import pytest

from data_corpus import write_corpus
from raytrainer.data.fs import list_files, open_storage
from raytrainer.data.prepare import STATE_NAME, prepare_dataset
from raytrainer.data.sources import InputSpec
from raytrainer.data.tokenizers import load_tokenizer
from raytrainer.data.validate import validate_dataset


@pytest.mark.slow
def test_prepare_to_s3_keeps_shards_and_validates(s3_server, s3_url, tmp_path):
    s3 = s3_server.s3_config()
    inputs, _ = write_corpus(tmp_path / "raw")
    storage = open_storage(s3_url, s3)
    storage.write_bytes("raw/web.jsonl", (tmp_path / "raw" / "web.jsonl").read_bytes())
    assert [f.url for f in list_files(f"{s3_url}/raw/*.jsonl", s3)] == [f"{s3_url}/raw/web.jsonl"]
    s3_inputs = [inputs[0], InputSpec(f"{s3_url}/raw/*.jsonl", "web", quality_field="q"), inputs[2]]
    out = f"{s3_url}/ds"

    result = prepare_dataset(s3_inputs, out, "byte", shard_tokens=1000, s3=s3, use_ray=False)
    local = prepare_dataset(inputs, str(tmp_path / "local"), "byte", shard_tokens=1000, use_ray=False)
    every = result.manifest.shards + result.manifest.validation
    assert result.manifest.validation
    assert [(s.path, s.sha256) for s in every] == [(s.path, s.sha256)
                                                   for s in local.manifest.shards + local.manifest.validation]
    files = storage.list_files("ds")
    assert "manifest.json" in files and STATE_NAME not in files
    assert all(files[s.path] == s.bytes for s in every)

    report = validate_dataset(out, load_tokenizer("byte").identity(), check_sha256=True, s3=s3)
    assert report.ok and report.checked == len(result.manifest.shards)
    assert prepare_dataset(s3_inputs, out, "byte", shard_tokens=1000, s3=s3, use_ray=False).up_to_date
    forced = prepare_dataset(s3_inputs, out, "byte", shard_tokens=1000, s3=s3, use_ray=False, force=True)
    assert forced.written == [] and len(forced.kept) == len(every)
