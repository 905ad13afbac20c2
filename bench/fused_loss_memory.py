"""Peak memory of the output layer + loss, forward and backward: materialised logits vs the chunked loss
(model.loss.chunk_tokens), at a large vocabulary and a long row, on the CPU.

Each variant runs in a fresh process: the hidden states [tokens, d_model] and lm_head's weight [vocab,
d_model] are made first, then the process's resident memory is read, the loss is computed and
back-propagated, and the peak resident memory is read again. Reported: the peak above the inputs, with and
without the weight's gradient (a result both paths must hold, as large as the weight), and the seconds taken.

    .venv/bin/python bench/fused_loss_memory.py [--vocab 128256] [--tokens 4096] [--d-model 2048] [--chunk 1024]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(variant: str, vocab: int, tokens: int, d_model: int, chunk: int) -> dict:
    import torch

    from raytrainer.model.fused_loss import chunked_loss_sums
    from raytrainer.model.loss import token_loss_sums

    torch.manual_seed(0)
    torch.set_num_threads(2)
    hidden = (0.02 * torch.randn(tokens, d_model)).requires_grad_()
    weight = (0.02 * torch.randn(vocab, d_model)).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,))
    before = rss_mb()
    t0 = time.perf_counter()
    if variant == "naive":
        loss = token_loss_sums(hidden @ weight.t(), labels).objective
    else:
        loss = chunked_loss_sums(hidden, weight, labels, chunk_tokens=chunk)[0].objective
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    grad_mb = weight.grad.numel() * weight.grad.element_size() / 2**20
    return {"variant": variant, "loss": float(loss), "peak_above_inputs_mb": round(peak - before),
            "transient_mb": round(peak - before - grad_mb), "weight_grad_mb": round(grad_mb),
            "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--variant", choices=("naive", "chunked"), help=argparse.SUPPRESS)  # one measurement
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.vocab, args.tokens, args.d_model, args.chunk)))
        return
    shape = ["--vocab", str(args.vocab), "--tokens", str(args.tokens), "--d-model", str(args.d_model), "--chunk",
             str(args.chunk)]
    rows = {}
    for variant in ("naive", "chunked"):
        done = subprocess.run([sys.executable, __file__, *shape, "--variant", variant], capture_output=True,
                              text=True, check=True)
        rows[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        print(rows[variant], flush=True)
    naive, chunked = rows["naive"], rows["chunked"]
    result = {"vocab": args.vocab, "tokens": args.tokens, "d_model": args.d_model, "chunk": args.chunk, **rows,
              "peak_ratio": round(naive["peak_above_inputs_mb"] / max(chunked["peak_above_inputs_mb"], 1), 2),
              "transient_ratio": round(naive["transient_mb"] / max(chunked["transient_mb"], 1), 2),
              "same_loss": abs(naive["loss"] - chunked["loss"]) <= 1e-3 * abs(naive["loss"])}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fused_loss_memory.json").write_text(json.dumps(result, indent=2))
    print(f"fused_loss_memory: peak above the inputs {naive['peak_above_inputs_mb']} vs "
          f"{chunked['peak_above_inputs_mb']} MB ({result['peak_ratio']}x); without the weight's gradient "
          f"{naive['transient_mb']} vs {chunked['transient_mb']} MB ({result['transient_ratio']}x); "
          f"{naive['seconds']} vs {chunked['seconds']} s")


if __name__ == "__main__":
    main()
