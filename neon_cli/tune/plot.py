"""``neon tune-w --plot``: the paper's Figure 4 panels (the metric, precision and recall against w
at the chosen gamma, with the base at its default and at its best settings) above the search
itself (metric against w per snapshot; for (w, gamma), the evaluated points and the last fit).
Needs matplotlib (optional extra ``plot``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from neon_cli.tune.common import _rkey

#: Metrics drawn in the Figure 4 row besides the optimised one, when the family reports them.
FIGURE4_METRICS = ("fid", "precision", "recall")


def plot_search(path: str | os.PathLike[str], results: Mapping[str, Any]) -> Path:
    """Draw ``results`` (:func:`neon_cli.tune.run_tune_w`'s ``report.results``) as a PNG written
    atomically at ``path``; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from neon_cli.fsutil import atomic_path

    metric = results["metric"]
    names = list(dict.fromkeys([metric] + [m for m in FIGURE4_METRICS if m in results["chosen"]["metrics"]]))
    quad = results["mode"] == "quadratic"
    ncol = max(len(names), 2 if quad else 1)
    fig, axes = plt.subplots(2, ncol, figsize=(4.2 * ncol, 7.6), squeeze=False)
    for k, name in enumerate(names):
        _figure4_panel(axes[0][k], results, name)
    for ax in axes[0][len(names):]:
        ax.axis("off")
    _search_panel(fig, axes[1][0], results, quad)
    if quad:
        _surface_panel(fig, axes[1][1], results)
    for ax in axes[1][2 if quad else 1:]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def _at_chosen_gamma(results: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(Neon rows of the chosen snapshot at the chosen gamma, base rows at that gamma), search seeds."""
    ch, seed = results["chosen"], results["seed"]
    g = _rkey(ch["gamma"]) if ch.get("gamma") is not None else None
    rows = [e for e in results["evaluations"] if e["seed"] == seed and (g is None or _rkey(e["gamma"]) == g)]
    neon = sorted((e for e in rows if e["snapshot"] == ch["path"]), key=lambda e: e["w"])
    return neon, [e for e in rows if e.get("model") == "base"]


def _figure4_panel(ax: Any, results: Mapping[str, Any], name: str) -> None:
    """``name`` against w at the chosen gamma (Figure 4 of the paper), w = 0 being the base."""
    neon, base = _at_chosen_gamma(results)
    pts = [(0.0, base[0]["metrics"][name])] if base else []
    pts += [(e["w"], e["metrics"][name]) for e in neon if name in e["metrics"]]
    pts.sort()
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=4, lw=1.2, color="tab:blue", label="neon (w = 0: base)")
    ch = results["chosen"]
    ax.axvline(ch["w"], color="r", lw=0.8, ls=":", label=f"chosen w = {ch['w']:.3g}")
    best = (results.get("baselines") or {}).get("best")
    if best is not None and name in best["metrics"]:
        ax.axhline(best["metrics"][name], color="k", lw=0.8, ls="--", label=f"base at its best gamma {best['gamma']:.3g}")
    g = f" at gamma = {ch['gamma']:.3g}" if ch.get("gamma") is not None else ""
    ax.set_title(f"{name} vs w{g}")
    ax.set_xlabel("w")
    ax.set_ylabel(name)
    ax.legend(fontsize=7)


def _search_panel(fig: Any, ax: Any, results: Mapping[str, Any], quad: bool) -> None:
    """The searched metric against w, per snapshot (coloured by gamma for a (w, gamma) search)."""
    metric = results["metric"]
    evals = [e for e in results["evaluations"] if e["snapshot"] is not None and e["seed"] == results["seed"]
             and e["phase"] != "plot"]
    sc = None
    for k, snap in enumerate(dict.fromkeys(e["snapshot"] for e in evals)):
        own = [e for e in evals if e["snapshot"] == snap]
        if quad:
            sc = ax.scatter([e["w"] for e in own], [e["value"] for e in own], c=[e["gamma"] for e in own], cmap="coolwarm",
                            marker="osD^v<>"[k % 7], s=28, label=Path(snap).name)
        else:
            pts = sorted((e["w"], e["value"]) for e in own)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=4, lw=1, label=Path(snap).name)
    if sc is not None:
        fig.colorbar(sc, ax=ax, label="gamma")
    ch = results["chosen"]
    ax.plot([ch["w"]], [ch["value"]], "r*", ms=14, label=f"chosen w={ch['w']:.3g}")
    ax.set_xlabel("w")
    ax.set_ylabel(metric)
    ax.set_title(f"search: {metric} vs w (same seeds for every candidate)")
    ax.legend(fontsize=7)


def _surface_panel(fig: Any, ax: Any, results: Mapping[str, Any]) -> None:
    """The (w, gamma) plane: evaluated points, fit boxes and the last fit's contours."""
    ch, metric = results["chosen"], results["metric"]
    snap = next(s for s in results["snapshots"] if s["index"] == ch["snapshot"])
    fitted = [r for r in snap.get("rounds", []) if r.get("coefficients")]
    if fitted:  # the last fit, drawn over its box (it says nothing outside)
        last = fitted[-1]
        c = last["coefficients"]
        (w0, w1), (g0, g1) = last["box"]["w"], last["box"]["gamma"]
        W, G = np.meshgrid(np.linspace(w0, w1, 120), np.linspace(g0, g1, 120))
        S = np.log(G) if last.get("gamma_scale") == "log" else G  # the fit's second variable
        Z = c["a"] + c["b"] * W + c["c"] * S + c["d"] * W**2 + c["e"] * S**2 + c["h"] * W * S
        cs = ax.contourf(W, G, Z, levels=20, cmap="viridis")
        fig.colorbar(cs, ax=ax, label=f"fitted {metric} ({last['kind']} {last['round']})")
    for r in snap.get("rounds", []):  # design boxes dashed, refinement trust regions dotted
        if r.get("kind") == "line":
            continue
        (w0, w1), (g0, g1) = r["box"]["w"], r["box"]["gamma"]
        ax.plot([w0, w1, w1, w0, w0], [g0, g0, g1, g1, g0], "k--" if r.get("kind") == "design" else "k:", lw=0.8)
    ax.set_xlim(*results["bounds"])
    ax.set_ylim(*results["gamma_bounds"])
    own = [e for e in results["evaluations"] if e["snapshot"] == ch["path"] and e["seed"] == results["seed"]
           and e["phase"] != "plot"]
    ax.scatter([e["w"] for e in own], [e["gamma"] for e in own], c="white", edgecolors="k", s=30, label="evaluated")
    ax.plot([ch["w"]], [ch["gamma"]], "r*", ms=14, label="chosen")
    ax.set_xlabel("w")
    ax.set_ylabel("gamma")
    if results.get("gamma_scale") == "log":  # the fit's coordinates; plain tick labels, not 2x10^0
        from matplotlib.ticker import ScalarFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_title("(w, gamma) search")
    ax.legend(fontsize=7)
