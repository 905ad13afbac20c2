"""Fine-tuning: LoRA trains only its adapters and exports merged as the adapted model; a run starts from
another run's weights (continual pretraining, SFT); instruction data (fields or chat messages) is learned on
response tokens only."""

from __future__ import annotations

import json

import pytest
import torch

from raytrainer.config import ConfigError, LoraConfig, load_config
from raytrainer.export import load_model, run_config
from raytrainer.fault.guardian import Guardian
from raytrainer.model import Transformer
from raytrainer.model.lora import LoRALinear, apply_lora, merge_lora
from raytrainer.sft import render_chat, sft_config, write_examples
from raytrainer.train.loop import WorkerEnv
from raytrainer.train.ray_entry import build_trainer
from runs import MICRO, MICRO_MODEL, make_dataset, micro_config

transformers = pytest.importorskip("transformers")


def test_lora_trains_only_its_adapters_starts_as_the_model_and_merges_into_it():
    cfg = load_config("tiny", MICRO_MODEL).model
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        before = model(x).logits
    lora = LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    trainable, total = apply_lora(model, lora)
    per_layer = 4 * (cfg.d_model + cfg.n_heads * cfg.head_dim) + 4 * (cfg.d_model + cfg.kv_heads * cfg.head_dim) \
        + 4 * (cfg.hidden_dim + cfg.d_model)
    assert trainable == cfg.n_layers * per_layer and total > trainable
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"lora_a", "lora_b"}
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before)  # B = 0: the adapted model starts as the model
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_b.normal_(0, 0.05)
        adapted = model(x).logits
        assert not torch.allclose(adapted, before, atol=1e-4)
        merged = merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        assert set(merged.state_dict()) == set(Transformer(cfg).state_dict())  # the base model's names
        torch.testing.assert_close(merged(x).logits, adapted, rtol=1e-5, atol=1e-5)


def chat_file(path, n: int = 60):
    lines = []
    for i in range(n):
        if i % 2:
            lines.append({"instruction": f"Add {i} and {i}.", "response": f"{i} plus {i} is {2 * i}."})
        else:
            lines.append({"messages": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": f"Double {i}."},
                                       {"role": "assistant", "content": f"{2 * i}."}]})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_chat_messages_become_a_prompt_and_the_last_assistant_message():
    prompt, response = render_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                    {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}],
                                   "x.jsonl:1")
    assert prompt == "<|user|>\nHi\n<|assistant|>\nHello\n<|user|>\nBye\n<|assistant|>\n" and response == "Ciao"
    with pytest.raises(ConfigError, match="x.jsonl:1: the conversation has no assistant message"):
        render_chat([{"role": "user", "content": "Hi"}], "x.jsonl:1")
    with pytest.raises(ConfigError, match=r"messages\[0\] must be"):
        render_chat([{"role": "bot", "content": "Hi"}], "x.jsonl:1")


def test_an_example_without_the_fields_names_its_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: expected 'messages', or the fields 'instruction'"):
        write_examples(bad, tmp_path / "out.jsonl")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    dataset = make_dataset(root)
    cfg = micro_config(dataset, str(root / "runs"), name="base", steps=10)
    torch.set_num_threads(1)
    build_trainer(cfg, WorkerEnv(), torch.device("cpu"), guardian=Guardian(cfg.guardian)).fit()
    return f"{root}/runs/base", dataset


def test_a_run_starts_from_another_runs_weights_with_a_fresh_optimizer(base_run, tmp_path):
    url, dataset = base_run
    base = load_model(run_config(url)[0], url)
    cfg = micro_config(dataset, str(tmp_path / "runs"), name="continued", steps=3,
                       extra=[f"model.init_from=run:{url}@10", "optim.lr=3e-4"])
    trainer = build_trainer(cfg, WorkerEnv(), torch.device("cpu"), guardian=Guardian(cfg.guardian))
    for name, tensor in base.state_dict().items():
        assert torch.equal(trainer.engine.strategy.module.state_dict()[name], tensor), name
    assert trainer.fit()["step"] == 3  # its own steps, from 0
    wrong = micro_config(dataset, str(tmp_path / "runs"), name="wider", steps=3,
                         extra=[f"model.init_from=run:{url}", "model.d_model=128"])
    with pytest.raises(ConfigError, match="does not fit the configured model.*wrong shape"):
        build_trainer(wrong, WorkerEnv(), torch.device("cpu"), guardian=Guardian(wrong.guardian))


def test_sft_with_lora_learns_responses_only_changes_only_adapters_and_exports_merged(base_run, tmp_path):
    from raytrainer.cli import main as cli
    from raytrainer.data.prepare import prepare_dataset
    from raytrainer.data.sources import parse_input

    url, _ = base_run
    examples = tmp_path / "sft" / "examples.jsonl"
    assert write_examples(chat_file(tmp_path / "chat.jsonl"), examples) == 60
    cfg = sft_config(f"run:{url}", str(tmp_path / "sft"), "tiny",
                     [*(o for o in MICRO_MODEL if o.startswith("train.")), *MICRO[len(MICRO_MODEL):],
                      f"checkpoint.storage={tmp_path / 'runs'}", "run.name=sft",
                      "train.steps=12", "optim.lr=1e-2", "eval.every_steps=null"],
                     LoraConfig(rank=4, alpha=8))
    assert cfg.model.d_model == run_config(url)[0].model.d_model and cfg.data.objective == "sft"
    prepare_dataset([parse_input(f"sft={examples}::prompt=prompt,text=response")], str(tmp_path / "sft"),
                    cfg.data.tokenizer, use_ray=False, val_fraction=0)
    trainer = build_trainer(cfg, WorkerEnv(), torch.device("cpu"), guardian=Guardian(cfg.guardian))
    trainer.restore()
    batch = trainer.feed.next_step()[0]
    learned = batch["labels"] != -100
    real = batch["input_ids"] != trainer.feed.objective.pad_id
    assert 0 < learned.sum() < 0.7 * real.sum()  # prompts (and their role headers) are not learned
    trainer.feed.close()
    trainer = build_trainer(cfg, WorkerEnv(), torch.device("cpu"), guardian=Guardian(cfg.guardian))
    history = trainer.fit()["history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert sum(losses[-3:]) < sum(losses[:3])
    base = load_model(run_config(url)[0], url).state_dict()
    tuned = trainer.engine.strategy.module.state_dict()
    for name, tensor in base.items():
        assert torch.equal(tuned[name], tensor), f"{name} changed, but only the adapters train"
    assert any(tuned[n].abs().sum() > 0 for n in tuned if n.endswith("lora_b"))
    # The export holds the adapted model under the base model's names.
    out = tmp_path / "hf"
    assert cli(["export", "--run", str(tmp_path / "runs" / "sft"), "--out", str(out)]) == 0
    adapted = load_model(cfg, str(tmp_path / "runs" / "sft"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, adapted(x).logits, rtol=1e-4, atol=1e-4)


def test_a_relative_init_from_reaches_the_workers_as_an_absolute_path(tmp_path, monkeypatch):
    import os

    from raytrainer.launch import absolute_local_paths

    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny", ["model.init_from=run:runs/tiny@100"])
    assert absolute_local_paths(cfg).model.init_from == f"run:{os.path.join(str(tmp_path), 'runs/tiny')}@100"
    cfg = load_config("tiny", ["model.init_from=hf:s3-free/dir"])
    assert absolute_local_paths(cfg).model.init_from == f"hf:{tmp_path}/s3-free/dir"
