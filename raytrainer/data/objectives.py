"""Training objectives as transforms of documents and rows. Every random choice is a pure function of the
seed and the document id (or the global batch and row), so any rank, any world size and any restart make
the same choice.

clm  labels are the next token; a document's last token (its EOS) predicts nothing (-100).
fim  fill-in-the-middle, per document before packing, at `fim_rate`; a share `fim_spm_rate` of those in
     SPM order, the rest PSM (Bavarian et al. 2022; the SPM layout of StarCoder):
         PSM  <PRE> prefix <SUF> suffix <MID> middle <EOS>
         SPM  <PRE> <SUF> suffix <MID> prefix middle <EOS>
     The split points are uniform over the document's text (EOS excluded). A transformed document is 3
     tokens longer, which the planner accounts for. Labels are next-token labels over the transformed doc.
mlm  masked language modelling per row: `mlm_probability` of the real tokens (EOS and padding excluded)
     are selected; 80% become the mask id, 10% a random ordinary token, 10% stay. Labels are the original
     token at the selected positions (no shift), -100 elsewhere. RNG per (seed, global batch, global row).
sft  next-token labels, but a document's prompt is not learned: when the shard has the optional int32
     column `prompt_length` (P tokens of the document are prompt), positions whose target is a prompt
     token (target index < P) get -100. Documents without it (no column, or null/0) are learned whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from raytrainer.config import DataConfig
from raytrainer.data.manifest import DataError

IGNORE = -100
FIM_EXTRA_TOKENS = 3  # the three sentinels
_MASK64 = (1 << 64) - 1
# Salts keep the independent random choices about one document independent of each other.
_SALT_FIM, _SALT_SPM, _SALT_CUTS, _SALT_MLM = 1, 2, 3, 4


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def unit_hash(seed: int, key: int, salt: int) -> float:
    """A uniform number in [0, 1) determined by (seed, key, salt); cheap enough to call per document."""
    h = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ (key & _MASK64)) ^ salt)
    return (h >> 11) / float(1 << 53)


@dataclass(frozen=True)
class Objective:
    name: Literal["clm", "fim", "mlm", "sft"]
    seed: int
    eos_id: int
    pad_id: int
    fim_rate: float = 0.0
    fim_spm_rate: float = 0.0
    fim_prefix_id: int = -1
    fim_middle_id: int = -1
    fim_suffix_id: int = -1
    mlm_probability: float = 0.15
    mask_id: int = -1
    random_token_limit: int = 0  # MLM random replacements are drawn from [0, random_token_limit)

    @classmethod
    def from_config(cls, data: DataConfig, seed: int, tokenizer: dict[str, Any],
                    where: str = "manifest.json") -> Objective:
        """The objective of `data.objective` with the special ids of the dataset's tokenizer section."""

        def special(key: str) -> int:
            value = tokenizer.get(key)
            if not isinstance(value, int):
                raise DataError(f"{where}: tokenizer.{key} is missing, but data.objective={data.objective} "
                                f"needs it; prepare the dataset with a tokenizer that defines it")
            return value

        base = dict(name=data.objective, seed=seed, eos_id=special("eos_id"), pad_id=special("pad_id"))
        if data.objective == "fim":
            return cls(**base, fim_rate=data.fim_rate, fim_spm_rate=data.fim_spm_rate,
                       fim_prefix_id=special("fim_prefix_id"), fim_middle_id=special("fim_middle_id"),
                       fim_suffix_id=special("fim_suffix_id"))
        if data.objective == "mlm":
            specials = [v for k, v in tokenizer.items() if k.endswith("_id") and isinstance(v, int)]
            # Special tokens sit above the ordinary vocabulary (or at its end, like GPT-2's EOS).
            return cls(**base, mlm_probability=data.mlm_probability, mask_id=special("mask_id"),
                       random_token_limit=max(1, min(specials)))
        return cls(**base)

    # ---- per document (before packing)

    def fim_mode(self, doc_id: int) -> Literal["psm", "spm"] | None:
        if self.name != "fim" or unit_hash(self.seed, doc_id, _SALT_FIM) >= self.fim_rate:
            return None
        return "spm" if unit_hash(self.seed, doc_id, _SALT_SPM) < self.fim_spm_rate else "psm"

    def extra_tokens(self, doc_id: int) -> int:
        """How many tokens the per-document transform adds (the planner packs the transformed length)."""
        return FIM_EXTRA_TOKENS if self.fim_mode(doc_id) is not None else 0

    def document(self, doc_id: int, tokens: np.ndarray, prompt_length: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
        """(tokens as packed, learnable) for one whole document. learnable[j] False: the target of position
        j (token j + 1) is not learned; None: every target is learned."""
        mode = self.fim_mode(doc_id)
        if mode is not None:
            return self._fim(doc_id, tokens, mode), None
        if self.name == "sft" and prompt_length:
            learnable = np.arange(len(tokens)) + 1 >= prompt_length
            return tokens, learnable
        return tokens, None

    def _fim(self, doc_id: int, tokens: np.ndarray, mode: str) -> np.ndarray:
        text = tokens[:-1]  # the EOS stays last
        rng = np.random.default_rng([self.seed & _MASK64, doc_id & _MASK64, _SALT_CUTS])
        a, b = np.sort(rng.integers(0, len(text) + 1, size=2))
        prefix, middle, suffix = text[:a], text[a:b], text[b:]
        pre, mid, suf = (np.array([t], dtype=tokens.dtype)
                         for t in (self.fim_prefix_id, self.fim_middle_id, self.fim_suffix_id))
        eos = tokens[-1:]
        if mode == "psm":
            return np.concatenate([pre, prefix, suf, suffix, mid, middle, eos])
        return np.concatenate([pre, suf, suffix, mid, prefix, middle, eos])

    # ---- per row (after packing)

    def transform_row(self, batch: int, row: int, input_ids: np.ndarray, labels: np.ndarray,
                      real: np.ndarray) -> None:
        """In place. `row` is the row's index in the global batch; `real` marks non-padding positions."""
        if self.name != "mlm":
            return
        # Validation batches are numbered -1, -2, ...: two's complement keeps them apart from training's.
        rng = np.random.default_rng([self.seed & _MASK64, batch & _MASK64, row, _SALT_MLM])
        n = len(input_ids)
        selected = (rng.random(n) < self.mlm_probability) & real & (input_ids != self.eos_id)
        how = rng.random(n)
        random_ids = rng.integers(0, self.random_token_limit, size=n)
        labels[:] = np.where(selected, input_ids.astype(labels.dtype), IGNORE)  # ids may travel unsigned
        input_ids[:] = np.where(selected & (how < 0.8), self.mask_id,
                                np.where(selected & (how >= 0.8) & (how < 0.9), random_ids, input_ids))
