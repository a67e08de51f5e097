"""Rank commands: ``sweep`` (train and report a LoRA rank sweep; ``--advise`` for the rank advisor),
``compare`` (metrics, spectra, effective rank and subspace similarity of adapters side by side), ``truncate``
(SVD-truncate an adapter to a lower rank; only ever lower), ``sweep-report`` (the report of a sweep as it
stands)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from adapterhub_local.cli.common import app, console, get_registry, parse_overrides, print_json, table
from adapterhub_local.progress import is_tty

if TYPE_CHECKING:
    from adapterhub_local.sweep.reference import ReferenceTable


@app.command("compare")
def compare_cmd(
    refs: list[str] = typer.Argument(..., help="Adapter references (give one twice to compare it with itself)."),
    out: Path = typer.Option(Path("runs/compare"), "--out", "-o", help="Directory for compare.json/md and PNGs."),
    side: str = typer.Option("right", help="Singular vectors of ΔW to compare: right (input) or left (output)."),
    max_modules: int = typer.Option(6, help="Heatmaps per adapter pair (modules spread over the depth)."),
    projection_rank: int | None = typer.Option(
        None, "--projection-rank", min=1,
        help="k for ΔW vs W (§7.3): project W onto ΔW's top-k directions (default: the adapter's rank, at most a "
             "quarter of the module's smaller side)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Metrics side by side, spectrum and effective rank of each ΔW, how ΔW meets the frozen W (‖U_kᵀ W V_k‖ and
    the amplification factor, LoRA paper §7.3), and the normalised subspace similarity
    φ(i, j) = ||U_iᵀ U_j||²_F / min(i, j) between every pair, per module (§7.2)."""
    from adapterhub_local.sweep.amplification import summarise
    from adapterhub_local.sweep.compare import compare, metric_names, write_comparison

    result = compare(get_registry(), refs, side=side, projection_rank=projection_rank)
    written = write_comparison(result, out, max_modules=max_modules)
    if as_json:
        print_json(result.to_dict())
        return
    # The terminal gets the headline metrics; compare.md / compare.json hold all of them.
    names = metric_names(result)
    metrics = [m for m in _HEADLINE if m in names] or names[:4]
    rows = []
    for analysis in result.adapters:
        s = analysis.summary()
        rows.append([s["ref"], s["rank"], s["alpha"], *[_fmt(analysis.card.metrics.get(m)) for m in metrics],
                     _fmt(s["entropy_rank_mean"]), _fmt(s["energy_rank_90_mean"]), _fmt(s["energy_rank_99_mean"])])
    table("adapters", ["adapter", "rank", "alpha", *metrics, "entropy rank", "rank@90%", "rank@99%"], rows)
    if result.pairs:
        table(f"subspace similarity ({side} singular vectors, mean over modules)", ["a", "b", "φ(1,1)", "φ(k,k)"],
              [[p.a, p.b, _fmt(p.summary()["phi_1_mean"]), _fmt(p.summary()["phi_k_mean"])] for p in result.pairs])
    amplified = [[a.card.ref, kind, _fmt(row["k"]), _fmt(row["delta_norm"]), _fmt(row["onto_delta"]),
                  _fmt(row["onto_weight"]), _fmt(row["onto_random"]), _fmt(row["factor"])]
                 for a in result.adapters for kind, row in summarise(a.amplification).items()]
    if amplified:
        table("ΔW vs W (mean over layers): ‖U_kᵀ W V_k‖_F onto ΔW's, W's own and random directions",
              ["adapter", "module", "k", "‖ΔW‖", "onto ΔW", "onto W", "onto random", "amplification (median)"],
              amplified)
    for analysis in result.adapters:
        if analysis.amplification_note:
            console.print(f"{analysis.card.ref}: no ΔW vs W — {analysis.amplification_note}")
    console.print(f"wrote {len(written)} file(s) to {out}")


