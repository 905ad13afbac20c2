"""Configuration: presets load, bad input names the key and the value, overrides work."""

import pytest

from raytrainer.config import ConfigError, load_config


@pytest.mark.parametrize("preset", ["tiny", "moe-tiny", "gpt2-124m", "llama-1b", "llama-8b"])
def test_presets_load(preset):
    cfg = load_config(preset)
    assert cfg.run.name == preset


def test_llama_8b_is_the_published_shape():
    m = load_config("llama-8b").model
    assert (m.d_model, m.n_layers, m.n_heads, m.kv_heads, m.hidden_dim, m.vocab_size) == (
        4096, 32, 32, 8, 14336, 128256)


def test_overrides_are_typed():
    cfg = load_config("tiny", ["optim.lr=1e-3", "model.n_layers=2", "optim.betas=[0.9, 0.99]",
                               "model.logit_softcap=30", "checkpoint.every_steps=null"])
    assert cfg.optim.lr == 1e-3 and cfg.model.n_layers == 2 and cfg.optim.betas == (0.9, 0.99)
    assert cfg.model.logit_softcap == 30 and cfg.checkpoint.every_steps is None


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lrr=1", "optim.lrr: unknown key"),
        ("train.steps=abc", "train.steps = 'abc'"),
        ("model.n_heads=7", "model.n_heads=7 must divide model.d_model=256"),
        ("model.n_kv_heads=3", "model.n_kv_heads=3 must divide model.n_heads=8"),
        ("train.global_batch_tokens=1000", "train.global_batch_tokens=1000 must be a multiple"),
        ("parallel.max_workers=64", "smaller than parallel.max_workers=64"),
        ("parallel.min_workers=3", "parallel.min_workers=3 exceeds parallel.max_workers=2"),
        ("train.seq_len=4096", "exceeds model.max_seq_len=512"),
        ("optim.lr=-1", "optim.lr = -1"),
        ("precision.dtype=fp12", "precision.dtype = 'fp12'"),
    ],
)
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert expected in str(err.value)
    assert "tiny.yaml" in str(err.value)


def test_missing_file_lists_presets(tmp_path):
    with pytest.raises(ConfigError, match="not found.*presets.*tiny"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_override_without_equals():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config("tiny", ["optim.lr"])


def test_accumulation_follows_world_size():
    cfg = load_config("tiny")  # 8192 tokens / 256 = 32 rows, micro batch 8
    assert cfg.rows_per_global_batch(0) == 32
    assert cfg.accumulation_steps(0, 1) == 4
    assert cfg.accumulation_steps(0, 2) == 2
    assert cfg.accumulation_steps(0, 3) == 2  # 11 rows per rank -> 2 micro-steps, the last padded


def test_curriculum_phases_change_seq_len():
    cfg = load_config("tiny", ["data.phases=[{start_step: 0, seq_len: 128}, {start_step: 50, seq_len: 256}]"])
    assert cfg.seq_len_at(0) == 128 and cfg.seq_len_at(49) == 128 and cfg.seq_len_at(50) == 256
    assert cfg.rows_per_global_batch(0) == 64 and cfg.rows_per_global_batch(50) == 32


def test_phases_must_start_at_zero():
    with pytest.raises(ConfigError, match="phases\\[0\\].start_step must be 0"):
        load_config("tiny", ["data.phases=[{start_step: 5}]"])
