"""Attention backends against a written-out reference; backend choice and its errors."""

import warnings

import pytest
import torch

from raytrainer.model.attention import (
    attention,
    build_mask,
    dense_document_mask,
    document_mask_mod,
    flash_attn_available,
    resolve_backend,
    varlen_offsets,
)

DOC_IDS = torch.tensor([[0] * 10 + [1] * 22, [0] * 5 + [1] * 5 + [2] * 20 + [3] * 2])


def reference(q, k, v, doc_ids=None, scale=None):
    """softmax(q k^T * scale + mask) v with k/v heads repeated for GQA."""
    B, H, T, D = q.shape
    rep = H // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    allowed = torch.ones(T, T, dtype=torch.bool).tril().expand(B, 1, T, T)
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else D**-0.5)
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def qkv(kv_heads: int = 2, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    shapes = ((2, 4, 32, 16), (2, kv_heads, 32, 16), (2, kv_heads, 32, 16))
    return [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("with_docs", [False, True])
def test_sdpa_matches_reference(kv_heads, with_docs):
    q, k, v = qkv(kv_heads)
    doc_ids = DOC_IDS if with_docs else None
    for scale in (None, 1 / 16):
        out = attention(q, k, v, doc_ids=doc_ids, backend="sdpa", scale=scale)
        torch.testing.assert_close(out, reference(q, k, v, doc_ids, scale), rtol=1e-5, atol=1e-5)


def test_single_document_equals_plain_causal():
    q, k, v = qkv()
    torch.testing.assert_close(attention(q, k, v, doc_ids=torch.zeros(2, 32, dtype=torch.long)),
                               attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_flex_mask_mod_matches_the_dense_mask():
    B, T = DOC_IDS.shape
    b = torch.arange(B)[:, None, None]
    q_idx, kv_idx = torch.arange(T)[None, :, None], torch.arange(T)[None, None, :]
    grid = document_mask_mod(DOC_IDS)(b, 0, q_idx, kv_idx)
    assert torch.equal(grid, dense_document_mask(DOC_IDS)[:, 0])


def test_flex_forward_matches_sdpa_on_cpu():
    # FlexAttention runs forward (not backward) on CPU, enough to check the block mask from doc_ids
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q, k, v = qkv(kv_heads=2)
    block_mask = create_block_mask(document_mask_mod(DOC_IDS), 2, None, 32, 32, device="cpu")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        out = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    torch.testing.assert_close(out, reference(q, k, v, DOC_IDS), rtol=1e-5, atol=1e-5)


def test_varlen_offsets_split_rows_and_documents():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 2]])
    cu_seqlens, max_seqlen = varlen_offsets(doc_ids)
    assert cu_seqlens.tolist() == [0, 2, 5, 6, 9, 10] and cu_seqlens.dtype == torch.int32
    assert max_seqlen == 3


def test_backend_choice_and_errors():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu, has_documents=True) == "sdpa"
    assert resolve_backend("auto", cuda, has_documents=True) == "flex"
    assert resolve_backend("auto", cuda, has_documents=False) == "sdpa"
    with pytest.raises(ValueError, match="needs a CUDA device.*no backward pass on CPU"):
        resolve_backend("flex", cpu, has_documents=True)
    with pytest.raises(ValueError, match="model.attention=flash"):
        resolve_backend("flash", cpu, has_documents=True)
    with pytest.raises(ValueError, match="not a backend"):
        resolve_backend("xformers", cpu, has_documents=False)
    q, k, v = qkv()
    with pytest.raises(ValueError, match="flex"):
        attention(q, k, v, doc_ids=DOC_IDS, backend="flex")
    mask = build_mask(DOC_IDS, "auto", cpu)
    assert mask.backend == "sdpa" and mask.dense.shape == (2, 1, 32, 32)


def _grads(backend, doc_ids, dtype):
    q, k, v = (t.requires_grad_() for t in qkv(2, dtype=dtype, device="cuda"))
    out = attention(q, k, v, doc_ids=doc_ids, backend=backend)
    out.float().pow(2).sum().backward()
    return out, q.grad, k.grad, v.grad


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["flex", "flash"])
def test_cuda_backends_match_sdpa_forward_and_backward(backend):
    if backend == "flash" and not flash_attn_available():
        pytest.skip("flash-attn is not installed")
    doc_ids = DOC_IDS.cuda()
    for docs in (doc_ids, None):
        expected = _grads("sdpa", docs, torch.bfloat16)
        for got, want in zip(_grads(backend, docs, torch.bfloat16), expected, strict=True):
            torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
