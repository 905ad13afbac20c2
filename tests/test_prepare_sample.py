"""The sample corpus from the standard library: small, deterministic, prepared into a valid dataset, and kept
apart per tokenizer."""

from __future__ import annotations

import json

from data_corpus import load_job
from raytrainer.data.manifest import Manifest
from raytrainer.data.sample_corpus import build_sample_corpus, make_sample_dataset, quality_score, sample_path_for
from raytrainer.data.tokenizers import load_tokenizer
from raytrainer.data.validate import validate_dataset


def _lines(paths: list[str]) -> list[dict]:
    return [json.loads(line) for p in paths for line in open(p)]


def test_corpus_is_capped_mixed_and_deterministic(tmp_path):
    stats = build_sample_corpus(tmp_path / "raw", max_bytes=300_000)
    assert set(stats.docs) == {"code", "docs"} and all(stats.docs.values())
    assert sum(stats.bytes.values()) <= 300_000 and stats.bytes["code"] > 150_000
    rows = _lines(stats.files)
    assert len(rows) == sum(stats.docs.values())
    assert all(0.0 <= r["quality"] <= 1.0 and r["text"].strip() for r in rows)
    code = [r for r in _lines([f for f in stats.files if "code-" in f])]
    assert all(r["origin"].endswith(".py") for r in code)
    docs = _lines([f for f in stats.files if "docs-" in f])
    assert any(r["origin"].startswith("pydoc_data.topics:") for r in docs)
    assert sum(r["quality"] for r in docs) / len(docs) > sum(r["quality"] for r in code) / len(code)

    mtimes = {f: (tmp_path / "raw" / f).stat().st_mtime_ns for f in stats.files}
    again = build_sample_corpus(tmp_path / "raw", max_bytes=300_000)
    assert again == stats and {f: (tmp_path / "raw" / f).stat().st_mtime_ns for f in again.files} == mtimes
    smaller = build_sample_corpus(tmp_path / "raw", max_bytes=50_000)
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(
        f.rsplit("/", 1)[-1] for f in smaller.files)


def test_quality_score():
    assert quality_score("") == 0.0
    assert quality_score("abcd") == 1.0
    assert quality_score("ab 12") == 0.4


def test_sample_dataset_is_valid(tmp_path):
    result = make_sample_dataset(str(tmp_path / "sample"), max_bytes=200_000, shard_tokens=50_000,
                                 use_ray=False)
    m = result.manifest
    assert set(m.sources) == {"code", "docs"} and 150_000 < m.num_tokens < 210_000
    assert len(m.shards) >= 4
    report = validate_dataset(str(tmp_path / "sample"), load_tokenizer("byte").identity(), check_sha256=True)
    assert report.ok
    assert Manifest.load(str(tmp_path / "sample")) == m


def test_make_sample_data_cli(tmp_path, capsys):
    main = load_job("make_sample_data").main
    out = tmp_path / "s"
    assert main(["--out", str(out), "--max-bytes", "100K", "--shard-tokens", "32K", "--local"]) == 0
    assert "code:" in capsys.readouterr().out and (out / "manifest.json").exists()
    assert (out / "raw").is_dir()


def test_each_tokenizer_has_its_own_sample_corpus_and_the_default_jobs_is_never_tripped_on(tmp_path, monkeypatch):
    """A GPT-2 preset run first on a fresh checkout used to prepare data/sample in GPT-2 tokens, after which
    the default job (bytes) was refused for a tokenizer mismatch."""
    from raytrainer.launch import ensure_sample_data
    from runs import micro_config

    default = str(tmp_path / "data" / "sample")
    assert sample_path_for("byte", default) == default  # nothing there yet: the default job's bytes go there
    assert sample_path_for("gpt2", default) == f"{default}-gpt2"
    make_sample_dataset(f"{default}-gpt2", "gpt2", max_bytes=50_000, use_ray=False)
    make_sample_dataset(default, "gpt2", max_bytes=50_000, use_ray=False)  # as an older version left it
    assert sample_path_for("gpt2", default) == default  # it holds GPT-2 tokens: used as it is
    assert sample_path_for("byte", default) == f"{default}-byte"  # ... and the bytes go beside it
    tokenizer_json = tmp_path / "my tokenizer.json"
    tokenizer_json.write_text(json.dumps({"not": "read"}))
    monkeypatch.setattr("raytrainer.data.tokenizers.load_tokenizer", lambda spec: load_tokenizer("gpt2"))
    assert sample_path_for(str(tokenizer_json), str(tmp_path / "none")).startswith(f"{tmp_path}/none-tok-")

    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)  # data.path's default, data/sample, is relative to the job's directory
    gpt2 = micro_config(tmp_path, "runs", extra=["data.tokenizer=gpt2", f"data.path={default}"])
    assert ensure_sample_data(gpt2).data.path == default
    (tmp_path / "data" / "sample" / "manifest.json").unlink()
    assert ensure_sample_data(gpt2).data.path == f"{default}-gpt2"  # built above; not built again
    elsewhere = micro_config(tmp_path, "runs", extra=["data.tokenizer=gpt2", f"data.path={tmp_path}/mine"])
    assert ensure_sample_data(elsewhere).data.path == f"{tmp_path}/mine"  # a dataset of the user's own
