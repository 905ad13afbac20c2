"""Generation: the KV cache gives the logits of a full recomputation, left-padded batches give each prompt's
own tokens, greedy decoding and beam search pick what Hugging Face's generate picks on the same weights, and
the filters (top-k, top-p, min-p, repetition penalty) do what they say."""

from __future__ import annotations

import json

import pytest
import torch

from raytrainer.config import load_config
from raytrainer.export import write_safetensors
from raytrainer.hf.architecture import hf_config, hf_state_dict
from raytrainer.model import Transformer
from raytrainer.model.kv_cache import KVCache
from raytrainer.sampling import Sampling, filter_logits, penalise_repetition, sample
from runs import MICRO_MODEL

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model():
    # The tiny preset's QK-norm model, micro sized. Untied: a random tied model only repeats its last token.
    cfg = load_config("tiny", [*MICRO_MODEL, "model.tie_embeddings=false"]).model
    torch.manual_seed(3)
    m = Transformer(cfg).eval()
    with torch.no_grad():  # a random model's logits are nearly flat; sharpen them so choices are clear-cut
        m.lm_head.weight.mul_(3)
    return m


def hf_twin(model, out):
    """Hugging Face's model of the same weights, through the export's own names and config."""
    write_safetensors(hf_state_dict(model.state_dict(), model.cfg.tie_embeddings), out, 1 << 30)
    (out / "config.json").write_text(json.dumps(hf_config(model.cfg)))
    return transformers.AutoModelForCausalLM.from_pretrained(out).eval()


@pytest.fixture(scope="module")
def hf_model(model, tmp_path_factory):
    return hf_twin(model, tmp_path_factory.mktemp("hf"))


PROMPTS = [[5, 17, 99, 3, 250, 8], [42, 7]]
VARIANTS = {  # the tiny preset as shipped (QK-norm, tied), and plain Llama-style models tied and untied
    "tiny-as-shipped": [],
    "llama-untied": ["model.qk_norm=false", "model.tie_embeddings=false", *MICRO_MODEL],
    "llama-tied": ["model.qk_norm=false", *MICRO_MODEL],
}


def test_the_cache_gives_the_logits_of_a_full_recomputation_in_chunks_and_padded(model):
    x = torch.randint(0, 256, (2, 14))
    with torch.no_grad():
        full = model(x).logits
        cache = KVCache(model.cfg, 2, 20)
        parts = [model(x[:, a:b], cache=cache).logits for a, b in ((0, 6), (6, 7), (7, 14))]
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
        # The short row left-padded beside a long one: its last logits are the ones it has alone.
        padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), x[1:, :9]], 1)
        pair = torch.cat([x[:1], padded])
        valid = torch.ones(2, 14, dtype=torch.bool)
        valid[1, :5] = False
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        cache = KVCache(model.cfg, 2, 14)
        both = model(pair, position_ids=positions, cache=cache, valid=valid).logits
        torch.testing.assert_close(both[1, -1], model(x[1:, :9]).logits[0, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_decoding_and_logits_match_hugging_face(variant, tmp_path):
    cfg = load_config("tiny", VARIANTS[variant]).model
    torch.manual_seed(5)
    ours = Transformer(cfg).eval()
    theirs = hf_twin(ours, tmp_path)
    prompts = [[5, 17, 99, 3, 250, 8], [42, 7], [200, 100, 50, 25, 12, 6, 3, 1]]
    x = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x).logits, rtol=1e-4, atol=1e-4)
    mine = sample(ours, prompts, Sampling(max_new_tokens=48, temperature=0), eos_id=None, pad_id=0)
    for prompt, tokens in zip(prompts, mine, strict=True):
        expected = theirs.generate(torch.tensor([prompt]), max_new_tokens=48, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)[0, len(prompt):].tolist()
        assert tokens == expected


def test_beam_search_picks_what_hugging_face_picks(model, hf_model):
    s = Sampling(max_new_tokens=12, num_beams=3)
    ours = sample(model, PROMPTS[:1], s, eos_id=None, pad_id=0)[0]
    theirs = hf_model.generate(torch.tensor(PROMPTS[:1]), max_new_tokens=12, num_beams=3, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(PROMPTS[0]):].tolist()
    assert ours == theirs
    greedy = sample(model, PROMPTS[:1], Sampling(max_new_tokens=12, temperature=0), eos_id=None, pad_id=0)[0]

    def logprob(tokens):
        ids = torch.tensor([PROMPTS[0] + tokens])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        return sum(logp[len(PROMPTS[0]) - 1 + i, t].item() for i, t in enumerate(tokens))

    assert ours != greedy and logprob(ours) > logprob(greedy)  # here the beams found a likelier continuation


def test_a_batch_of_prompts_gives_each_prompt_its_own_tokens_and_stops_a_row_at_eos(model):
    s = Sampling(max_new_tokens=10, temperature=0)
    alone = [sample(model, [p], s, eos_id=None, pad_id=0)[0] for p in PROMPTS]
    assert sample(model, PROMPTS, s, eos_id=None, pad_id=0) == alone
    eos = alone[1][2]  # the short prompt's third new token, made its EOS
    stopped = sample(model, PROMPTS, s, eos_id=eos, pad_id=0)
    assert stopped[1] == alone[1][:alone[1].index(eos) + 1]
    assert stopped[0] == alone[0][:alone[0].index(eos) + 1] if eos in alone[0] else stopped[0] == alone[0]


def test_sampling_is_seeded_and_the_filters_narrow_to_greedy_at_their_limits(model):
    greedy = sample(model, PROMPTS, Sampling(max_new_tokens=8, temperature=0), None, 0)
    hot = Sampling(max_new_tokens=8, temperature=1.5, seed=1)
    assert sample(model, PROMPTS, hot, None, 0) == sample(model, PROMPTS, hot, None, 0)
    assert sample(model, PROMPTS, hot, None, 0) != greedy
    for narrow in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        assert sample(model, PROMPTS, Sampling(max_new_tokens=8, temperature=1.5, seed=1, **narrow), None, 0) == greedy


def test_the_filters_and_the_repetition_penalty_on_known_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = torch.softmax(logits, -1)[0]
    kept = lambda s: torch.isfinite(filter_logits(logits, s))[0].tolist()  # noqa: E731
    assert kept(Sampling(temperature=1, top_k=2)) == [True, True, False, False]
    assert kept(Sampling(temperature=1, top_p=float(probs[0]) + 0.01)) == [True, True, False, False]
    assert kept(Sampling(temperature=1, min_p=float(probs[2] / probs[0]) + 1e-3)) == [True, True, False, False]
    seen = torch.tensor([[True, False, False, True]])
    assert penalise_repetition(logits, seen, 2.0).tolist() == [[1.0, 1.0, 0.0, -2.0]]


def test_generation_stops_at_the_models_context_and_bad_settings_are_named(model):
    long_prompt = list(range(1, model.cfg.max_seq_len - 3))
    assert len(sample(model, [long_prompt], Sampling(max_new_tokens=50, temperature=0), None, 0)[0]) == 4
    with pytest.raises(ValueError, match="top_p must be in"):
        Sampling(top_p=1.5)