@app.command("truncate")
def truncate_cmd(
    ref: str = typer.Argument(..., help="The LoRA adapter to truncate."),
    rank: int = typer.Option(..., "--rank", "-r", help="Target rank K."),
    name: str | None = typer.Option(None, "--name", help="Adapter name (default: <parent>-trunc-r<K>)."),
) -> None:
    """SVD-truncate every ΔW of REF to rank K and register the result with REF as its parent."""
    from adapterhub_local.sweep.truncate import truncate_and_register

    card = truncate_and_register(get_registry(), ref, rank, name=name)
    info = card.extra["truncation"]
    console.print(f"registered {card.ref} (rank {info['from_rank']} → {rank}, parent {card.parent}); "
                  f"energy kept: mean {info['energy_kept_mean']:.4f}, min {info['energy_kept_min']:.4f}")


_REFERENCE_HELP = ("A published rank table (CSV: rank,<metric>,…) to set beside the sweep's: reference.md in the "
                   "report, e.g. recipes/references/lora-paper-table18-e2e.csv.")


@app.command("sweep")
def sweep_cmd(
    recipe: Path = typer.Argument(..., help="A LoRA training recipe (YAML)."),
    overrides: list[str] = typer.Argument(None, help="key=value recipe overrides, e.g. train.max_steps=50 "
                                          "(as for train; --set k=v works too)."),
    ranks: str | None = typer.Option(None, "--ranks", help="Comma-separated ranks (default 1,2,4,…,1024)."),
    alpha_policy: str = typer.Option("fixed", "--alpha-policy", help="fixed | proportional | rslora."),
    seeds: str | None = typer.Option(None, "--seeds", help="Comma-separated seeds (default: the recipe's)."),
    mode: str = typer.Option("sequential", "--mode", help="sequential | concurrent."),
    truncate_from: int | None = typer.Option(None, "--truncate-from", help="Also SVD-truncate this rank's adapter "
                                             "to every lower swept rank and report that curve."),
    tolerance: float = typer.Option(0.01, help="Knee margin: a rank counts as worse only when its deficit to "
                                    "another rank exceeds this fraction of the best score, at 95% confidence "
                                    "for all pairs of ranks at once."),
    data_fractions: str | None = typer.Option(None, "--data-fractions", help="Rank × data size: train every "
                                              "rank on these fractions of the training rows, e.g. 0.1,0.3,1.0 "
                                              "(same validation and test split for all)."),
    advise: bool = typer.Option(False, "--advise", help="Rank advisor: train only the highest rank, predict the "
                                "others from its SVD truncations and recommend a rank."),
    num_beams: int = typer.Option(1, "--num-beams", help="Generation: also evaluate each trained adapter with "
                                  "beam search of this width, beside greedy decoding."),
    e2e_metrics: bool = typer.Option(True, "--e2e-metrics/--no-e2e-metrics", help="Generation: add NIST, METEOR "
                                     "and CIDEr (the E2E challenge's metrics) to BLEU and ROUGE-L."),
    knee_metric: str | None = typer.Option(None, "--knee-metric", help="Metric for the knee (default: accuracy, "
                                           "else BLEU, else val_loss)."),
    sweep_id: str | None = typer.Option(None, "--sweep-id", help="Name (default: derived; a re-run resumes)."),
    override: list[str] = typer.Option([], "--set", "-s", help="Recipe override key=value (repeatable)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    executor: str = typer.Option("local", "--executor", help="Where points train: local (this process) or ray "
                                 "(tasks on a Ray cluster; a sweep resumes under either)."),
    address: str | None = typer.Option(None, "--address", help="Ray cluster address (default: $RAY_ADDRESS, "
                                       "else a local Ray runtime)."),
    ray_cpus: float = typer.Option(1.0, "--ray-cpus", help="CPUs per Ray task."),
    ray_gpus: float = typer.Option(0.0, "--ray-gpus", help="GPUs per Ray task."),
    max_retries: int = typer.Option(3, "--max-retries", help="Times Ray re-runs a task whose worker died."),
    group_size: int | None = typer.Option(None, "--group-size", help="Concurrent mode on Ray: points per task "
                                          "(default: split evenly over the cluster)."),
    reference: Path | None = typer.Option(None, "--reference", help=_REFERENCE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Train one LoRA adapter per rank (sequentially, or all at once on one shared frozen base; here or on a Ray
    cluster), register and tag each with the sweep id, and write runs/<sweep-id>/results.{csv,json,md} and plots."""
    from adapterhub_local.config import load_recipe
    from adapterhub_local.sweep.driver import run_sweep
    from adapterhub_local.sweep.plan import SweepConfig, parse_fractions, parse_ranks
    from adapterhub_local.sweep.ray_executor import ExecutorOptions
    from adapterhub_local.train.distributed import require_single

    options = ExecutorOptions(executor, address, ray_cpus, ray_gpus, max_retries, group_size)
    options.validate()

    require_single("adapterhub sweep")  # its runs do not split across processes; N would register N times
    loaded = load_recipe(recipe, parse_overrides([*(overrides or []), *override]))
    published = _reference_table(reference)  # a bad table is refused before hours of training, not after
    config = SweepConfig(
        ranks=parse_ranks(ranks), alpha_policy=alpha_policy, mode=mode, truncate_from=truncate_from,
        seeds=_seeds(seeds), tolerance=tolerance, sweep_id=sweep_id, knee_metric=knee_metric,
        data_fractions=parse_fractions(data_fractions), advise=advise, num_beams=num_beams, e2e_metrics=e2e_metrics,
    )
    # Bars only on a terminal: in a log (`> sweep.log 2>&1`, nohup) a bar is a stream of carriage returns.
    summary = run_sweep(get_registry(create=True), loaded, config, progress=progress and is_tty(sys.stderr),
                        log=lambda line: console.print(line, markup=False, highlight=False), executor=options)
    _print_report(summary, as_json)
    _reference_beside(summary, published, as_json)


@app.command("sweep-report")
def sweep_report_cmd(
    directory: Path = typer.Argument(..., help="The sweep's directory, runs/<sweep-id>."),
    out: Path | None = typer.Option(None, "--out", help="Where to write it (default: <directory>/interim)."),
    tolerance: float | None = typer.Option(None, help="Knee margin (default: the sweep's own)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    reference: Path | None = typer.Option(None, "--reference", help=_REFERENCE_HELP),
) -> None:
    """The report of a sweep as it stands — while it runs or after an interruption: the finished points only,
    from its state file, without training or loading anything."""
    from adapterhub_local.sweep.interim import write_interim_report

    published = _reference_table(reference)  # a bad table is refused before anything is written
    summary = write_interim_report(directory, out, tolerance)
    _print_report(summary, as_json)
    _reference_beside(summary, published, as_json)


def _reference_table(path: Path | None) -> ReferenceTable | None:
    from adapterhub_local.sweep.reference import load_reference

    return load_reference(path) if path is not None else None


def _reference_beside(summary: dict[str, Any], published: ReferenceTable | None, as_json: bool) -> None:
    """Write (and, unless ``--json``, print) the comparison with a published rank table into the report."""
    from adapterhub_local.sweep.reference import write_reference_report

    if published is None:
        return
    written = write_reference_report(Path(summary["directory"]), published)
    if not as_json:
        console.print(written.read_text(encoding="utf-8"), markup=False, highlight=False)
        console.print(f"beside the reference: {written}")


def _print_report(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(summary)
        return
    console.print(Path(summary["directory"], "results.md").read_text(encoding="utf-8"), markup=False,
                  highlight=False)
    console.print(f"report: {summary['directory']}")


def _seeds(text: str | None) -> list[int] | None:
    from adapterhub_local.errors import ConfigError

    if not text:
        return None
    parts = [s.strip() for s in text.split(",") if s.strip()]
    bad = [p for p in parts if not p.lstrip("-").isdigit()]
    if bad or not parts:
        raise ConfigError([f"seed {p!r} is not an integer" for p in bad] or ["no seeds given"],
                          "give seeds like --seeds 0,1,2", what="seeds")
    return [int(p) for p in parts]


_HEADLINE = ("val_loss", "test_loss", "accuracy", "macro_f1", "bleu", "rougeL")


def _fmt(value: object) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
