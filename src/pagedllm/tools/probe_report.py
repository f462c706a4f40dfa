"""What `pagedllm inspect` shows: probe tables for the terminal, and plots (matplotlib) on disk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .inspect import AttentionProbe, Comparison, Inspection, ProbeError

Decode = Callable[[int], str]  # token id → its text


def parse_layers(text: str) -> list[int]:
    """`0,3,5-7` → [0, 3, 5, 6, 7]."""
    layers: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            layers += list(range(int(first), int(last) + 1)) if dash else [int(first)]
        except ValueError:
            raise ProbeError(f"--layers {text!r}: expected layer numbers and ranges such as 0,3,5-7") from None
    return layers


def format_inspection(inspection: Inspection, decode: Decode) -> str:
    """One row per layer (the last position's readings), then each attention probe."""
    lines = [f"{len(inspection.token_ids)} tokens: " + " ".join(repr(decode(t)) for t in inspection.token_ids), "",
             f"{'layer':>5}  {'cos dist':>9}  {'resid norm':>10}  logit lens at the last position (logprob)"]
    for probe in inspection.layers:
        lens = ", ".join(f"{decode(t)!r} {lp:.2f}" for t, lp in probe.top_k[-1])
        lines.append(f"{probe.layer:>5}  {probe.cos_distance[-1]:>9.4f}  {probe.residual_norm[-1]:>10.3f}  {lens}")
    for probe in inspection.attention:
        lines += ["", _format_attention(probe, inspection.token_ids, decode)]
    return "\n".join(lines)


def _format_attention(probe: AttentionProbe, token_ids: list[int], decode: Decode) -> str:
    lines = [f"attention, layer {probe.layer}"]
    for head, rows in zip(probe.heads, probe.weights):
        lines.append(f"  head {head}")
        for query, row in zip(probe.queries, rows):
            cells = " ".join(f"{w:.3f}" for w in row)
            lines.append(f"    {query:>4} {decode(token_ids[query])!r:<14} {cells}")
    keys = " ".join(str(k) for k in probe.keys)
    lines.append(f"  (columns: key tokens {keys})")
    return "\n".join(lines)


def format_comparison(diff: Comparison, reference: str) -> str:
    lines = [f"numerics diff against {reference} over {len(diff.token_ids)} tokens", "",
             f"{'layer':>5}  {'rel error':>10}  {'max abs':>10}  {'min cos':>9}"]
    lines += [f"{d.layer:>5}  {d.relative_error:>10.3e}  {d.max_abs_error:>10.3e}  {d.min_cosine:>9.6f}"
              for d in diff.layers]
    lines += ["", f"logits: max abs error {diff.logits_max_abs_error:.3e}, KL(reference ‖ model) "
                  f"{diff.kl_divergence:.3e}, same top-1 token at {diff.top1_agreement:.0%} of positions"]
    return "\n".join(lines)


def write_plots(inspection: Inspection, decode: Decode, folder: Path,
                diff: Comparison | None = None) -> list[Path]:
    """layers.png (cosine distance and residual norm per layer, the diff's error when given) and a heatmap
    per attention probe and head. Returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ProbeError("--plot needs matplotlib: pip install 'pagedllm[plot]'") from None
    folder.mkdir(parents=True, exist_ok=True)
    written = [_plot_layers(plt, inspection, folder / "layers.png", diff)]
    for probe in inspection.attention:
        for h, head in enumerate(probe.heads):
            written.append(_plot_attention(plt, probe, h, inspection.token_ids, decode,
                                           folder / f"attention-L{probe.layer}-H{head}.png"))
    return written


def _plot_layers(plt, inspection: Inspection, path: Path, diff: Comparison | None) -> Path:
    layers = [p.layer for p in inspection.layers]
    rows = 3 if diff else 2
    fig, axes = plt.subplots(rows, 1, figsize=(7, 2.6 * rows), sharex=True)
    axes[0].plot(layers, [p.cos_distance[-1] for p in inspection.layers], marker="o")
    axes[0].set_ylabel("cosine distance\nin → out")
    axes[1].plot(layers, [p.residual_norm[-1] for p in inspection.layers], marker="o", color="tab:orange")
    axes[1].set_ylabel("residual norm")
    if diff:
        axes[2].semilogy([d.layer for d in diff.layers], [max(d.relative_error, 1e-12) for d in diff.layers],
                         marker="o", color="tab:red")
        axes[2].set_ylabel("relative error vs\nreference (all positions)")
    axes[-1].set_xlabel("layer (last prompt position)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_attention(plt, probe: AttentionProbe, h: int, token_ids: list[int], decode: Decode, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(1 + 0.4 * len(probe.keys), 1 + 0.4 * len(probe.queries)))
    image = ax.imshow(probe.weights[h], cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(probe.keys)), [decode(token_ids[k]) for k in probe.keys], rotation=90)
    ax.set_yticks(range(len(probe.queries)), [decode(token_ids[q]) for q in probe.queries])
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(f"layer {probe.layer}, head {probe.heads[h]}")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
