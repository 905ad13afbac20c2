"""Instruction data: prepare keeps each record's prompt apart (prompt_length), validation checks it, and the
sft objective trains on the responses only — from a .jsonl or Parquet file to the labels of a batch."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_corpus import read_docs, text_of
from datasets import config, documents_by_id
from raytrainer.cli import main as raytrainer_main
from raytrainer.data.feed import DataFeed
from raytrainer.data.manifest import DataError, Manifest
from raytrainer.data.packing import DOC, END, ROW, START
from raytrainer.data.prepare import prepare_dataset
from raytrainer.data.sources import InputSpec, parse_input
from raytrainer.data.tokenizers import load_tokenizer
from raytrainer.data.validate import validate_dataset

IGNORE = -100


def examples(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = f"Question {i}: " + text_of(int(rng.integers(10, 120)), seed + i)
        answer = "" if i % 17 == 5 else text_of(int(rng.integers(5, 300)), seed + 1000 + i)
        out.append({"instruction": prompt, "response": answer, "score": float(i % 3)})
    return out


@pytest.fixture
def sft_jsonl(tmp_path):
    rows = examples(60)
    path = tmp_path / "raw" / "chat.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


@pytest.mark.parametrize("tokenizer", ["byte", "gpt2"])
def test_each_document_is_prompt_then_response_then_eos_with_the_prompts_token_count(sft_jsonl, tmp_path,
                                                                                      tokenizer):
    path, rows = sft_jsonl
    spec = InputSpec(str(path), "chat", text_field="response", prompt_field="instruction")
    prepare_dataset([spec], str(tmp_path / "out"), tokenizer, shard_tokens=2000, use_ray=False, val_fraction=0)
    tok = load_tokenizer(tokenizer)
    docs = read_docs(tmp_path / "out")["chat"]
    # Shards are bucketed by length, so match documents to records by their prompt.
    by_prompt = {tuple(tok.encode(r["instruction"])): r for r in rows}
    assert len(docs) == len(rows)
    for doc in docs:
        prompt = tuple(doc["tokens"][: doc["prompt_length"]])
        record = by_prompt[prompt]
        assert doc["tokens"] == list(prompt) + tok.encode(record["response"]) + [tok.eos_id]
        assert doc["length"] == len(doc["tokens"])
    assert validate_dataset(str(tmp_path / "out"), tok.identity()).checked > 0


def test_parquet_prompt_column_and_plain_pretraining_inputs_mix_in_one_dataset(tmp_path):
    rows = examples(30, seed=3)
    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(pa.table({"q": [r["instruction"] for r in rows], "a": [r["response"] for r in rows]}),
                   raw / "sft.parquet")
    (raw / "notes.txt").write_text(text_of(400, 9))
    inputs = [parse_input(f"chat={raw}/sft.parquet::prompt=q,text=a"), parse_input(f"notes={raw}/notes.txt")]
    prepare_dataset(inputs, str(tmp_path / "out"), "byte", use_ray=False, val_fraction=0)
    docs = read_docs(tmp_path / "out")
    assert sorted(d["prompt_length"] for d in docs["chat"]) == sorted(len(r["instruction"].encode()) for r in rows)
    assert [d["prompt_length"] for d in docs["notes"]] == [0]  # plain text has no prompt: all of it is learned


def test_sft_objective_learns_responses_only_from_prepared_data(sft_jsonl, tmp_path):
    path, _ = sft_jsonl
    out = tmp_path / "out"
    prepare_dataset([parse_input(f"chat={path}::prompt=instruction,text=response")], str(out), "byte",
                    use_ray=False, val_fraction=0)
    docs = documents_by_id(out)
    feed = DataFeed(config(seq_len=64, global_batch_tokens=64 * 4, objective="sft"), str(out), use_ray=False)
    prompt_targets = learned_targets = 0
    for _ in range(10):
        micro = feed.next_step()
        labels = np.concatenate([mb["labels"].numpy() for mb in micro])
        at = np.zeros(feed.last_plan.n_rows, dtype=int)
        for seg in feed.last_plan.segments:
            doc, r, s, e = int(seg[DOC]), int(seg[ROW]), int(seg[START]), int(seg[END])
            seg_labels = labels[r, at[r]: at[r] + e - s]
            targets = np.arange(s, e) + 1
            in_prompt = targets < docs[doc].prompt_length
            assert (seg_labels[in_prompt] == IGNORE).all()
            learned = ~in_prompt & (targets < len(docs[doc].tokens))
            assert np.array_equal(seg_labels[learned], docs[doc].tokens[targets[learned]])
            prompt_targets += int(in_prompt.sum())
            learned_targets += int(learned.sum())
            at[r] += e - s
    assert prompt_targets > 100 and learned_targets > 100


def test_instruction_input_errors_name_the_file_line_and_field(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "bad.jsonl").write_text(json.dumps({"instruction": "hi", "response": "yo"}) + "\n"
                                   + json.dumps({"response": "no prompt here"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: no field 'instruction'.*prompt=FIELD"):
        prepare_dataset([parse_input(f"chat={raw}/bad.jsonl::prompt=instruction,text=response")],
                        str(tmp_path / "out"), "byte", use_ray=False, val_fraction=0)
    (raw / "typed.jsonl").write_text(json.dumps({"instruction": 3, "response": "x"}) + "\n")
    with pytest.raises(DataError, match=r"typed\.jsonl line 1: field 'instruction' is int, not a string"):
        prepare_dataset([parse_input(f"chat={raw}/typed.jsonl::prompt=instruction,text=response")],
                        str(tmp_path / "out2"), "byte", use_ray=False, val_fraction=0)
    (raw / "readme.txt").write_text("plain")
    with pytest.raises(DataError, match=r"readme\.txt is a plain text file.*prompt=FIELD applies to .jsonl"):
        prepare_dataset([parse_input(f"chat={raw}/readme.txt::prompt=instruction")], str(tmp_path / "out3"),
                        "byte", use_ray=False, val_fraction=0)
    pq.write_table(pa.table({"q": [1, 2], "a": ["x", "y"]}), raw / "sft.parquet")
    with pytest.raises(DataError, match=r"sft\.parquet: column 'q' has type int64, expected a string"):
        prepare_dataset([parse_input(f"chat={raw}/sft.parquet::prompt=q,text=a")], str(tmp_path / "out4"),
                        "byte", use_ray=False, val_fraction=0)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.parquet"))


def test_validation_rejects_a_prompt_that_covers_the_whole_document(sft_jsonl, tmp_path):
    path, _ = sft_jsonl
    out = tmp_path / "out"
    prepare_dataset([parse_input(f"chat={path}::prompt=instruction,text=response")], str(out), "byte",
                    use_ray=False, val_fraction=0)
    manifest = Manifest.load(str(out))
    shard = manifest.shards[0]
    table = pq.read_table(out / shard.path)
    broken = table.set_column(table.schema.get_field_index("prompt_length"), "prompt_length",
                              pa.array(table.column("length").to_numpy(), pa.int32()))
    pq.write_table(broken, out / shard.path)
    # Keep the recorded size so that the check gets as far as the prompt lengths.
    manifest.shards[0] = type(shard)(**{**shard.__dict__, "bytes": (out / shard.path).stat().st_size})
    manifest.save(str(out))
    with pytest.raises(DataError, match=rf"{shard.path}.*row 0: prompt_length \d+ is outside"):
        validate_dataset(str(out), load_tokenizer("byte").identity())


def test_raytrainer_prepare_is_the_prepare_job(sft_jsonl, tmp_path, capsys):
    path, rows = sft_jsonl
    out = tmp_path / "cli"
    assert raytrainer_main(["prepare", "--input", f"chat={path}", "--prompt-field", "instruction",
                            "--text-field", "response", "--out", str(out), "--local", "--val-fraction", "0",
                            "--quiet"]) == 0
    assert f"{len(rows)} documents" in capsys.readouterr().out
    assert all(d["prompt_length"] > 0 for d in read_docs(out)["chat"])
    assert raytrainer_main(["prepare", "--validate", str(out)]) == 0
    assert raytrainer_main(["prepare", "--input", "chat=/nonexistent/*.jsonl", "--out", str(out), "--local"]) == 2
    assert "no files found" in capsys.readouterr().err
