"""A trained checkpoint exports as the same model in Hugging Face format, with the config the checkpoint holds
(no --config): a plain model as Llama, the tiny preset's QK-norm model as Qwen3, identical logits either way;
tokenizer files AutoTokenizer loads with the training special tokens; shards; refusals that name the reason;
sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raytrainer.cli import main as cli
from raytrainer.data.tokenizers import load_tokenizer
from raytrainer.export import load_model, run_config
from raytrainer.fault.guardian import Guardian
from raytrainer.hf.tokenizer_files import write_tokenizer
from raytrainer.train.loop import WorkerEnv
from raytrainer.train.ray_entry import build_trainer
from runs import make_dataset, micro_config

transformers = pytest.importorskip("transformers")

TEXT = "def héllo(x):\n    return x  # ünïcode ✓ 日本\n"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("export-data"))


def train(dataset, root, name: str, extra: list[str]) -> str:
    cfg = micro_config(dataset, str(root / "runs"), name=name, steps=10, extra=extra)
    torch.set_num_threads(1)
    build_trainer(cfg, WorkerEnv(), torch.device("cpu"), guardian=Guardian(cfg.guardian)).fit()
    return f"{root}/runs/{name}"


@pytest.fixture(scope="module")
def plain(dataset, tmp_path_factory):
    return train(dataset, tmp_path_factory.mktemp("plain"), "plain", ["model.qk_norm=false", "train.ema_decay=0.9"])


@pytest.fixture(scope="module")
def qk_norm(dataset, tmp_path_factory):
    return train(dataset, tmp_path_factory.mktemp("qknorm"), "qknorm", [])  # the tiny preset's qk_norm=true


def logits_match(run: str, out, architecture, atol: float = 1e-4) -> None:
    cfg, _ = run_config(run)
    ours = load_model(cfg, run)
    hf = architecture.from_pretrained(out).float().eval()
    x = torch.randint(0, cfg.model.vocab_size, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x).logits, rtol=atol, atol=atol)


def test_a_plain_model_exports_as_llama_with_identical_logits_from_the_checkpoints_own_config(plain, tmp_path):
    out = tmp_path / "hf"
    assert cli(["export", "--run", plain, "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    logits_match(plain, out, transformers.LlamaForCausalLM)


def test_the_tiny_presets_qk_norm_model_exports_as_qwen3_with_identical_logits(qk_norm, tmp_path):
    cfg, _ = run_config(qk_norm)
    assert cfg.model.qk_norm  # as the preset ships
    out = tmp_path / "hf"
    assert cli(["export", "--run", qk_norm, "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
    logits_match(qk_norm, out, transformers.Qwen3ForCausalLM)
    # The same checkpoint read as Llama (no q_norm/k_norm) is a different model: the check above can fail.
    with pytest.raises(AssertionError):
        logits_match(qk_norm, out, transformers.LlamaForCausalLM)


def test_bf16_export_in_shards_loads_through_its_index(qk_norm, tmp_path):
    out = tmp_path / "hf"
    assert cli(["export", "--run", qk_norm, "--out", str(out), "--dtype", "bf16", "--max-shard-gb", "0.0002"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf = transformers.Qwen3ForCausalLM.from_pretrained(out)
    assert next(hf.parameters()).dtype == torch.bfloat16
    logits_match(qk_norm, out, transformers.Qwen3ForCausalLM, atol=0.15)


def test_the_export_carries_the_tokenizer_with_the_training_special_tokens(plain, tmp_path):
    out = tmp_path / "hf"
    assert cli(["export", "--run", plain, "--out", str(out)]) == 0
    ours = load_tokenizer("byte")
    hf = transformers.AutoTokenizer.from_pretrained(out)
    assert hf.encode(TEXT) == ours.encode(TEXT) and hf.decode(ours.encode(TEXT)) == TEXT
    assert (hf.eos_token_id, hf.pad_token_id, hf.mask_token_id) == (ours.eos_id, ours.pad_id, ours.mask_id)
    assert set(ours.special_ids().values()) <= set(hf.all_special_ids)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == ours.eos_id


def test_gpt2_tokenizer_files_encode_as_training_did(tmp_path):
    ours = load_tokenizer("gpt2")
    assert write_tokenizer(ours, tmp_path, 1024)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.encode(TEXT) == ours.encode(TEXT)
    assert (hf.eos_token_id, hf.pad_token_id, hf.convert_tokens_to_ids("<|mask|>")) == (
        ours.eos_id, ours.pad_id, ours.mask_id)


def test_features_without_an_hf_counterpart_are_refused_unless_lossy(plain, tmp_path, capsys):
    out = tmp_path / "hf"
    assert cli(["export", "--run", plain, "--out", str(out), "--set", "model.logit_softcap=30"]) == 2
    err = capsys.readouterr().err
    assert "model.logit_softcap=30" in err and "--lossy" in err and not out.exists()
    assert cli(["export", "--run", plain, "--out", str(out), "--set", "model.logit_softcap=30", "--lossy"]) == 0
    assert (out / "config.json").is_file()


def test_an_existing_export_is_replaced_only_with_force(plain, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli(["export", "--run", plain, "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"
    assert cli(["export", "--run", plain, "--out", str(out), "--force"]) == 0
    assert not (out / "notes.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # nothing left aside


def test_ema_weights_differ_from_training_weights(plain):
    cfg, _ = run_config(plain)
    trained, ema = load_model(cfg, plain), load_model(cfg, plain, use_ema=True)
    diffs = [(a - b).abs().max().item() for a, b in zip(trained.parameters(), ema.parameters(), strict=True)]
    assert max(diffs) > 0


def test_generate_continues_each_prompt_without_a_config(plain, capsys):
    assert cli(["generate", "--run", plain, "--prompt", "def ", "--prompt", "import", "--max-new-tokens", "20"]) == 0
    first, second = capsys.readouterr().out.rstrip("\n").split("\n\n", 1)
    assert first.startswith("def ") and len(first) > 5 and second.startswith("import")
    for flags in (["--greedy"], ["--num-beams", "3"],
                  ["--top-k", "5", "--top-p", "0.9", "--min-p", "0.05", "--repetition-penalty", "1.2"]):
        assert cli(["generate", "--run", plain, "--prompt", "def ", "--max-new-tokens", "8", *flags]) == 0
        assert capsys.readouterr().out.startswith("def ")
    assert cli(["generate", "--run", plain, "--top-p", "2"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err


def test_a_run_or_step_that_is_not_there_is_one_line_naming_what_is(plain, tmp_path, capsys):
    runs = plain.rsplit("/", 1)[0]
    typo = f"{runs}/plian"
    assert cli(["export", "--run", typo, "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {typo}: no run there") and "runs in" in err and "plain" in err, err
    for command in (["generate", "--run", typo], ["report", "--run", typo], ["inspect", "--run", typo],
                    ["report", "--compare", plain, typo]):
        assert cli(command) == 2, command
        assert "no run there" in capsys.readouterr().err
    assert cli(["generate", "--run", plain, "--step", "7"]) == 2
    err = capsys.readouterr().err
    assert "step 7 is not a complete checkpoint (complete steps: 10)" in err and "raytrainer inspect" in err, err
    assert cli(["report", "--run", "plain"]) == 2
    assert "expected <checkpoint.storage>/<run.name>" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists() and not Path(typo).exists()  # nothing made for the typo
