"""Loss: masking, label smoothing, z-loss, normalisation, MTP label shifting."""

import pytest
import torch
import torch.nn.functional as F

from raytrainer.config import LossConfig, ModelConfig
from raytrainer.model import Transformer
from raytrainer.model.loss import IGNORE_INDEX, compute_loss, shift_labels


def batch(seed: int = 0, V: int = 11):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 7, V, generator=gen) * 3
    labels = torch.randint(0, V, (2, 7), generator=gen)
    labels[0, :2] = IGNORE_INDEX
    labels[1, -1] = IGNORE_INDEX
    return logits, labels


def test_ignored_positions_do_not_count():
    logits, labels = batch()
    loss, metrics = compute_loss(logits, labels)
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 11), labels.view(-1)))
    assert metrics["label_tokens"].item() == 11
    changed = logits.clone()
    changed[0, :2] = 100.0  # only ignored positions
    torch.testing.assert_close(compute_loss(changed, labels)[0], loss)


def test_label_smoothing_matches_torch_and_ce_metric_stays_plain():
    logits, labels = batch()
    loss, metrics = compute_loss(logits, labels, label_smoothing=0.1)
    expected = F.cross_entropy(logits.view(-1, 11), labels.view(-1), label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(metrics["ce"], F.cross_entropy(logits.view(-1, 11), labels.view(-1)))


def test_z_loss_is_weight_times_mean_squared_logsumexp():
    logits, labels = batch()
    loss, metrics = compute_loss(logits, labels, z_loss_weight=1e-2)
    valid = labels != IGNORE_INDEX
    z = torch.logsumexp(logits, -1)[valid].pow(2).mean()
    ce = F.cross_entropy(logits.view(-1, 11), labels.view(-1))
    torch.testing.assert_close(loss, ce + 1e-2 * z)
    torch.testing.assert_close(metrics["z_loss"], z)


def test_normalizer_divides_the_sum_and_bf16_logits_are_upcast():
    logits, labels = batch()
    summed = F.cross_entropy(logits.view(-1, 11), labels.view(-1), reduction="sum")
    torch.testing.assert_close(compute_loss(logits, labels, loss_normalizer=4.0)[0], summed / 4.0)
    loss_bf16, _ = compute_loss(logits.bfloat16(), labels)
    assert loss_bf16.dtype == torch.float32
    ref = F.cross_entropy(logits.bfloat16().float().view(-1, 11), labels.view(-1))
    torch.testing.assert_close(loss_bf16, ref)


def test_all_ignored_micro_batch_gives_zero_loss_and_finite_grads():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.full((2, 5), IGNORE_INDEX)
    for normalizer in (None, 8.0):
        loss, metrics = compute_loss(logits, labels, z_loss_weight=1e-4, loss_normalizer=normalizer)
        loss.backward()
        assert loss.item() == 0.0 and metrics["ce"].item() == 0.0 and metrics["label_tokens"].item() == 0
        assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_shift_labels_stays_within_documents_and_rows():
    labels = torch.tensor([[10, 11, 12, -100, 20, 21, -100]])
    doc_ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1]])
    assert shift_labels(labels, doc_ids, 1).tolist() == [[11, 12, -100, -100, 21, -100, -100]]
    assert shift_labels(labels, doc_ids, 2).tolist() == [[12, -100, -100, -100, -100, -100, -100]]
    assert shift_labels(labels, None, 2).tolist() == [[12, -100, 20, 21, -100, -100, -100]]
    assert shift_labels(labels, doc_ids, 7).tolist() == [[-100] * 7]


def test_model_mtp_loss_is_weighted_mean_of_head_losses_masked_across_documents():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=23, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=32,
                      mtp_heads=2, mtp_weight=0.5, loss=LossConfig(label_smoothing=0.05, chunk_tokens=0))
    model = Transformer(cfg)  # (logits materialised, to check against; test_fused_loss: the chunked loss agrees)
    input_ids = torch.randint(0, 23, (1, 12))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    position_ids = torch.tensor([list(range(5)) + list(range(7))])
    labels = torch.roll(input_ids, -1, 1)
    labels[0, 4] = labels[0, 11] = IGNORE_INDEX  # each document's last token predicts nothing

    trunk = {}
    model.norm.register_forward_hook(lambda mod, args, out: trunk.setdefault("h", args[0]))
    out = model(input_ids, labels=labels, position_ids=position_ids, doc_ids=doc_ids)

    main = F.cross_entropy(out.logits[0], labels[0], label_smoothing=0.05, reduction="sum")
    heads = []
    for k, head in enumerate(model.mtp, start=1):
        logits = model.output_logits(head(trunk["h"]))[0]
        targets = [int(input_ids[0, t + 1 + k]) if t + 1 + k < 12 and doc_ids[0, t + 1 + k] == doc_ids[0, t]
                   else IGNORE_INDEX for t in range(12)]
        heads.append(F.cross_entropy(logits, torch.tensor(targets), label_smoothing=0.05, reduction="sum"))
    expected = (main + 0.5 * (heads[0] + heads[1]) / 2) / 10
    torch.testing.assert_close(out.loss, expected)
    assert 0 < out.metrics["mtp_ce"].item() < 10
    out.loss.backward()
    assert all(p.grad is not None for p in model.mtp.parameters())


def test_zero_mtp_weight_leaves_the_main_loss():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=23, d_model=32, n_layers=1, n_heads=4, ffn_hidden=64, max_seq_len=32,
                      mtp_heads=1, mtp_weight=0.0)
    model = Transformer(cfg)
    x = torch.randint(0, 23, (2, 9))
    out = model(x, labels=x)
    assert out.loss.item() == pytest.approx(out.metrics["ce"].item(), rel=1e-6)
