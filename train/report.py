"""``python -m train.report``: the results matrix as docs/results.md and a JSON of every figure.

    python -m train.report runs/matrix --out docs/results.md       # also writes docs/bench/results.json

Every number comes from the runs' ``metrics.json`` (``python -m train.matrix``): mean +/- sample
std over seeds, trainable parameters, the alpha chosen on ID validation, and the command,
machine and date from ``matrix.json``. Nothing is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from radapter.atomic import atomic_path

from .matrix import GROUPS, MATRIX_FILE, RUN_FILE

# (label, method, which point): "chosen" = alpha chosen on ID validation, "alpha1" = the fine-tuned end,
# "alpha0.5" = the papers' fixed alpha 0.5 (no choice at all).
CLASSIFICATION_ROWS = (
    ("zero-shot", "zero-shot", "chosen"),
    ("linear probe", "linear-probe", "chosen"),
    ("full FT (FLYP)", "full-ft", "alpha1"),
    ("WiSE-FT of full FT", "full-ft", "chosen"),
    ("LoRA (merged)", "lora", "chosen"),
    ("R-Adapter", "r-adapter", "chosen"),
    ("R-Adapter + DRM", "drm", "chosen"),
    ("full FT + DRM", "full-ft-drm", "alpha1"),
    ("WiSE-FT of full FT + DRM", "full-ft-drm", "chosen"),
    ("WiSE-FT of full FT, alpha 0.5", "full-ft", "alpha0.5"),
    ("R-Adapter, alpha 0.5", "r-adapter", "alpha0.5"),
    ("R-Adapter + DRM, alpha 0.5", "drm", "alpha0.5"),
    ("WiSE-FT of full FT + DRM, alpha 0.5", "full-ft-drm", "alpha0.5"),
)
RETRIEVAL_ROWS = (("zero-shot", "zero-shot"), ("R-Adapter", "r-adapter"))
B2N_ROWS = (("zero-shot", "zero-shot"), ("WiSE-FT of full FT", "full-ft"), ("R-Adapter", "r-adapter"))
TITLES = {"emoji": "Emoji categories (9 classes): ID = Google-style test, OOD = Twitter-style test",
          "emoji-backgrounds": "Emoji on backgrounds (5 classes, Waterbirds-style): ID = 95% of images on their "
                               "class's background, OOD = every image on another one (Google style; Twitter style)",
          "fmnist": "Fashion-MNIST (10 classes): ID = test, OOD = 12 ImageNet-C corruptions (severity 2 and 4)"}
COMPARISONS = (("R-Adapter", "WiSE-FT of full FT"), ("R-Adapter", "full FT (FLYP)"), ("R-Adapter", "LoRA (merged)"),
               ("R-Adapter + DRM", "R-Adapter"), ("full FT + DRM", "full FT (FLYP)"))
MAX_OOD_COLUMNS = 3  # more OOD sets than this get their own table

Runs = dict[tuple[str, str], dict[int, dict[str, Any]]]


def load_runs(root: Path) -> Runs:
    """``(group, method) -> {seed: metrics}`` for every finished run under ``root``."""
    runs: Runs = defaultdict(dict)
    for path in sorted(root.glob("*/*/seed*/metrics.json")):
        group, method, seed = path.parts[-4], path.parts[-3], path.parts[-2]
        metrics = json.loads(path.read_text())
        run_file = path.with_name(RUN_FILE)
        if run_file.is_file():
            metrics["_run"] = json.loads(run_file.read_text())
        runs[(group, method)][int(seed.removeprefix("seed"))] = metrics
    return dict(runs)


def stat(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (None with one value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values), "values": values}


FIXED_ALPHAS = {"alpha1": 1.0, "alpha0.5": 0.5}


def classification_point(metrics: dict[str, Any], which: str) -> dict[str, Any] | None:
    """Top-1 ID / per-OOD / average OOD at the chosen alpha, or at a fixed one (``alpha1``, ``alpha0.5``);
    with worst-group accuracy (``*_wg``) where the benchmark has groups."""
    part = metrics.get("results", {}).get("all")
    if not part:
        return None
    if which in FIXED_ALPHAS:
        point = next((p for p in part.get("sweep", []) if abs(p["alpha"] - FIXED_ALPHAS[which]) < 1e-9), None)
        if point is None:
            return None
    else:
        point = part["at_chosen_alpha"]
    out = {"alpha": point.get("alpha"), "id": point["id"]["top1"],
           "ood": {k: v["top1"] for k, v in point["ood"].items()}, "ood_avg": point["ood_avg"]["top1"]}
    if "worst_group" in point["id"]:
        out.update(id_wg=point["id"]["worst_group"], ood_wg={k: v["worst_group"] for k, v in point["ood"].items()},
                   ood_avg_wg=point["ood_avg"]["worst_group"])
    check = metrics.get("description_check")
    if check:
        out["description_head_val"] = check["candidates"][check["chosen"]]["top1"]
        out["default_head_val"] = check["default_head_top1"]
    return out


def retrieval_point(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """R@1 both ways, ID (Google test) and OOD (Twitter test), at the alpha chosen on Google val."""
    res = metrics.get("results", {})
    if "points" not in res:
        return None
    point = next(p for p in res["points"] if p["alpha"] == res["chosen_alpha"])
    return {"alpha": res["chosen_alpha"] if len(res["points"]) > 1 else None,
            **{f"{split}_{way}": point[split][f"{way}_r1"] for split in ("id", "ood") for way in ("t2i", "i2t")}}


def b2n_point(metrics: dict[str, Any]) -> dict[str, Any] | None:
    res = metrics.get("results", {})
    if "harmonic_mean" not in res:
        return None
    return {"alpha": res.get("chosen_alpha") if "sweep" in res["base"] else None,
            "base": res["base"]["at_chosen_alpha"]["id"]["top1"],
            "novel": res["novel"]["at_chosen_alpha"]["id"]["top1"], "hm": res["harmonic_mean"]}


def trainable(method: str, seeds: dict[int, dict[str, Any]], benchmark: str, embed_dim: int | None) -> int | None:
    """Trainable parameters: from the training summary; the linear probe's are classes x (features + 1)."""
    if method == "zero-shot":
        return 0
    if method == "linear-probe":
        if embed_dim is None:
            return None
        from radapter.data.benchmark_spec import get_spec

        return len(get_spec(benchmark).classnames) * (embed_dim + 1)
    counts = {m.get("training", {}).get("trainable_parameters") for m in seeds.values()}
    return counts.pop() if len(counts) == 1 else None


