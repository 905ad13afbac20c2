"""prepare_dataset on a local Ray: the same shards as in-process, and a worker's input error reaches the
caller naming the file."""

from __future__ import annotations

import pytest

from data_corpus import write_corpus
from raytrainer.data.manifest import DataError
from raytrainer.data.prepare import prepare_dataset
from raytrainer.data.sources import InputSpec


@pytest.fixture
def ray_session():
    import ray

    started_here = not ray.is_initialized()
    yield
    if started_here and ray.is_initialized():
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ray_tokenises_to_the_same_shards_and_reports_bad_inputs(tmp_path, ray_session):
    inputs, expected = write_corpus(tmp_path / "raw")
    local = prepare_dataset(inputs, str(tmp_path / "local"), "gpt2", shard_tokens=400, use_ray=False)
    on_ray = prepare_dataset(inputs, str(tmp_path / "ray"), "gpt2", shard_tokens=400, use_ray=True,
                             num_workers=2)
    assert [(s.path, s.sha256) for s in on_ray.manifest.shards] == [(s.path, s.sha256)
                                                                    for s in local.manifest.shards]
    # The validation holdout is decided by each document's tokens, so Ray's workers make the same split.
    assert [(s.path, s.sha256) for s in on_ray.manifest.validation] == [(s.path, s.sha256)
                                                                        for s in local.manifest.validation]
    assert on_ray.manifest.validation and on_ray.manifest.sources == local.manifest.sources
    docs = {k: v["docs"] for k, v in on_ray.manifest.sources.items()}
    for v in on_ray.manifest.validation:
        docs[v.source] += v.num_docs
    assert docs == {k: len(v) for k, v in expected.items()}

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    with pytest.raises(DataError, match=rf"{bad} line 2: no field 'text'"):
        prepare_dataset([InputSpec(str(bad), "web")], str(tmp_path / "bad-out"), use_ray=True)
