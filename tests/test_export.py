"""A trained checkpoint exports to the Hugging Face Llama format with identical logits, and samples text."""

from __future__ import annotations

import pytest
import torch

from raytrainer.cli import main as cli
from raytrainer.export import load_model
from raytrainer.fault.guardian import Guardian
from raytrainer.train.loop import WorkerEnv
from raytrainer.train.ray_entry import build_trainer
from runs import make_dataset, micro_config

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    dataset = make_dataset(root)
    cfg = micro_config(dataset, str(root / "runs"), name="exported", steps=10,
                       extra=["model.qk_norm=false", "train.ema_decay=0.9"])
    torch.set_num_threads(1)
    build_trainer(cfg, WorkerEnv(), torch.device("cpu"), guardian=Guardian(cfg.guardian)).fit()
    return cfg, f"{root}/runs/exported", root


def test_exported_model_matches_in_transformers(trained):
    cfg, run, root = trained
    out = root / "hf"
    args = ["--config", "tiny", *sum((["--set", s] for s in _overrides(cfg)), [])]
    assert cli(["export", *args, "--run", run, "--out", str(out)]) == 0
    ours = load_model(cfg, run)
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, 256, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x).logits, rtol=1e-4, atol=1e-4)


def test_ema_weights_differ_from_training_weights(trained):
    cfg, run, _ = trained
    plain, ema = load_model(cfg, run), load_model(cfg, run, use_ema=True)
    diffs = [(a - b).abs().max().item() for a, b in zip(plain.parameters(), ema.parameters(), strict=True)]
    assert max(diffs) > 0


def test_generate_returns_the_prompt_and_more(trained, capsys):
    cfg, run, _ = trained
    args = ["--config", "tiny", *sum((["--set", s] for s in _overrides(cfg)), [])]
    assert cli(["generate", *args, "--run", run, "--prompt", "def ", "--max-new-tokens", "20"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def ") and len(text) > 5


def _overrides(cfg) -> list[str]:
    from runs import MICRO

    return [*MICRO, "model.qk_norm=false", "train.ema_decay=0.9", f"data.path={cfg.data.path}",
            f"checkpoint.storage={cfg.checkpoint.storage}", f"run.name={cfg.run.name}", "train.steps=10"]
