"""Importance as a markdown table and a PNG: per layer (block influence, loss increase, kept) and per head."""

from __future__ import annotations

from pathlib import Path


def importance_table(scores: dict, record: dict) -> str:
    """One row per layer: depth scores, kept or dropped, mean neuron score, head scores (kept heads starred)."""
    kept = set(record["kept_layers"])
    heads_kept = record.get("kept_heads") or {}
    loss = scores.get("loss_increase")
    lines = [
        "| layer | block influence | loss increase | kept | mean neuron score | head scores (* = kept) |",
        "|---:|---:|---:|:---:|---:|---|",
    ]
    for i, bi in enumerate(scores["block_influence"]):
        neurons = scores["neurons"][i]
        kept_heads = heads_kept.get(i, heads_kept.get(str(i)))
        heads = " ".join(
            f"{s:.3g}{'*' if i in kept and (kept_heads is None or h in kept_heads) else ''}"
            for h, s in enumerate(scores["heads"][i])
        )
        li = f"{loss[i]:.4f}" if loss else "-"
        lines.append(
            f"| {i} | {bi:.4f} | {li} | {'yes' if i in kept else 'no'} | {sum(neurons) / len(neurons):.4g} | {heads} |"
        )
    return "\n".join(lines)


def prune_markdown(scores: dict, record: dict) -> str:
    """The pruning report: what was cut, parameters and calibration loss, and the importance table."""
    return (
        f"# {record['method']} pruning ({record['selection']}, {record['family']})\n\n"
        f"parameters {record['params_before']:,} -> {record['params_after']:,} ({record['ratio']:.1%}); "
        f"calibration loss {record['calibration_loss_before']:.4f} -> {record['calibration_loss_after']:.4f}\n\n"
        f"shape {record['teacher_shape']} -> {record['student_shape']}\n\n"
        f"{importance_table(scores, record)}\n"
    )


def plot_importance(scores: dict, record: dict, out: Path) -> Path:
    """Layer scores (kept layers dark), per-head scores as a heatmap, hidden channels sorted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = set(record["kept_layers"])
    bi = scores["block_influence"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colors = ["tab:blue" if i in kept else "lightgray" for i in range(len(bi))]
    axes[0].bar(range(len(bi)), bi, color=colors)
    axes[0].set(title="block influence per layer (gray = dropped)", xlabel="layer", ylabel="1 - cos(in, out)")
    if scores.get("loss_increase"):
        ax2 = axes[0].twinx()
        ax2.plot(range(len(bi)), scores["loss_increase"], "o-", color="tab:red")
        ax2.set_ylabel("loss increase when skipped", color="tab:red")
    im = axes[1].imshow(scores["heads"], aspect="auto", cmap="viridis")
    axes[1].set(title="attention head importance", xlabel="head", ylabel="layer")
    fig.colorbar(im, ax=axes[1])
    axes[2].plot(sorted(scores["channels"], reverse=True))
    axes[2].axvline(record["student_shape"]["hidden_size"] - 0.5, color="tab:red", linestyle="--")
    axes[2].set(title="hidden channel importance, sorted (red = cut)", xlabel="rank", ylabel="score")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