def aggregate(points: dict[int, dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    """Per-key statistics over seeds; nested dicts (per-OOD) are aggregated per entry."""
    out: dict[str, Any] = {"seeds": sorted(points), "alpha": [points[s]["alpha"] for s in sorted(points)]}
    for key in keys:
        first = points[min(points)][key]
        if isinstance(first, dict):
            out[key] = {k: stat([points[s][key][k] for s in sorted(points)]) for k in first}
        else:
            out[key] = stat([points[s][key] for s in sorted(points)])
    return out


def build_figures(runs: Runs, matrix: dict[str, Any]) -> dict[str, Any]:
    """Everything the page shows, as data (written to the JSON)."""
    embed_dim = (matrix.get("model") or {}).get("embed_dim")
    groups = {g.name: g for g in GROUPS}
    figures: dict[str, Any] = {"classification": {}, "retrieval": {}, "base_to_novel": {}, "sweeps": {},
                               "val_sweeps": {}}
    for name, group in groups.items():
        kind = ("retrieval" if "--task" in group.args else "base_to_novel" if "--base-to-novel" in group.args
                else "classification")
        rows = {"classification": CLASSIFICATION_ROWS, "retrieval": [(lbl, m, None) for lbl, m in RETRIEVAL_ROWS],
                "base_to_novel": [(lbl, m, None) for lbl, m in B2N_ROWS]}[kind]
        table = {}
        for label, method, which in rows:
            seeds = runs.get((name, method))
            if not seeds:
                continue
            if kind == "classification":
                points = {s: classification_point(m, which) for s, m in seeds.items()}
                first = next((p for p in points.values() if p), {})
                keys = [k for k in ("id", "ood", "ood_avg", "id_wg", "ood_wg", "ood_avg_wg", "description_head_val",
                                    "default_head_val") if k in first]
            elif kind == "retrieval":
                points = {s: retrieval_point(m) for s, m in seeds.items()}
                keys = ["id_t2i", "id_i2t", "ood_t2i", "ood_i2t"]
            else:
                points = {s: b2n_point(m) for s, m in seeds.items()}
                keys = ["base", "novel", "hm"]
            points = {s: p for s, p in points.items() if p is not None}
            if points:
                table[label] = {"method": method, "point": which or "chosen",
                                "trainable_parameters": trainable(method, seeds, group.benchmark, embed_dim),
                                **aggregate(points, keys)}
        if table:
            figures[kind][name] = table
        if kind == "classification":
            sweeps = {m: _mean_sweep(runs.get((name, m), {})) for m in ("r-adapter", "drm", "full-ft", "full-ft-drm")}
            sweeps = {m: s for m, s in sweeps.items() if s}
            if sweeps:
                figures["sweeps"][name] = sweeps
            val = {m: _mean_val_sweep(runs.get((name, m), {})) for m in ("r-adapter", "drm", "full-ft", "full-ft-drm")}
            val = {m: s for m, s in val.items() if s}
            if val:
                figures["val_sweeps"][name] = val
    walls = [m["_run"]["wall_s"] for seeds in runs.values() for m in seeds.values() if "_run" in m]
    figures["run_wall_s"] = stat(walls) if walls else None
    present = {g for g, _ in runs}
    figures["missing"] = [f"{g.name}/{m}" for g in GROUPS if g.name in present for m in g.methods
                          if (g.name, m) not in runs]
    return figures


def _mean_sweep(seeds: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """The test-split sweep averaged over seeds: alpha, ID and average-OOD top-1.

    Runs that tested only the chosen alpha and 1 (``--no-test-sweep``) have no sweep to show.
    """
    results = [m.get("results", {}) for m in seeds.values()]
    sweeps = [r["all"]["sweep"] for r in results
              if r.get("all", {}).get("sweep") and len(r["all"]["sweep"]) == len(r.get("alphas", []))]
    if not sweeps or len(sweeps) != len(results):
        return []
    out = []
    for pts in zip(*sweeps, strict=True):
        point = {"alpha": pts[0]["alpha"], "id": stat([p["id"]["top1"] for p in pts]),
                 "ood_avg": stat([p["ood_avg"]["top1"] for p in pts])}
        if all("worst_group" in p["id"] for p in pts):
            point["id_wg"] = stat([p["id"]["worst_group"] for p in pts])
            point["ood_avg_wg"] = stat([p["ood_avg"]["worst_group"] for p in pts])
        out.append(point)
    return out


def _mean_val_sweep(seeds: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """The ID validation sweep that chose alpha, averaged over seeds."""
    sweeps = [m["results"]["val_sweep"] for m in seeds.values() if m.get("results", {}).get("val_sweep")]
    if not sweeps or len({len(v) for v in sweeps}) != 1:
        return []
    return [{"alpha": pts[0]["alpha"], "id": stat([p["top1"] for p in pts])} for pts in zip(*sweeps, strict=True)]


# ---------------------------------------------------------------------------------------------- markdown

def pct(s: dict[str, Any] | None) -> str:
    if not s:
        return "—"
    return f"{100 * s['mean']:.1f}" + (f" ± {100 * s['std']:.1f}" if s["std"] is not None else "")


def params(n: int | None) -> str:
    if n is None:
        return "—"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def alphas(row: dict[str, Any]) -> str:
    vals = [a for a in row["alpha"] if a is not None]
    if not vals:
        return "—"
    return "/".join(f"{a:g}" for a in vals) if len(set(vals)) > 1 else f"{vals[0]:g}"


def seeds_cell(row: dict[str, Any]) -> str:
    return ",".join(str(s) for s in row["seeds"])


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


SWEEP_LABELS = {"r-adapter": "R-Adapter", "drm": "R-Adapter + DRM", "full-ft": "WiSE-FT",
                "full-ft-drm": "WiSE-FT + DRM"}


def val_sweep_lines(name: str, val: dict[str, Any]) -> list[str]:
    """The ID validation accuracy at each alpha: what chose the reported alpha."""
    n = min(len(s) for s in val.values())
    first = next(iter(val.values()))
    rows = [[f"{first[i]['alpha']:g}", *(pct(s[i]["id"]) for s in val.values())] for i in range(n)]
    return [f"ID validation top-1 (%) against alpha ({name}, mean over seeds): the curve that chose each run's "
            "alpha. Alpha 0 is the zero-shot model, alpha 1 the fine-tuned one; in between, the adapters merged "
            "at alpha (R-Adapter) or the interpolated weights (WiSE-FT).", "",
            *_table(["alpha", *(SWEEP_LABELS[m] for m in val)], rows), ""]


def alpha_cell(row: dict[str, Any]) -> str:
    return f"{FIXED_ALPHAS[row['point']]:g} (fixed)" if row["point"] in FIXED_ALPHAS and row["point"] != "alpha1" \
        else alphas(row)


def classification_section(name: str, table: dict[str, Any], sweeps: dict[str, Any],
                           val: dict[str, Any] | None = None) -> list[str]:
    oods = list(next(iter(table.values()))["ood"])
    wide = len(oods) > MAX_OOD_COLUMNS
    groups = any("id_wg" in r for r in table.values())
    drm = any("description_head_val" in r for r in table.values())
    header = ["method", "trainable params", "seeds", "alpha", "ID", *([] if wide else oods),
              f"avg OOD ({len(oods)})"]
    if groups:
        header += ["ID worst group", *([] if wide else [f"{o} worst group" for o in oods]), "avg OOD worst group"]
    if drm:
        header += ["description head / zero-shot head (ID val)"]
    rows = []
    for label, r in table.items():
        row = [label, params(r["trainable_parameters"]), seeds_cell(r), alpha_cell(r), pct(r["id"]),
               *([] if wide else [pct(r["ood"].get(o)) for o in oods]), pct(r["ood_avg"])]
        if groups:
            row += [pct(r.get("id_wg")), *([] if wide else [pct(r.get("ood_wg", {}).get(o)) for o in oods]),
                    pct(r.get("ood_avg_wg"))]
        if drm:
            row += [f"{pct(r['description_head_val'])} / {pct(r['default_head_val'])}"
                    if "description_head_val" in r else ""]
        rows.append(row)
    lines = [f"## {TITLES.get(name, name)}", "",
             "Top-1 accuracy (%), test splits, mean ± std over seeds. Alpha: chosen on ID validation, or the "
             "papers' fixed 0.5 where the row says so."
             + (" Worst group: the lowest top-1 over class x background groups (Sagawa et al. 2020) with at least "
                "the benchmark's minimum of images." if groups else "")
             + (" DRM rows: the chosen description head's top-1 on ID validation, and the zero-shot head's, before "
                "training." if drm else ""), "",
             *_table(header, rows), ""]
    if wide:
        lines += [f"Per OOD set ({name}, top-1 %):", "",
                  *_table(["OOD set", *table], [[o, *(pct(r["ood"].get(o)) for r in table.values())] for o in oods]),
                  ""]
    if sweeps:
        labels = SWEEP_LABELS
        cols = [(m, k) for m in sweeps for k in ("id", "ood_avg")]
        header = ["alpha", *(f"{labels[m]} {'ID' if k == 'id' else 'avg OOD'}" for m, k in cols)]
        n = min(len(s) for s in sweeps.values())
        rows = [[f"{sweeps[cols[0][0]][i]['alpha']:g}", *(pct(sweeps[m][i][k]) for m, k in cols)] for i in range(n)]
        lines += [f"Accuracy against alpha ({name}, test split, mean over seeds). Alpha 0 is the zero-shot model, "
                  "alpha 1 the fine-tuned one; in between is the weight-space ensemble (R-Adapter: the adapters "
                  "merged at alpha; WiSE-FT: the interpolated weights). The reported alpha is the one chosen on ID "
                  "validation, never on these numbers.", "", *_table(header, rows), ""]
    elif val:
        lines += val_sweep_lines(name, val)
    return lines


PLOT_METHODS = {"full-ft": ("WiSE-FT (full FT)", "tab:orange"), "full-ft-drm": ("WiSE-FT (full FT + DRM)", "tab:brown"),
                "r-adapter": ("R-Adapter", "tab:blue"), "drm": ("R-Adapter + DRM", "tab:green")}
SINGLE_POINTS = {"LoRA (merged)": ("LoRA", "tab:purple", "D"), "linear probe": ("linear probe", "tab:gray", "^")}


def plot_curves(name: str, sweeps: dict[str, Any], table: dict[str, Any], path: Path) -> Path | None:
    """WiSE-FT's figure: ID (x) against OOD (y), one point per alpha and a line per method, with
    the zero-shot (alpha 0) and fine-tuned (alpha 1) ends marked; a second panel for worst groups."""
    if not sweeps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("id", "ood_avg", "average")]
    if all("id_wg" in p for s in sweeps.values() for p in s):
        panels.append(("id_wg", "ood_avg_wg", "worst-group"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), dpi=110, squeeze=False)
    wg_keys = {"id": "id_wg", "ood_avg": "ood_avg_wg"}
    for ax, (xk, yk, what) in zip(axes[0], panels, strict=True):
        for method, points in sweeps.items():
            label, colour = PLOT_METHODS.get(method, (method, None))
            xs, ys = [100 * p[xk]["mean"] for p in points], [100 * p[yk]["mean"] for p in points]
            ax.plot(xs, ys, "o-", color=colour, label=label, markersize=4)
            ax.plot(xs[-1], ys[-1], "s", color=colour, markersize=8)
            for p, x, y in zip(points, xs, ys, strict=True):
                ax.annotate(f"{p['alpha']:g}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7,
                            color=colour)
        first = next(iter(sweeps.values()))[0]
        ax.plot(100 * first[xk]["mean"], 100 * first[yk]["mean"], "*", color="black", markersize=13,
                label="zero-shot (alpha 0)")
        for row_label, (label, colour, marker) in SINGLE_POINTS.items():
            row = table.get(row_label)
            keys = (xk, yk) if what == "average" else (wg_keys["id"], wg_keys["ood_avg"])
            if row and all(k in row for k in keys):
                ax.plot(100 * row[keys[0]]["mean"], 100 * row[keys[1]]["mean"], marker, color=colour, markersize=8,
                        label=label)
        ax.set_xlabel(f"ID {what} top-1 (%)")
        ax.set_ylabel(f"OOD {what} top-1 (%)")
        ax.set_title(f"{name}: {what} accuracy, alpha 0 -> 1", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.text(0.01, 0.01, "numbers: alpha; square: alpha 1 (fine-tuned); star: zero-shot", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


GOALS = "R-Adapter at alpha 0.5 vs WiSE-FT at alpha 0.5"


def goal_lines(name: str, table: dict[str, Any]) -> list[str]:
    """The spurious-correlation goals, measured: met or missed, with the figures."""
    def m(label: str, key: str) -> float | None:
        return 100 * table[label][key]["mean"] if label in table and key in table[label] else None

    lines = []
    ft, zs = m("full FT (FLYP)", "ood_avg_wg"), m("zero-shot", "ood_avg_wg")
    if ft is not None and zs is not None:
        lines.append(f"- full FT's OOD worst group falls below zero-shot's: {ft:.1f} vs {zs:.1f} — "
                     f"{'met' if ft < zs else 'missed'}.")
    ra, wf = "R-Adapter, alpha 0.5", "WiSE-FT of full FT, alpha 0.5"
    if ra in table and wf in table:
        avg = (m(ra, "ood_avg"), m(wf, "ood_avg"))
        wg = (m(ra, "ood_avg_wg"), m(wf, "ood_avg_wg"))
        ok = avg[0] >= avg[1] and (wg[0] is None or wg[0] >= wg[1])
        ratio = (table[ra]["trainable_parameters"] or 0) / max(1, table[wf]["trainable_parameters"] or 1)
        lines.append(f"- {GOALS}: OOD average {avg[0]:.1f} vs {avg[1]:.1f}"
                     + (f", OOD worst group {wg[0]:.1f} vs {wg[1]:.1f}" if wg[0] is not None else "")
                     + f", with {ratio:.2f}x its trainable parameters — {'met' if ok else 'missed'}.")
    d, r = m("R-Adapter + DRM", "ood_avg_wg"), m("R-Adapter", "ood_avg_wg")
    if d is not None and r is not None:
        lines.append(f"- R-Adapter + DRM beats R-Adapter by >= 3 points of OOD worst group (alpha chosen on ID val): "
                     f"{d:.1f} vs {r:.1f} ({d - r:+.1f}) — {'met' if d - r >= 3 else 'missed'}.")
    d5, r5 = m("R-Adapter + DRM, alpha 0.5", "ood_avg_wg"), m("R-Adapter, alpha 0.5", "ood_avg_wg")
    if d5 is not None and r5 is not None:
        lines.append(f"- the same at the fixed alpha 0.5: {d5:.1f} vs {r5:.1f} ({d5 - r5:+.1f}) — "
                     f"{'met' if d5 - r5 >= 3 else 'missed'}.")
    return lines


def observations(figures: dict[str, Any]) -> list[str]:
    """Plain comparisons computed from the table (mean over seeds, percentage points)."""
    lines = []
    for name, table in figures["classification"].items():
        def mean(label: str, key: str, table: dict[str, Any] = table) -> float | None:
            return 100 * table[label][key]["mean"] if label in table else None

        best = max(table, key=lambda lbl: table[lbl]["ood_avg"]["mean"])
        best_id = max(table, key=lambda lbl: table[lbl]["id"]["mean"])
        parts = [f"best average OOD: {best} ({mean(best, 'ood_avg'):.1f}); best ID: {best_id} "
                 f"({mean(best_id, 'id'):.1f})"]
        for a, b in COMPARISONS:
            if a in table and b in table:
                d_id, d_ood = mean(a, "id") - mean(b, "id"), mean(a, "ood_avg") - mean(b, "ood_avg")
                parts.append(f"{a} vs {b}: ID {d_id:+.1f}, avg OOD {d_ood:+.1f}")
        lines.append(f"- **{name}**: " + "; ".join(parts) + ".")
    for name, table in figures["base_to_novel"].items():
        if "R-Adapter" in table and "zero-shot" in table:
            r, z = table["R-Adapter"], table["zero-shot"]
            lines.append(f"- **{name}**: R-Adapter novel {pct(r['novel'])} vs zero-shot {pct(z['novel'])}, "
                         f"harmonic mean {pct(r['hm'])} vs {pct(z['hm'])}.")
    return lines


def _fmt_map(m: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()) or "none"


def header_lines(matrix: dict[str, Any], figures: dict[str, Any], command: str) -> list[str]:
    lines = ["# Results: R-Adapter, DRM and the baselines on the offline benchmarks", "",
             f"Generated by `{command}` from the runs' `metrics.json` (every figure is also in "
             "[bench/results.json](bench/results.json)); do not edit the numbers by hand: re-run the matrix and "
             "this command ([training.md](training.md#running-the-results-matrix-on-a-gpu)).", ""]
    lines += matrix_lines(matrix, figures.get("run_wall_s"))
    earlier = figures.get("earlier")
    if earlier:
        lines += [f"**Earlier matrix** ({', '.join(earlier['groups'])}): carried from `{earlier['source']}` as "
                  f"`{earlier['generated_by']}` wrote it, marked \"earlier matrix\" below. Those runs predate the "
                  "like-for-like training of the matrix above (one MPM-NCE temperature, DRM on the method's own "
                  "loss, checked descriptions; [training.md](training.md#drm-the-objective-we-implement)), so "
                  "compare rows within a section, not across the two.", "",
                  *matrix_lines(earlier["matrix"], earlier.get("run_wall_s"))]
    return lines


def matrix_lines(matrix: dict[str, Any], walls: dict[str, Any] | None) -> list[str]:
    """Model, budget, alpha rule, seeds and every invocation of one matrix."""
    inv = matrix.get("invocations", [])
    last = inv[-1] if inv else {}
    s = matrix.get("settings", {})
    model = matrix.get("model") or {}
    machine = last.get("machine", {})
    where = machine.get("gpu") or "CPU"
    lines = []
    if model:
        lines.append(f"- **Model**: `{model.get('name')}`, fingerprint `{model.get('fingerprint', '')[:16]}…`.")
    if s:
        warm = s.get("warmup_steps") if s.get("warmup_steps") is not None else s.get("steps", 0) // 10
        lines += [f"- **Budget, the same for every method**: {s.get('steps')} optimiser steps of batch "
                  f"{s.get('batch_size')} (warm-up {warm}, AdamW, cosine), {s.get('precision')} on {where}; "
                  f"learning rate 5e-4 (adapters, LoRA) except {_fmt_map(s.get('lr', {}))}. Training images: "
                  "every training image, except a fixed random subset per seed for "
                  f"{_fmt_map(s.get('train_limit', {}))}. "
                  f"Evaluation: at most {_fmt_map(s.get('eval_limit', {}))} images per set (a fixed subset, the "
                  "same for every method; other benchmarks: every image).",
                  f"- **Alpha**: a grid of {s.get('eval_alphas')} points in [0, 1], chosen on the ID validation split "
                  "(best top-1), never on test or OOD data"
                  + ("." if s.get("test_sweep", True) else "; the test and OOD sets were evaluated at the chosen "
                     "alpha and at alpha 1 only (`--no-test-sweep`), so the curve below is the validation one."),
                  "- **Seeds**: each row's seeds column; mean ± sample std over seeds. "
                  "Zero-shot is deterministic and runs once; so does the linear probe when its training data does "
                  "not depend on the seed."]
    search = matrix.get("lr_search")
    if search:
        parts = [f"{g}/{m} {c['chosen']:g} (of " + ", ".join(f"{float(lr):g}" for lr in c["tried"]) + ")"
                 for g, methods in search["groups"].items() for m, c in methods.items()]
        times = ", ".join(f"{k:g}" for k in search["multipliers"])
        lines.append(f"- **Learning rate, chosen on ID validation** (top-1 at alpha 1 after training, seed "
                     f"{search['seed']}, each method's usual rate times {times}; the same number of tries for "
                     f"every method): {'; '.join(parts)}.")
    for i in inv:
        m = i.get("machine", {})
        hw = ", ".join(x for x in (m.get("gpu"), f"{m.get('cpus')} CPUs", f"torch {m.get('torch')}",
                                   f"Python {m.get('python')}") if x)
        lines.append(f"- **Run** {i.get('finished', i.get('started', '?'))[:10]} on {hw}: `{i.get('command')}` "
                     f"({i.get('jobs')} at a time; {i.get('runs', {}).get('done', 0)} runs finished in "
                     f"{i.get('wall_s', '?')} s wall time).")
    if walls:
        lines.append(f"- **Per run** ({walls['n']}): median {statistics.median(walls['values']):.0f} s, "
                     f"longest {max(walls['values']):.0f} s (start-up, training and every evaluation).")
    return [*lines, ""]


def carry_earlier(figures: dict[str, Any], earlier: dict[str, Any], source: str) -> None:
    """Add the groups of an earlier ``results.json`` that these runs do not have (``figures["earlier"]``
    says which, and from what matrix)."""
    groups = []
    for kind in ("classification", "retrieval", "base_to_novel"):
        for name, table in earlier.get(kind, {}).items():
            if name not in figures[kind]:
                figures[kind][name] = table
                groups.append(name)
                for extra in ("sweeps", "val_sweeps"):
                    if name in earlier.get(extra, {}):
                        figures[extra][name] = earlier[extra][name]
    if not groups:
        return
    origin = {"source": source, "generated_by": earlier.get("generated_by", "?"), "matrix": earlier.get("matrix", {}),
              "run_wall_s": earlier.get("run_wall_s")}
    if earlier.get("earlier"):  # these groups were carried once already: keep where they came from
        origin = {k: v for k, v in earlier["earlier"].items() if k != "groups"}
    figures["earlier"] = {"groups": groups, **origin}


def render(figures: dict[str, Any], matrix: dict[str, Any], command: str) -> str:
    lines = header_lines(matrix, figures, command)
    earlier = set((figures.get("earlier") or {}).get("groups", []))
    for name, table in figures["classification"].items():
        section = classification_section(name, table, figures["sweeps"].get(name, {}),
                                         figures.get("val_sweeps", {}).get(name))
        if name in earlier:
            section[0] += " (earlier matrix)"
        lines += section
        plot = figures.get("plots", {}).get(name)
        if plot:
            lines += [f"![{name}: ID against OOD accuracy for every alpha]({plot})", "",
                      "Each line is one method's weight-space ensemble from alpha 0 (the zero-shot model, the star) "
                      "to alpha 1 (the fine-tuned model, the square), as in WiSE-FT's figure; up and to the right is "
                      "better. Means over seeds, test splits.", ""]
        goals = goal_lines(name, table)
        if goals and any("worst_group" in k or k.endswith("_wg") for r in table.values() for k in r):
            lines += [f"Goals on {name} (measured, not tested):", "", *goals, ""]
    for name, table in figures["retrieval"].items():
        lines += ["## Emoji retrieval: image ↔ name captions", "",
                  "Recall@1 (%): name→image (text to image) and image→name; ID = Google-style test, OOD = "
                  f"Twitter-style test; alpha chosen on Google validation R@1 ({name}).", "",
                  *_table(["method", "trainable params", "seeds", "alpha", "ID name→image", "ID image→name",
                           "OOD name→image", "OOD image→name"],
                          [[lbl, params(r["trainable_parameters"]), seeds_cell(r), alphas(r), pct(r["id_t2i"]),
                            pct(r["id_i2t"]), pct(r["ood_t2i"]), pct(r["ood_i2t"])] for lbl, r in table.items()]), ""]
    if figures["base_to_novel"]:
        rows = [[name.removesuffix("-base2novel"), lbl, params(r["trainable_parameters"]), seeds_cell(r), alphas(r),
                 pct(r["base"]), pct(r["novel"]), pct(r["hm"])]
                for name, table in figures["base_to_novel"].items() for lbl, r in table.items()]
        lines += ["## Base-to-novel", "",
                  "Trained on the first half of the classes (base), tested on the base classes and on the unseen "
                  "other half (novel) with the zero-shot head of the fine-tuned text tower; top-1 % within each half "
                  "(ID test split), and their harmonic mean.", "",
                  *_table(["benchmark", "method", "trainable params", "seeds", "alpha", "base", "novel",
                           "harmonic mean"], rows), ""]
    if figures.get("missing"):
        lines += ["Not in these tables (no finished run; see its `run.log` under the matrix folder): "
                  + ", ".join(f"`{m}`" for m in figures["missing"]) + ".", ""]
    obs = observations(figures)
    if obs:
        lines += ["## What the numbers say", "",
                  "Differences of means over seeds, in percentage points; compare them with the ± columns above "
                  "before reading a winner into them.", "", *obs, ""]
    if figures.get("budget"):
        lines += budget_lines(figures["budget"]["curves"], figures["budget"]["matrix_steps"], figures["budget"]["root"])
    lines += shipped_lines(figures.get("shipped", {}))
    return "\n".join(lines)


BUDGET_LABELS = {"r-adapter": "R-Adapter", "drm": "R-Adapter + DRM", "full-ft": "full FT",
                 "full-ft-drm": "full FT + DRM", "lora": "LoRA"}


def budget_curves(runs: Runs) -> dict[str, dict[str, list[dict[str, float]]]]:
    """``group -> method -> val_curve`` (seed 0, or the lowest seed) of runs trained with ``--val-every``."""
    out: dict[str, dict[str, list[dict[str, float]]]] = defaultdict(dict)
    for (group, method), seeds in sorted(runs.items()):
        curve = seeds[min(seeds)].get("training", {}).get("val_curve")
        if curve:
            out[group][method] = curve
    return dict(out)


def budget_lines(curves: dict[str, dict[str, list[dict[str, float]]]], budget: int | None, root: str) -> list[str]:
    """The ID validation curve over training steps: has the matrix's budget plateaued?"""
    lines = []
    for group, methods in curves.items():
        steps = sorted({p["step"] for c in methods.values() for p in c})
        by_step = {m: {p["step"]: p["top1"] for p in c} for m, c in methods.items()}
        rows = [[str(s) + (" (the matrix's budget)" if s == budget else ""),
                 *(f"{100 * by_step[m][s]:.1f}" if s in by_step[m] else "—" for m in methods)] for s in steps]
        lines += [f"## Budget check ({group}): ID validation against training steps", "",
                  f"ID validation top-1 (%) at alpha 1 during training (`--val-every`; one seed, twice the matrix's "
                  f"steps, from `{root}`): where the curve is flat by the matrix's budget, more steps would not "
                  "change the comparison.", "",
                  *_table(["step", *(BUDGET_LABELS.get(m, m) for m in methods)],
                          rows), ""]
    return lines


def load_shipped(folder: Path) -> dict[str, Any]:
    """The test-split alpha sweeps shipped next to the app's adapters (``NAME.sweep.json``)."""
    return {p.name.removesuffix(".sweep.json"): json.loads(p.read_text())
            for p in sorted(folder.glob("*.sweep.json"))} if folder.is_dir() else {}


def shipped_lines(shipped: dict[str, Any]) -> list[str]:
    lines = ["## The shipped adapters", "",
             "The adapters the app offers (`adapters/`, each trained with its command in "
             "[adapters/README.md](../adapters/README.md)), scored on the test split at every alpha "
             "(from each `NAME.sweep.json`). Alpha 0 is the zero-shot model, alpha 1 the adapters fully merged; "
             "the marked alpha was chosen on ID validation.", ""]
    if not shipped:
        return [*lines, "No `*.sweep.json` found.", ""]
    for name, sweep in shipped.items():
        key, metric = sweep.get("key", "top1"), sweep.get("metric", "top-1 accuracy")
        chosen = sweep.get("chosen_alpha")
        groups = all("worst_group" in p["ood_avg"] for p in sweep["points"])
        rows = [[f"{p['alpha']:g}" + (" (chosen)" if chosen is not None and abs(p["alpha"] - chosen) < 1e-9 else ""),
                 f"{100 * p['id'][key]:.1f}", f"{100 * p['ood_avg'][key]:.1f}",
                 *([f"{100 * p['ood_avg']['worst_group']:.1f}"] if groups else [])] for p in sweep["points"]]
        lines += [f"`{name}` ({sweep.get('benchmark')}, {sweep.get('method')}; {metric}, %):", "",
                  *_table(["alpha", "ID", "OOD (average)", *(["OOD worst group"] if groups else [])], rows), ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", nargs="?", default="runs/matrix", help="matrix root (default: runs/matrix)")
    p.add_argument("--out", default="docs/results.md", help="markdown page (default: docs/results.md)")
    p.add_argument("--json", default=None, help="figures JSON (default: bench/results.json beside --out)")
    p.add_argument("--earlier", default=None, metavar="RESULTS_JSON",
                   help="an earlier results.json: its benchmarks these runs lack are carried over, marked")
    p.add_argument("--budget-runs", default=None,
                   help="a matrix root of runs trained with --val-every, for the budget-check tables")
    p.add_argument("--plots", default=None, help="folder for the alpha-curve PNGs (default: plots/ beside --out)")
    p.add_argument("--adapters", default="adapters",
                   help="shipped adapters folder, for their sweeps (default: adapters)")
    args = p.parse_args(argv)
    root = Path(args.root)
    runs = load_runs(root)
    if not runs:
        print(f"error: no finished runs (metrics.json) under {root}", file=sys.stderr)
        return 2
    matrix = json.loads((root / MATRIX_FILE).read_text()) if (root / MATRIX_FILE).is_file() else {}
    figures = build_figures(runs, matrix)
    figures["shipped"] = load_shipped(Path(args.adapters))
    if args.earlier:
        carry_earlier(figures, json.loads(Path(args.earlier).read_text()), args.earlier)
    if args.budget_runs:
        curves = budget_curves(load_runs(Path(args.budget_runs)))
        if curves:
            figures["budget"] = {"root": args.budget_runs, "matrix_steps": matrix.get("settings", {}).get("steps"),
                                 "curves": curves}
    out = Path(args.out)
    plots = Path(args.plots) if args.plots else out.parent / "plots"
    figures["plots"] = {}
    for name, sweeps in figures["sweeps"].items():
        path = plot_curves(name, sweeps, figures["classification"].get(name, {}), plots / f"{name}-alpha.png")
        if path:
            figures["plots"][name] = path.resolve().relative_to(out.parent.resolve()).as_posix() \
                if path.resolve().is_relative_to(out.parent.resolve()) else str(path)
    json_path = Path(args.json) if args.json else out.parent / "bench" / "results.json"
    command = (f"python -m train.report {args.root} --out {args.out}" + (f" --json {args.json}" if args.json else "")
               + (f" --adapters {args.adapters}" if args.adapters != "adapters" else "")
               + (f" --budget-runs {args.budget_runs}" if args.budget_runs else "")
               + (f" --earlier {args.earlier}" if args.earlier else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(render(figures, matrix, command))
    payload = {"generated_by": command, "matrix": {k: v for k, v in matrix.items()}, **figures}
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(payload, indent=1))
    print(f"wrote {out} and {json_path} ({sum(len(s) for s in runs.values())} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
