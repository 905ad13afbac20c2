"""Per-document blame: which documents of a spiking batch carry its loss.

When a loss spike reproduces on the rerun (the data or the model, not the hardware), every rank splits the
rerun's token losses of its rows by document (the batch's packing segments say which tokens are whose),
rank 0 unites them (`merge`), and the guardian asks `culprits`: the fewest documents without which the
batch would not be a spike (the rest within guardian.spike_min_rise of the baseline), each one itself above
that, no more than `blame_max_docs` of them holding no more than `blame_max_tokens` of the batch's tokens.
Found: the cause is in the data and known, so those documents are blacklisted (never drawn again) and the
step is skipped without counting towards a rollback. None found (the excess is spread over the batch): the
model's state is the likelier cause, and the anomaly counts as any other.

    mine = document_losses(token_ce, labels, doc_ids, input_ids, plan.segments, first_row, shard_paths)
    everyone = merge(gather(mine))                 # rank 0
    blamed = culprits(everyone, baseline, max_docs=8, max_tokens=0.75, min_rise=0.6)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from raytrainer.data.packing import DOC, ROW, SHARD, SHARD_ROW, START

IGNORE_INDEX = -100
TEXT_TOKENS = 48  # tokens of a document decoded to name it in the events log
TEXT_CHARS = 80


@dataclass
class DocumentLoss:
    """One document's share of a batch: its summed token loss over its label tokens in the batch."""

    doc: int
    shard: str
    shard_row: int
    ce_sum: float
    tokens: int
    start: int  # the first token of it the batch holds (0: its beginning)
    prefix: tuple[int, ...] = ()  # its first input tokens in the batch (decoded into `text` on rank 0)
    text: str | None = None

    @property
    def mean(self) -> float:
        return self.ce_sum / max(self.tokens, 1)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("prefix")
        out["mean_loss"] = self.mean
        return out


def document_losses(token_ce: np.ndarray, labels: np.ndarray, doc_ids: np.ndarray, input_ids: np.ndarray,
                    segments: np.ndarray, first_row: int, shard_paths: Sequence[str]) -> list[DocumentLoss]:
    """This rank's rows [first_row, first_row + len(token_ce)) of a global batch, by document.

    token_ce, labels, doc_ids, input_ids: [rows, T] (token_ce 0 where labels are ignored); doc_ids number
    the segments of each row 0, 1, ... in the order the batch's `segments` list them."""
    order = np.argsort(segments[:, ROW], kind="stable")
    segments = segments[order]
    bounds = np.searchsorted(segments[:, ROW], [first_row, first_row + len(token_ce)])
    out: dict[int, DocumentLoss] = {}
    row, k = -1, 0
    for seg in segments[bounds[0]:bounds[1]]:
        r = int(seg[ROW])
        k = k + 1 if r == row else 0  # the k-th segment of its row
        row = r
        i = r - first_row
        piece = doc_ids[i] == k
        counted = piece & (labels[i] != IGNORE_INDEX)
        doc = int(seg[DOC])
        found = DocumentLoss(doc, shard_paths[int(seg[SHARD])] if int(seg[SHARD]) < len(shard_paths) else
                             str(int(seg[SHARD])), int(seg[SHARD_ROW]), float(token_ce[i][counted].sum()),
                             int(counted.sum()), int(seg[START]),
                             tuple(int(t) for t in input_ids[i][piece][:TEXT_TOKENS]))
        out[doc] = _united(out[doc], found) if doc in out else found
    return list(out.values())


def merge(parts: Iterable[Iterable[DocumentLoss]]) -> list[DocumentLoss]:
    """Every rank's documents as one list: a document cut across ranks' rows is counted once."""
    out: dict[int, DocumentLoss] = {}
    for part in parts:
        for d in part:
            out[d.doc] = _united(out[d.doc], d) if d.doc in out else d
    return sorted(out.values(), key=lambda d: d.doc)


def _united(a: DocumentLoss, b: DocumentLoss) -> DocumentLoss:
    first, then = (a, b) if a.start <= b.start else (b, a)
    prefix = first.prefix
    if len(prefix) < TEXT_TOKENS and then.start == first.start + len(prefix):  # the piece goes on in `then`
        prefix = (prefix + then.prefix)[:TEXT_TOKENS]
    return DocumentLoss(a.doc, a.shard, a.shard_row, a.ce_sum + b.ce_sum, a.tokens + b.tokens, first.start,
                        prefix, first.text)


def culprits(documents: Sequence[DocumentLoss], baseline: float, *, max_docs: int, max_tokens: float,
             min_rise: float) -> list[DocumentLoss]:
    """The documents without which the batch would not be a spike, worst first; [] when no few documents are.

    Documents are taken by their loss above `baseline`, most first, until the rest of the batch is within
    (1 + min_rise) x baseline; each taken must itself be above that, there may be at most `max_docs` of
    them, and they may hold at most `max_tokens` of the batch's label tokens (the rest is the evidence
    that the model is fine on everything else)."""
    limit = baseline * (1 + min_rise)
    total_ce = sum(d.ce_sum for d in documents)
    total_tokens = sum(d.tokens for d in documents)
    picked: list[DocumentLoss] = []
    ce, tokens = total_ce, total_tokens  # what is left of the batch
    for d in sorted(documents, key=lambda d: d.ce_sum - d.tokens * baseline, reverse=True):
        if tokens == 0 or ce / tokens <= limit:
            break
        if d.mean <= limit or len(picked) == max_docs:
            return []
        picked.append(d)
        ce, tokens = ce - d.ce_sum, tokens - d.tokens
    if not picked or tokens == 0 or ce / tokens > limit or total_tokens - tokens > max_tokens * total_tokens:
        return []
    return picked


def name_documents(documents: Sequence[DocumentLoss], decode: Callable[[Sequence[int]], str]) -> None:
    """Fill in each document's first characters (as the batch holds them; "..." when cut)."""
    for d in documents:
        if d.text is None and d.prefix:
            text = decode(list(d.prefix)).replace("\n", " ")[:TEXT_CHARS]
            d.text = text if d.start == 0 else "..." + text
