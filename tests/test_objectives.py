"""Objectives as transforms: FIM (PSM/SPM) rearranges a document around sentinels, MLM masks 80/10/10,
SFT leaves prompt tokens unlearned; every choice is deterministic in (seed, document) or (seed, batch,
row)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raytrainer.config import DataConfig
from raytrainer.data.manifest import DataError
from raytrainer.data.objectives import IGNORE, Objective
from raytrainer.data.packing import Piece, build_rows, fill_rows
from raytrainer.data.tokenizers import load_tokenizer

TOK = load_tokenizer("byte").identity()
PRE, MID, SUF, MASK, EOS, PAD = (TOK[f"{k}_id"] for k in ("fim_prefix", "fim_middle", "fim_suffix", "mask",
                                                          "eos", "pad"))


def objective(name: str, seed: int = 3, **data) -> Objective:
    return Objective.from_config(DataConfig(objective=name, **data), seed, TOK)


def doc(length: int, seed: int = 0) -> np.ndarray:
    body = np.random.default_rng(seed).integers(0, 256, size=length - 1)
    return np.append(body, EOS).astype(np.uint16)


def split_fim(out: np.ndarray, mode: str) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """(prefix, middle, suffix) read back from a transformed document (SPM: prefix + middle together)."""
    out = out.tolist()
    assert out[0] == PRE and out[-1] == EOS
    assert out.count(PRE) == out.count(MID) == out.count(SUF) == 1
    body = out[:-1]
    if mode == "spm":  # <PRE> <SUF> suffix <MID> prefix middle
        assert body[1] == SUF
        m = body.index(MID)
        return None, np.array(body[m + 1:]), np.array(body[2:m])
    s, m = body.index(SUF), body.index(MID)  # PSM: <PRE> prefix <SUF> suffix <MID> middle
    assert s < m
    return np.array(body[1:s]), np.array(body[m + 1:]), np.array(body[s + 1:m])


@settings(max_examples=100, deadline=None)
@given(length=st.integers(1, 400), doc_id=st.integers(0, 10**9), spm=st.sampled_from([0.0, 1.0]))
def test_fim_output_is_the_document_rearranged_around_three_sentinels(length, doc_id, spm):
    obj = objective("fim", fim_rate=1.0, fim_spm_rate=spm)
    tokens = doc(length, seed=doc_id % 1000)
    out, learnable = obj.document(doc_id, tokens)
    assert learnable is None and len(out) == length + 3 == length + obj.extra_tokens(doc_id)
    assert Counter(out.tolist()) == Counter(tokens.tolist()) + Counter([PRE, MID, SUF])
    mode = obj.fim_mode(doc_id)
    assert mode == ("spm" if spm else "psm")
    prefix, middle, suffix = split_fim(out, mode)
    text = tokens[:-1]
    if mode == "psm":
        assert np.array_equal(np.concatenate([prefix, middle, suffix]), text)
    else:  # prefix and middle are adjacent; their concatenation is the text before the suffix
        assert np.array_equal(np.concatenate([middle, suffix]), text)


def test_fim_rates_and_determinism():
    obj = objective("fim", fim_rate=0.5, fim_spm_rate=0.25)
    modes = Counter(obj.fim_mode(d) for d in range(20000))
    assert abs(modes[None] / 20000 - 0.5) < 0.02
    assert abs(modes["spm"] / (modes["spm"] + modes["psm"]) - 0.25) < 0.02
    tokens = doc(300)
    same = objective("fim", fim_rate=0.5, fim_spm_rate=0.25)
    transformed = [d for d in range(50) if obj.fim_mode(d)]
    for d in transformed[:10]:
        assert np.array_equal(obj.document(d, tokens)[0], same.document(d, tokens)[0])
    other_seed = objective("fim", seed=4, fim_rate=0.5, fim_spm_rate=0.25)
    assert [obj.fim_mode(d) for d in range(200)] != [other_seed.fim_mode(d) for d in range(200)]
    assert objective("clm").extra_tokens(transformed[0]) == 0


def test_mlm_masks_80_10_10_only_real_tokens_and_labels_only_selected():
    obj = objective("mlm", mlm_probability=0.15)
    rng = np.random.default_rng(1)
    n = 200_000
    original = rng.integers(0, 256, size=n).astype(np.int32)
    original[::50] = EOS
    real = np.ones(n, bool)
    real[-1000:] = False
    original[-1000:] = PAD
    ids, labels = original.copy(), np.full(n, 7, dtype=np.int32)
    obj.transform_row(batch=5, row=2, input_ids=ids, labels=labels, real=real)
    selected = labels != IGNORE
    assert np.array_equal(labels[selected], original[selected])
    assert not selected[original == EOS].any() and not selected[~real].any()
    eligible = real & (original != EOS)
    assert abs(selected.sum() / eligible.sum() - 0.15) < 0.005
    masked = selected & (ids == MASK)
    kept = selected & (ids == original)
    randomised = selected & ~masked & ~kept
    k = selected.sum()
    assert abs(masked.sum() / k - 0.8) < 0.01
    assert abs(kept.sum() / k - (0.1 + 0.1 / 256)) < 0.01
    assert abs(randomised.sum() / k - 0.1 * 255 / 256) < 0.01
    assert (ids[randomised] < 256).all()  # random replacements are ordinary tokens, never specials
    assert np.array_equal(ids[~selected], original[~selected])
    # The same (seed, batch, row) selects the same positions; another row does not.
    again, labels2 = original.copy(), np.zeros(n, dtype=np.int32)
    obj.transform_row(batch=5, row=2, input_ids=again, labels=labels2, real=real)
    assert np.array_equal(again, ids) and np.array_equal(labels2, labels)
    other, labels3 = original.copy(), np.zeros(n, dtype=np.int32)
    obj.transform_row(batch=5, row=3, input_ids=other, labels=labels3, real=real)
    assert not np.array_equal(labels3, labels)


def test_sft_prompt_tokens_are_not_learned_but_the_response_is():
    obj = objective("sft")
    tokens = doc(12)
    out, learnable = obj.document(0, tokens, prompt_length=5)
    segs, _ = fill_rows(2, 8, iter([Piece(0, 0, 0, 12), None]).__next__)
    arrays = build_rows(segs, 8, 0, 2, lambda d, s, r: (out, learnable), obj, batch=0)
    labels = np.concatenate(arrays["labels"])[:12]
    assert (labels[:4] == IGNORE).all()  # targets 1..4 are prompt tokens
    assert labels[4:11].tolist() == tokens[5:12].tolist()  # position 4 predicts the first response token
    assert labels[11] == IGNORE
    assert obj.document(0, tokens, prompt_length=None)[1] is None
    assert objective("clm").document(0, tokens, prompt_length=5)[1] is None  # only sft masks prompts


def test_objective_names_the_missing_special_token():
    tok = {k: v for k, v in TOK.items() if k != "fim_middle_id"}
    with pytest.raises(DataError, match="ds/manifest.json: tokenizer.fim_middle_id is missing.*=fim"):
        Objective.from_config(DataConfig(objective="fim"), 0, tok, where="ds/manifest.json")
    assert Objective.from_config(DataConfig(objective="clm"), 0, tok).name == "clm"
