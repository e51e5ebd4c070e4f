"""Predict's margin over zero / mean fill against how well the modalities predict each other, and against the
number of training rows, on synthetic caches whose generative model is known.

    python scripts/margin_sweep.py OUT_DIR [--latent SHARED:PRIVATE ...] [--n-train N ...] [--dims IMAGE:TEXT]
                                   [--draws 11,21,22,23] [--seeds 0,1,2] [--workers 1] [--threads 1]
                                   [--real REPORT.json ...] [--overwrite]

Each point is `synthetic-predictable` (embcache/bench/accuracy.py SYNTHETIC) with the latent split into
SHARED dimensions both modalities see and PRIVATE dimensions each sees alone (`--latent`; the more shared, the
higher the cross-modal R2), or with N training rows (`--n-train`), run on each draw through the grid of
`embcache bench accuracy --test-types both` (impute predict / zero / mean x complete / missing training at 0.7,
test missing-both at 0.7). Per point it keeps, over the draws: the predictors' R2 on the test pairs, predict -
max(zero, mean) in each setting (mean over seeds per draw), and the headroom: the Bayes-optimal accuracy on the
same test rows minus the best baseline. Writes OUT_DIR/sweep.json (after every draw: a rerun resumes, reusing the
draws already done with the same settings; one made with other settings is refused unless --overwrite), sweep.txt
(the table) and sweep.png (margin and headroom against R2, and against the training rows; with `--real
REPORT.json`, the real sets of those `bench accuracy` reports at their own R2, each margin with its interval over
the test rows).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from embcache.bench import synthetic
from embcache.bench.accuracy import HELPS_MARGIN, SETTINGS, SYNTHETIC, SYNTHETIC_DRAWS, margin_of, run_dataset
from embcache.config import FitConfig
from embcache.data import dataset_from_features
from embcache.missing import MODALITIES, scenario_present
from embcache.runtime import staged_file
from embcache.store import SPLIT_CODES

BASE = "synthetic-predictable"
TEST_RATE = 0.7
COLOURS = dict(zip(SETTINGS, ("tab:blue", "tab:orange")))  # one per training setting, in both panels


def run_draw(params: dict, draw: int, cfg: FitConfig, seeds: list[int]) -> dict:
    """One draw of the cache `params` through the grid: {r2, margin, headroom, interval} per setting."""
    features = synthetic.make_features(**params, seed=draw)
    entry = run_dataset(f"sweep@{draw}", dataset_from_features(features, f"sweep@{draw}"), cfg, seeds=seeds,
                        test_types=["both"], test_rate=TEST_RATE, log=lambda *a: None)
    test = np.flatnonzero(features.split == SPLIT_CODES["test"])
    show = scenario_present(features.ids[test], {m: features.present[m][test] for m in MODALITIES},
                            "missing-both", TEST_RATE, cfg.missing_seed)
    bayes = synthetic.bayes_accuracy(features, test, show)
    out = {"draw": draw, "bayes_missing_both": bayes, "seconds": entry["seconds"]}
    for setting in SETTINGS:
        by = entry["summary"][setting]["both"]
        best = max(by[i]["missing"]["mean"] for i in ("zero", "mean"))
        out[setting] = {"r2": by["predict"]["r2"]["mean"], "margin": margin_of(by), "headroom": bayes - best,
                        "scores": {i: q["missing"]["mean"] for i, q in by.items()},
                        "interval": entry["intervals"]["margin"][setting]["both"]}
    return out


def summarize(point: dict) -> dict:
    """Mean and std over the point's draws of each setting's r2, margin and headroom."""
    out = {}
    for setting in SETTINGS:
        out[setting] = {}
        for key in ("r2", "margin", "headroom"):
            values = [d[setting][key] for d in point["draws"]]
            out[setting][key] = {"mean": float(np.mean(values)),
                                 "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
    return out


def format_table(points: list[dict]) -> list[str]:
    lines = ["point                    draws  setting   predictor R2   margin            headroom",
             "                                          (test pairs)   predict - best    Bayes - best"]
    for p in points:
        s = p["summary"]
        for setting in SETTINGS:
            q = s[setting]
            lines.append(f"{p['label']:<24} {len(p['draws']):>5}  {setting:<8}  {q['r2']['mean']:>6.3f}        "
                         f"{q['margin']['mean']:+.3f} ± {q['margin']['std']:.3f}   "
                         f"{q['headroom']['mean']:+.3f} ± {q['headroom']['std']:.3f}")
    return lines


def real_margins(report: dict) -> list[dict]:
    """{name, setting, r2, margin, interval} of each store (not synthetic) in a `bench accuracy` report with test
    type both: where a real set sits against the sweep."""
    out = []
    for ds in report["datasets"]:
        if "draw" in ds or "both" not in ds["summary"].get("complete", {}):
            continue
        for setting in SETTINGS:
            by = ds["summary"][setting]["both"]
            interval = ((ds.get("intervals") or {}).get("margin") or {}).get(setting, {}).get("both")
            out.append({"name": ds["name"], "setting": setting, "r2": by["predict"]["r2"]["mean"],
                        "margin": margin_of(by), "interval": interval})
    return out


def plot(points: list[dict], path, real: list[dict] = ()) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator, ScalarFormatter

    from embcache.plots import save_figure

    groups = [("latent", "predictor R2 on test pairs (image <-> text, mean of both directions)"),
              ("n_train", "training rows")]
    groups = [(key, label) for key, label in groups if any(p["vary"] == key for p in points)]
    fig = Figure(figsize=(5.2 * len(groups), 3.8))
    axes = np.atleast_1d(fig.subplots(1, len(groups)))
    for ax, (key, label) in zip(axes, groups):
        group = [p for p in points if p["vary"] == key]
        for setting, colour in COLOURS.items():
            xs = [p["summary"][setting]["r2"]["mean"] if key == "latent" else p["params"]["n_train"] for p in group]
            order = np.argsort(xs)
            xs = np.asarray(xs)[order]
            for what, style in (("margin", "o-"), ("headroom", "x--")):
                ys = np.asarray([p["summary"][setting][what]["mean"] for p in group])[order]
                err = np.asarray([p["summary"][setting][what]["std"] for p in group])[order]
                ax.errorbar(xs, ys, yerr=err if what == "margin" else None, fmt=style, color=colour, capsize=3,
                            alpha=1.0 if what == "margin" else 0.6, label=f"{setting} training: "
                            + ("predict - best baseline" if what == "margin" else "Bayes - best baseline"))
        if key == "latent":  # the real sets at their own R2, each margin with its 95 % interval over test rows
            for setting, colour in COLOURS.items():
                for i, r in enumerate(r for r in real if r["setting"] == setting):
                    low, high = r["interval"] or (r["margin"], r["margin"])
                    ax.errorbar([r["r2"]], [r["margin"]], yerr=[[r["margin"] - low], [high - r["margin"]]], fmt="s",
                                mfc="white", color=colour, capsize=2, lw=0.8,
                                label=None if i else f"{setting} training: a real set (95 % interval, test rows)")
                    ax.annotate(r["name"], (r["r2"], r["margin"]), fontsize=6, xytext=(3, 3),
                                textcoords="offset points")
        ax.axhline(HELPS_MARGIN, color="grey", lw=0.8, ls=":")
        ax.axhline(0.0, color="black", lw=0.8)
        if key == "n_train":
            ax.set_xscale("log")
            ax.set_xticks(sorted({p["params"]["n_train"] for p in group}))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy difference, missing-both at 0.7")
        against = "cross-modal R2" if key == "latent" else "training rows"
        ax.set_title(f"margin against {against} (mean ± std over draws)", fontsize=9)
    axes[0].legend(fontsize=6, loc="lower right")
    save_figure(fig, path)


def write(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with staged_file(out / "sweep.json") as tmp, open(tmp, "w") as fh:
        json.dump(report, fh, indent=1)


def _run_job(job):
    params, draw, cfg, seeds, threads = job
    torch.set_num_threads(threads)
    return run_draw(params, draw, cfg, seeds)


def run_sweep(out: str | Path, points: list[tuple[str, dict]], draws: list[int], seeds: list[int],
              cfg: FitConfig, base: dict | None = None, workers: int = 1, threads: int = 1,
              real: list[dict] = (), overwrite: bool = False, log=print) -> dict:
    """points: (what varies: "latent" or "n_train", the overrides of the base cache's settings). With workers > 1
    the draws run in that many processes (`threads` torch threads each). real: `real_margins` to draw beside the
    sweep (hollow squares)."""
    out, base = Path(out), dict(SYNTHETIC[BASE] if base is None else base)
    settings = {"base": base, "seeds": seeds, "fit": asdict(cfg), "versions": {"torch": torch.__version__}}
    done = {}  # (params, draw) -> that draw's result, from an earlier run with the same settings
    if (out / "sweep.json").exists():
        old = json.loads((out / "sweep.json").read_text())
        differ = [k for k, v in json.loads(json.dumps(settings)).items() if old.get(k) != v]
        if differ and not overwrite:  # its draws are measurements: never replaced unasked
            raise SystemExit(f"{out / 'sweep.json'} was made with other settings ({', '.join(differ)} differ): "
                             "choose another OUT_DIR, or --overwrite to start it afresh")
        if not differ:
            done = {(json.dumps(p["params"], sort_keys=True), d["draw"]): d for p in old["points"] for d in p["draws"]}
    report = {**settings, "points": []}
    for vary, overrides in points:
        params = {**base, **overrides}
        label = (f"shared {params['shared_dim']}, private {params['private_dim']}" if vary == "latent"
                 else f"{params['n_train']} training rows")
        report["points"].append({"label": label, "vary": vary, "params": params, "draws": []})
    keys = {(json.dumps(p["params"], sort_keys=True), draw): p["params"] for p in report["points"] for draw in draws}
    todo = [(params, draw, cfg, seeds, threads) for (key, draw), params in keys.items() if (key, draw) not in done]
    log(f"{len(keys)} draws to score, {len(keys) - len(todo)} from the earlier run; {len(todo)} to train")

    def refresh():  # each point's draws (in --draws order) and summary from `done`; the JSON rewritten
        for point in report["points"]:
            key = json.dumps(point["params"], sort_keys=True)
            point["draws"] = [done[key, draw] for draw in draws if (key, draw) in done]
            if point["draws"]:
                point["summary"] = summarize(point)
        write(out, report)

    def finished(params, result):
        done[json.dumps(params, sort_keys=True), result["draw"]] = result
        refresh()
        log(f"{json.dumps({k: params[k] for k in ('shared_dim', 'private_dim', 'n_train')})} draw {result['draw']}: "
            + ", ".join(f"{s} R2 {result[s]['r2']:.3f} margin {result[s]['margin']:+.3f} "
                        f"headroom {result[s]['headroom']:+.3f}" for s in SETTINGS) + f" [{result['seconds']:.0f} s]")

    refresh()
    if workers > 1 and todo:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_run_job, job): job[0] for job in todo}
            for future in as_completed(futures):
                finished(futures[future], future.result())
    else:
        for job in todo:
            finished(job[0], _run_job(job))
    lines = format_table(report["points"])
    with staged_file(out / "sweep.txt") as tmp, open(tmp, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with staged_file(out / "sweep.png") as tmp, open(tmp, "wb") as fh:
        plot(report["points"], fh, real)
    log("\n".join(lines))
    log(f"wrote {out}/sweep.json, sweep.txt, sweep.png")
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--latent", nargs="*", default=["14:1", "12:2", "10:3", "8:4", "6:5", "4:6"],
                        help="SHARED:PRIVATE latent dimensions per point (the base cache has 12:2)")
    parser.add_argument("--n-train", nargs="*", type=int, default=[500, 1500, 5000],
                        help="training rows per point, at the base cache's latent split")
    parser.add_argument("--dims", default=None, metavar="IMAGE:TEXT",
                        help="embedding widths of every point (the base cache has 64:48)")
    # the first four draws: the sweep's 8 points x 12 draws would take hours, and its figures are from these
    parser.add_argument("--draws", default=",".join(map(str, SYNTHETIC_DRAWS[BASE][:4])))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--real", nargs="*", default=[], metavar="REPORT",
                        help="accuracy.json files of `embcache bench accuracy --test-types both` on real stores: their "
                             "margins drawn at their predictors' R2")
    parser.add_argument("--overwrite", action="store_true",
                        help="start OUT_DIR/sweep.json afresh when it was made with other settings")
    parser.add_argument("--workers", type=int, default=1, help="draws trained at once, one process each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    points = [("latent", {"shared_dim": int(s), "private_dim": int(p)})
              for s, p in (spec.split(":") for spec in args.latent)]
    points += [("n_train", {"n_train": n}) for n in args.n_train]
    base = dict(SYNTHETIC[BASE])
    if args.dims:
        base["d_image"], base["d_text"] = (int(d) for d in args.dims.split(":"))
    run_sweep(args.out, points, [int(d) for d in args.draws.split(",")], [int(s) for s in args.seeds.split(",")],
              FitConfig(device="cpu"), base=base, workers=args.workers, threads=args.threads,
              real=[r for path in args.real for r in real_margins(json.loads(Path(path).read_text()))],
              overwrite=args.overwrite)


if __name__ == "__main__":
    main()
