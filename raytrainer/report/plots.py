"""A run's curves as PNG bytes (matplotlib, no display needed): loss with validation, skipped updates and
rollbacks marked; learning rate; grad norm; throughput and MFU. `compare_*` overlays several runs."""

from __future__ import annotations

import io
import math

from raytrainer.metrics import RunHistory

FIGSIZE = (9, 4)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files, never a window
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)  # a fixed size: plots of two runs line up pixel for pixel
    _pyplot().close(fig)
    return buffer.getvalue()


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, int | float) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def loss_plot(history: RunHistory, title: str = "loss") -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    if history.abandoned:
        xs, ys = _series(history.abandoned, "loss")
        ax.scatter(xs, ys, s=4, color="0.75", label="abandoned (rolled back / replayed)", zorder=1)
    xs, ys = _series(history.steps, "loss")
    ax.plot(xs, ys, color="tab:blue", linewidth=1.2, label="train loss", zorder=2)
    vx, vy = _series(history.evals, "val_loss")
    if vx:
        ax.plot(vx, vy, "o-", color="tab:orange", markersize=4, label="validation loss", zorder=3)
    skipped = [r for r in history.steps + history.abandoned if r.get("action") == "skip"]
    if skipped:
        top = max(ys) if ys else 1.0
        ax.scatter([r["step"] for r in skipped], [min(r["loss"], top) if isinstance(r.get("loss"), float)
                                                 and math.isfinite(r["loss"]) else top for r in skipped],
                   marker="x", color="tab:red", s=40, label="skipped update", zorder=4)
    for i, rb in enumerate(history.of_kind("rollback")):
        ax.axvline(rb["step"], color="tab:red", linestyle="--", linewidth=1,
                   label="rollback" if i == 0 else None, zorder=0)
        ax.annotate(f"→ {rb['to']}", (rb["step"], 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", color="tab:red", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _png(fig)


def line_plot(history: RunHistory, key: str, ylabel: str, log_y: bool = False, scale: float = 1.0) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    xs, ys = _series(history.steps, key)
    ax.plot(xs, [y * scale for y in ys], color="tab:blue", linewidth=1.2)
    if log_y and ys and min(ys) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return _png(fig)


def throughput_plot(history: RunHistory) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    xs, ys = _series(history.steps, "tokens_per_s")
    ax.plot(xs, ys, color="tab:green", linewidth=1, label="tokens/s")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens/s")
    ax.grid(alpha=0.3)
    mx, my = _series(history.steps, "mfu")
    if mx:
        twin = ax.twinx()
        twin.plot(mx, [100 * v for v in my], color="tab:purple", linewidth=1, alpha=0.7, label="MFU")
        twin.set_ylabel("MFU (%)")
        lines = ax.get_lines() + twin.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], loc="lower right", fontsize=8)
    return _png(fig)


def run_plots(history: RunHistory) -> dict[str, bytes]:
    return {
        "loss.png": loss_plot(history),
        "lr.png": line_plot(history, "lr", "learning rate"),
        "grad_norm.png": line_plot(history, "grad_norm", "grad norm (before clipping)", log_y=True),
        "throughput.png": throughput_plot(history),
    }


def compare_plots(histories: dict[str, RunHistory]) -> dict[str, bytes]:
    plt = _pyplot()
    out = {}
    for name, key, ylabel in (("loss.png", "loss", "train loss"), ("lr.png", "lr", "learning rate"),
                              ("throughput.png", "tokens_per_s", "tokens/s")):
        fig, ax = plt.subplots(figsize=FIGSIZE)
        for i, (run, history) in enumerate(histories.items()):
            color = f"C{i}"
            xs, ys = _series(history.steps, key)
            ax.plot(xs, ys, color=color, linewidth=1.2, label=f"{run}")
            if key == "loss":
                vx, vy = _series(history.evals, "val_loss")
                if vx:
                    ax.plot(vx, vy, "o--", color=color, markersize=4, label=f"{run} (validation)")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        out[name] = _png(fig)
    return out
