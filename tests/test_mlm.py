"""Masked language modelling is MLM: a bidirectional model (each token sees its whole document and nothing
of the others), loss on the selected tokens only, and the settings that would make it something else are
refused with the reason."""

from __future__ import annotations

import pytest
import torch

from raytrainer.config import ConfigError, load_config
from raytrainer.fault.guardian import Guardian
from raytrainer.model import Transformer
from raytrainer.model.attention import dense_document_mask
from raytrainer.sampling import Sampling, sample
from raytrainer.train.loop import WorkerEnv
from raytrainer.train.ray_entry import build_trainer
from runs import MICRO_MODEL, make_dataset, micro_config

MLM = ["data.objective=mlm", "model.bidirectional=true", "model.mtp_heads=0"]


def test_mlm_and_bidirectional_attention_come_together_and_without_mtp():
    with pytest.raises(ConfigError, match="data.objective=mlm needs model.bidirectional=true"):
        load_config("tiny", ["data.objective=mlm"])
    with pytest.raises(ConfigError, match="only data.objective=mlm can train it"):
        load_config("tiny", ["model.bidirectional=true"])
    with pytest.raises(ConfigError, match="model.mtp_heads=2"):
        load_config("tiny", [*MLM, "model.mtp_heads=2"])
    assert load_config("tiny", MLM).model.bidirectional


def outputs_after_changing(model, x, doc_ids, position):
    changed = x.clone()
    changed[0, position] = (changed[0, position] + 1) % 256
    with torch.no_grad():
        return model(x, doc_ids=doc_ids).logits[0], model(changed, doc_ids=doc_ids).logits[0]


@pytest.mark.parametrize("bidirectional", [True, False], ids=["mlm", "causal"])
def test_attention_sees_the_whole_document_and_nothing_of_the_next(bidirectional):
    cfg = load_config("tiny", [*MICRO_MODEL, *(MLM if bidirectional else [])]).model
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    x = torch.randint(0, 256, (1, 12))
    doc_ids = torch.tensor([[0] * 6 + [1] * 6])
    before, after = outputs_after_changing(model, x, doc_ids, position=4)  # a token late in document 0
    moved = (before - after).abs().amax(-1) > 1e-6
    assert moved[:4].tolist() == [bidirectional] * 4  # earlier tokens of its document see it only if bidirectional
    assert moved[4:6].all() and not moved[6:].any()  # the next document never sees it
    full = dense_document_mask(doc_ids, causal=not bidirectional)[0, 0]
    assert full[1, 4].item() is bidirectional and not full[7, 4].item() and full[7, 6].item()


def test_a_bidirectional_model_is_not_exported_or_sampled_as_a_causal_one():
    from raytrainer.hf.architecture import lossy_features

    cfg = load_config("tiny", [*MICRO_MODEL, *MLM]).model
    assert any("model.bidirectional=true" in r for r in lossy_features(cfg))
    with pytest.raises(ValueError, match="no next token"):
        sample(Transformer(cfg).eval(), [[1, 2, 3]], Sampling(max_new_tokens=2), None, 0)


def test_an_mlm_run_learns_to_fill_in_masked_tokens(tmp_path):
    dataset = make_dataset(tmp_path)
    cfg = micro_config(dataset, str(tmp_path / "runs"), name="mlm", steps=30, extra=MLM)
    torch.set_num_threads(1)
    trainer = build_trainer(cfg, WorkerEnv(), torch.device("cpu"), guardian=Guardian(cfg.guardian))
    history = trainer.fit()["history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    batch = trainer.feed.next_step()[0]
    selected = batch["labels"] != -100
    assert 0.05 < selected.float().mean() < 0.3  # about mlm_probability of the tokens carry a label
