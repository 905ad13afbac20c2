"""The chunked head + loss (model.loss.chunk_tokens) gives the loss and gradients of the materialised logits,
every term and what the model does to its logits included, without the logits."""

from __future__ import annotations

import itertools

import pytest
import torch

from raytrainer.config import AUTO_LOSS_CHUNK_TOKENS, ConfigError, ModelConfig, config_from_dict, load_config, to_dict
from raytrainer.model import Transformer
from raytrainer.model.fused_loss import chunked_loss_sums
from raytrainer.model.loss import IGNORE_INDEX, token_ce, token_loss_sums


@pytest.mark.parametrize("smoothing,z_weight,softcap,scale",
                         list(itertools.product((0.0, 0.1), (0.0, 1e-3), (None, 5.0), (1.0, 0.25))))
def test_the_sums_and_gradients_equal_the_materialised_logits(smoothing, z_weight, softcap, scale):
    torch.manual_seed(0)
    n, d, vocab = 37, 16, 50
    hidden = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, d, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (n,))
    labels[::5] = IGNORE_INDEX
    logits = (hidden @ weight.t()) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    ref = token_loss_sums(logits, labels, smoothing, z_weight)
    want = torch.autograd.grad(1.7 * ref.objective, (hidden, weight))
    for chunk in (1, 7, 64):  # a token at a time, chunks that do not divide N, one chunk for all
        sums, ce = chunked_loss_sums(hidden, weight, labels, chunk_tokens=chunk, scale=scale, softcap=softcap,
                                     label_smoothing=smoothing, z_loss_weight=z_weight)
        got = torch.autograd.grad(1.7 * sums.objective, (hidden, weight))
        for a, b in [(ref.objective, sums.objective), (ref.ce, sums.ce), (ref.z, sums.z), *zip(want, got, strict=True)]:
            torch.testing.assert_close(b.double(), a.double(), rtol=1e-5, atol=1e-6)
        assert int(sums.count) == int(ref.count)
        torch.testing.assert_close(ce.double(), token_ce(logits, labels).double(), rtol=1e-5, atol=1e-6)


def test_the_head_is_multiplied_as_often_as_with_the_logits_and_not_at_all_without_gradients():
    """The logits are turned into the gradients while they are at hand: lm_head's matmul runs once per chunk in
    forward (not again in backward), so forward + backward cost the naive path's three products."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulFlops(TorchDispatchMode):  # torch's FlopCounterMode does not count the in-place addmm_
        flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name == "mm":
                self.flops += 2 * args[0].shape[0] * args[0].shape[1] * args[1].shape[1]
            elif name in ("addmm", "addmm_"):
                self.flops += 2 * args[1].shape[0] * args[1].shape[1] * args[2].shape[1]
            return func(*args, **(kwargs or {}))

    n, d, vocab = 64, 16, 50
    hidden = torch.randn(n, d, requires_grad=True)
    weight = torch.randn(vocab, d, requires_grad=True)
    labels = torch.randint(0, vocab, (n,))

    def matmul_flops(run) -> int:
        with MatmulFlops() as counter:
            run()
        return counter.flops

    naive = matmul_flops(lambda: token_loss_sums(hidden @ weight.t(), labels).objective.backward())
    chunked = matmul_flops(lambda: chunked_loss_sums(hidden, weight, labels, chunk_tokens=16)[0].objective.backward())
    assert naive == chunked == 3 * 2 * n * d * vocab
    with torch.no_grad():  # evaluation: the forward product only
        assert matmul_flops(lambda: chunked_loss_sums(hidden, weight, labels, chunk_tokens=16)) == 2 * n * d * vocab


def test_a_second_backward_through_the_chunked_loss_is_refused_by_name():
    hidden = torch.randn(8, 4, requires_grad=True)
    weight = torch.randn(10, 4, requires_grad=True)
    sums, _ = chunked_loss_sums(hidden, weight, torch.randint(0, 10, (8,)), chunk_tokens=4)
    sums.objective.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="model.loss.chunk_tokens"):
        sums.objective.backward()


@pytest.mark.parametrize("extra", [
    {},
    {"mtp_heads": 2, "tie_embeddings": True},
    {"mup_base_d_model": 32, "logit_softcap": 30.0, "loss": {"label_smoothing": 0.1, "z_loss_weight": 1e-4}},
])
def test_the_model_trains_the_same_with_and_without_the_logits(extra):
    torch.manual_seed(0)
    base = {"vocab_size": 96, "d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 32, **extra}
    loss = base.pop("loss", {})
    plain = Transformer(ModelConfig(**base, loss={**loss, "chunk_tokens": 0}))
    chunked = Transformer(ModelConfig(**base, loss={**loss, "chunk_tokens": 24}))
    chunked.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 96, (3, 32))
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = IGNORE_INDEX
    doc_ids = torch.cat([torch.zeros(3, 20, dtype=torch.long), torch.ones(3, 12, dtype=torch.long)], 1)
    outs = []
    for model in (plain, chunked):
        out = model(ids, labels=labels, doc_ids=doc_ids, loss_normalizer=40.0)
        out.loss.backward()
        outs.append(out)
    assert outs[1].logits is None  # never materialised
    torch.testing.assert_close(outs[1].loss, outs[0].loss, rtol=1e-5, atol=1e-6)
    for key in outs[0].metrics:
        torch.testing.assert_close(outs[1].metrics[key].double(), outs[0].metrics[key].double(), rtol=1e-5,
                                   atol=1e-6)
    torch.testing.assert_close(outs[1].metrics["token_ce"], token_ce(outs[0].logits, labels), rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(plain.named_parameters(), chunked.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_zero3_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="model.loss.chunk_tokens with ZeRO-3"):
        load_config("tiny", ["model.loss.chunk_tokens=1024", "parallel.strategy=deepspeed", "parallel.zero_stage=3"])


def test_auto_chunks_the_loss_by_default_and_gives_way_where_the_loss_is_computed_elsewhere():
    cfg = load_config("tiny")
    assert cfg.model.loss.chunk_tokens == "auto"
    assert Transformer(cfg.model).loss_chunk_tokens == AUTO_LOSS_CHUNK_TOKENS
    assert Transformer(load_config("tiny", ["model.loss.chunk_tokens=0"]).model).loss_chunk_tokens == 0
    assert Transformer(load_config("tiny", ["model.loss.chunk_tokens=96"]).model).loss_chunk_tokens == 96
    # where a chunk size the user set is refused, "auto" is accepted: the strategy turns it off there
    tp = load_config("tiny", ["parallel.strategy=fsdp", "parallel.tp=2", "parallel.min_workers=2",
                              "parallel.max_workers=2"])
    zero3 = load_config("tiny", ["parallel.strategy=deepspeed", "parallel.zero_stage=3"])
    # and stays "auto" in the config a checkpoint keeps, so that it loads on any mesh
    for cfg in (tp, zero3):
        assert config_from_dict(to_dict(cfg), ["parallel.tp=1"]).model.loss.chunk_tokens == "auto"
    with pytest.raises(ConfigError, match="chunk_tokens"):
        load_config("tiny", ["model.loss.chunk_tokens=many"])
