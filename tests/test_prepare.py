"""prepare_dataset on small inputs (tokenised in-process; the Ray path is in test_prepare_ray.py).

Every document stays in training here (val_fraction=0), so round trips can be checked exactly; the
validation holdout has its own tests in test_validation_split.py."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer as HFTok
from tokenizers import models, pre_tokenizers

from data_corpus import load_job, mtimes, read_docs, text_of, write_corpus
from raytrainer.data.manifest import DataError, Manifest, parse_buckets
from raytrainer.data.prepare import STATE_NAME, parse_token_count, prepare_dataset
from raytrainer.data.sources import InputSpec, parse_input
from raytrainer.data.tokenizers import load_tokenizer


@pytest.fixture
def corpus(tmp_path):
    inputs, expected = write_corpus(tmp_path / "raw")
    return inputs, expected, tmp_path / "out"


def test_counts_in_the_manifest_equal_the_data(corpus):
    inputs, expected, out = corpus
    result = prepare_dataset(inputs, str(out), "byte", shard_tokens=1000, use_ray=False, val_fraction=0)
    m = result.manifest
    assert m.token_dtype == "uint16" and m.tokenizer == load_tokenizer("byte").identity()
    assert result.empty_docs == 2  # notes/empty.txt and the empty JSON line
    docs = read_docs(out)
    for source, wanted in expected.items():
        assert m.sources[source]["docs"] == len(wanted) == len(docs[source])
        want_tokens = sum(len(t.encode()) + 1 for t, _ in wanted)
        assert m.sources[source]["tokens"] == want_tokens == sum(d["length"] for d in docs[source])
    for shard in m.shards:
        table = pq.read_table(out / shard.path)
        assert table.num_rows == shard.num_docs
        assert sum(table.column("length").to_pylist()) == shard.num_tokens
        assert (out / shard.path).stat().st_size == shard.bytes
    assert sum(m.length_histogram["counts"]) == m.num_docs
    assert m.chars_per_token == pytest.approx(1.0)  # ASCII text, one byte per character
    assert not (out / STATE_NAME).exists()


def test_documents_end_with_eos_and_decode_to_the_input(corpus):
    inputs, expected, out = corpus
    prepare_dataset(inputs, str(out), "byte", use_ray=False, val_fraction=0)
    tok = load_tokenizer("byte")
    docs = read_docs(out)
    for source, wanted in expected.items():
        got = {(tok.decode(d["tokens"][:-1]), _round(d["quality"])) for d in docs[source]}
        assert got == {(t, _round(q)) for t, q in wanted}
        assert all(d["tokens"][-1] == tok.eos_id and d["length"] == len(d["tokens"]) for d in docs[source])
        assert all(d["source"] == source for d in docs[source])


def _round(q: float | None) -> float | None:
    return None if q is None else round(q, 5)  # stored as float32


def test_schema_and_narrowest_dtype_for_byte_and_gpt2(corpus):
    inputs, _, out = corpus
    for spec in ("byte", "gpt2"):
        m = prepare_dataset(inputs, str(out / spec), spec, use_ray=False, val_fraction=0).manifest
        assert m.token_dtype == "uint16"
        schema = pq.read_schema(out / spec / m.shards[0].path)
        assert schema.field("tokens").type.value_type == pa.uint16()
        assert schema.field("length").type == pa.int32() and schema.field("quality").type == pa.float32()
        assert schema.field("source").type == pa.string()


def test_a_vocabulary_above_65536_gets_uint32(tmp_path):
    vocab = {f"w{i}": i for i in range(70_000)} | {"[UNK]": 70_000}
    tok = HFTok(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "big.json"))
    (tmp_path / "doc.txt").write_text("w1 w69999 w65536 nope")
    m = prepare_dataset([InputSpec(str(tmp_path / "doc.txt"), "t")], str(tmp_path / "out"),
                        str(tmp_path / "big.json"), use_ray=False, val_fraction=0).manifest
    assert m.token_dtype == "uint32" and m.vocab_size > 70_000
    table = pq.read_table(tmp_path / "out" / m.shards[0].path)
    assert table.schema.field("tokens").type.value_type == pa.uint32()
    assert table.column("tokens").to_pylist()[0] == [1, 69999, 65536, 70000, m.tokenizer["eos_id"]]


def test_bucketing_follows_document_length(corpus):
    inputs, _, out = corpus
    m = prepare_dataset(inputs, str(out), "byte", use_ray=False, val_fraction=0).manifest
    limits = {"short": (1, 512), "medium": (513, 2048), "long": (2049, 10**9)}
    for source, docs in read_docs(out).items():
        for d in docs:
            low, high = limits[d["bucket"]]
            assert low <= d["length"] <= high, (source, d["bucket"], d["length"])
    assert {s.bucket for s in m.shards} == {"short", "medium", "long"}

    custom = prepare_dataset(inputs, str(out / "custom"), "byte", buckets=parse_buckets("tiny:200,rest"),
                             use_ray=False, val_fraction=0).manifest
    assert [b.name for b in custom.length_buckets] == ["tiny", "rest"]
    assert {s.bucket for s in custom.shards} == {"tiny", "rest"}


def test_shards_are_cut_at_shard_tokens_and_keep_input_order(corpus):
    inputs, expected, out = corpus
    m = prepare_dataset(inputs, str(out), "byte", shard_tokens=2000, use_ray=False, val_fraction=0).manifest
    tok = load_tokenizer("byte")
    books = [s for s in m.shards if s.source == "books" and s.bucket == "medium"]
    assert len(books) > 1
    for shard in books[:-1]:  # a shard closes with the document that reaches shard_tokens
        lengths = pq.read_table(out / shard.path).column("length").to_pylist()
        assert sum(lengths) >= 2000 and sum(lengths[:-1]) < 2000
    order = [tok.decode(d["tokens"][:-1]) for d in read_docs(out)["books"] if d["bucket"] == "medium"]
    wanted = [t for t, _ in expected["books"] if 512 < len(t) + 1 <= 2048]
    assert order == wanted


def test_same_inputs_give_the_same_shards(corpus):
    inputs, _, out = corpus
    a = prepare_dataset(inputs, str(out / "a"), "gpt2", shard_tokens=500, use_ray=False, val_fraction=0).manifest
    b = prepare_dataset(list(reversed(inputs)), str(out / "b"), "gpt2", shard_tokens=500,
                        use_ray=False, val_fraction=0).manifest
    assert [(s.path, s.sha256) for s in a.shards] == [(s.path, s.sha256) for s in b.shards]


def test_rerun_keeps_finished_shards(corpus):
    inputs, _, out = corpus
    first = prepare_dataset(inputs, str(out), "byte", shard_tokens=1000, use_ray=False, val_fraction=0)
    before = mtimes(out)
    again = prepare_dataset(inputs, str(out), "byte", shard_tokens=1000, use_ray=False, val_fraction=0)
    assert again.up_to_date and again.manifest.shards == first.manifest.shards
    forced = prepare_dataset(inputs, str(out), "byte", shard_tokens=1000, use_ray=False, val_fraction=0, force=True)
    assert not forced.up_to_date and forced.written == []
    assert sorted(forced.kept) == sorted(before)
    assert mtimes(out) == before


def test_rerun_completes_an_interrupted_run(corpus):
    inputs, _, out = corpus
    full = prepare_dataset(inputs, str(out), "byte", shard_tokens=1000, use_ray=False, val_fraction=0).manifest
    # An interrupted run: no manifest yet, the last shard never committed, a temporary file left behind.
    lost = full.shards[-1].path
    (out / "manifest.json").unlink()
    (out / lost).unlink()
    leftover = out / os.path.dirname(lost) / f".{os.path.basename(lost)}.tmp-0badc0de"
    leftover.write_bytes(b"half a shard")
    (out / STATE_NAME).write_text(json.dumps({"fingerprint": "x", "shards": []}))
    before = mtimes(out)

    result = prepare_dataset(inputs, str(out), "byte", shard_tokens=1000, use_ray=False, val_fraction=0)
    assert result.written == [lost]
    assert sorted(result.kept) == sorted(before)
    assert not leftover.exists() and str(leftover.relative_to(out)) in result.removed
    assert {k: v for k, v in mtimes(out).items() if k != lost} == before
    assert [(s.path, s.sha256) for s in result.manifest.shards] == [(s.path, s.sha256) for s in full.shards]
    assert not (out / STATE_NAME).exists()


def test_changed_input_rewrites_only_what_changed_and_drops_stale_shards(corpus, tmp_path):
    inputs, _, out = corpus
    first = prepare_dataset(inputs, str(out), "byte", shard_tokens=1000, use_ray=False, val_fraction=0).manifest
    before = mtimes(out)
    (tmp_path / "raw" / "books.parquet").unlink()
    pq.write_table(pa.table({"body": [text_of(300, 1)], "score": [1.0]}), tmp_path / "raw" / "books.parquet")
    result = prepare_dataset(inputs, str(out), "byte", shard_tokens=1000, use_ray=False, val_fraction=0)
    assert not result.up_to_date
    assert result.written and all(p.startswith("books/") for p in result.written)
    assert all(p.startswith("books/") for p in result.removed)
    unchanged = {k: v for k, v in before.items() if not k.startswith("books/")}
    assert {k: v for k, v in mtimes(out).items() if not k.startswith("books/")} == unchanged
    assert result.manifest.sources["books"] == {"docs": 1, "tokens": 301}
    assert result.manifest.sources["web"] == first.sources["web"]
    assert set(mtimes(out)) == {s.path for s in result.manifest.shards}


def test_input_errors_name_the_file(tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(DataError, match=r"input web=.*nothing\*.jsonl: no files found"):
        prepare_dataset([InputSpec(str(tmp_path / "nothing*.jsonl"), "web")], out, use_ray=False, val_fraction=0)

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match=rf"{bad_json} line 2: no field 'text' \(fields: \['body'\]\)"):
        prepare_dataset([InputSpec(str(bad_json), "web")], out, use_ray=False, val_fraction=0)

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": "cut sh\n')
    with pytest.raises(DataError, match=rf"{broken} line 2: not valid JSON"):
        prepare_dataset([InputSpec(str(broken), "web")], out, use_ray=False, val_fraction=0)

    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(DataError, match=rf"{corrupt}: not a readable Parquet file"):
        prepare_dataset([InputSpec(str(corrupt), "books")], out, use_ray=False, val_fraction=0)

    no_column = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"content": ["x"]}), no_column)
    with pytest.raises(DataError, match=rf"{no_column}: no column 'text' \(columns: \['content'\]\)"):
        prepare_dataset([InputSpec(str(no_column), "books")], out, use_ray=False, val_fraction=0)

    with pytest.raises(DataError, match="source name 'we b'"):
        prepare_dataset([InputSpec(str(bad_json), "we b")], out, use_ray=False, val_fraction=0)


def test_prepared_shards_cannot_be_inputs(corpus):
    inputs, _, out = corpus
    prepare_dataset(inputs, str(out), use_ray=False, val_fraction=0)
    with pytest.raises(DataError, match="inside the output directory"):
        prepare_dataset([InputSpec(str(out), "again")], str(out), use_ray=False, val_fraction=0)


def test_input_argument_syntax():
    assert parse_input("web=data/*.jsonl") == InputSpec("data/*.jsonl", "web")
    assert parse_input("web=s3://b/raw/::text=content,quality=score") == InputSpec(
        "s3://b/raw/", "web", text_field="content", quality_field="score")
    assert parse_input("code=/a/b=c/**/*.py", quality_field="q").quality_field == "q"
    for bad in ["data/*.jsonl", "=x", "web=x::colour=red"]:
        with pytest.raises(DataError, match="--input"):
            parse_input(bad)
    assert parse_token_count("8M") == 8 << 20 and parse_token_count("1_000") == 1000
    with pytest.raises(ValueError, match="not a count"):
        parse_token_count("lots")


def test_manifest_on_disk_loads_and_records_how_it_was_made(corpus):
    inputs, _, out = corpus
    prepare_dataset(inputs, str(out), "byte", shard_tokens=1234, use_ray=False, val_fraction=0)
    m = Manifest.load(str(out))
    assert m.prepare["shard_tokens"] == 1234 and len(m.prepare["fingerprint"]) == 64
    assert m.prepare["inputs"][0].startswith("notes=")


def test_cli_prepares_with_per_input_fields(tmp_path, capsys):
    inputs, expected = write_corpus(tmp_path / "raw")
    main = load_job("prepare_data").main
    out = tmp_path / "out"
    args = ["--input", f"notes={inputs[0].path}", "--input", f"web={tmp_path}/raw/*.jsonl::quality=q",
            "--input", f"books={tmp_path}/raw/books.parquet::text=body", "--out", str(out),
            "--shard-tokens", "1K", "--buckets", "short:600,long", "--local", "--val-fraction", "0",
            "--quiet"]
    assert main(args) == 0
    assert "written" in capsys.readouterr().out
    m = Manifest.load(str(out))
    assert {k: v["docs"] for k, v in m.sources.items()} == {k: len(v) for k, v in expected.items()}
    assert [b.name for b in m.length_buckets] == ["short", "long"] and m.prepare["shard_tokens"] == 1024
    assert main(args) == 0 and "up to date" in capsys.readouterr().out
    assert main(["--input", f"x={tmp_path}/none/*.txt", "--out", str(out), "--local", "--quiet"]) == 2
    assert "no files found" in capsys.readouterr().err
