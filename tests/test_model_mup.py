"""muP coordinate check: with one learning rate, how far a few Adam steps move the output logits stays
about the same across widths under muP, and grows with width under the standard parametrisation."""

import pytest
import torch

from raytrainer.config import ModelConfig
from raytrainer.model import Transformer

WIDTHS = (64, 128, 256)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def logit_update_scale(width: int, mup: bool, lr: float = 1e-2, steps: int = 5) -> float:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=width, n_layers=2, n_heads=4, ffn_hidden=2 * width,
                      max_seq_len=32, mup_base_d_model=64 if mup else None)
    model = Transformer(cfg)
    groups = model.optimizer_groups(weight_decay=0.0)
    opt = torch.optim.Adam([{"params": g["params"], "lr": lr * g["lr_scale"]} for g in groups])
    x = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x).logits
    for _ in range(steps):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (model(x).logits - before).std().item()


def test_mup_logit_updates_are_width_invariant_and_sp_ones_are_not():
    mup = [logit_update_scale(w, mup=True) for w in WIDTHS]
    sp = [logit_update_scale(w, mup=False) for w in WIDTHS]
    assert mup[0] == pytest.approx(sp[0], rel=0.2)  # at the base width the two nearly agree
    assert max(mup) / min(mup) < 1.5
    assert sp[-1] / sp[0] > 2.0  # standard parametrisation: grows roughly with width
