"""`m9 run`: every stage in a row in one workdir, and its summary."""

from __future__ import annotations

import click

from m9.cli.neighbors import duplicates_line, without_leaked
from m9.cli.options import (
    RUN_OPTIONS,
    config_fields,
    input_opt,
    options,
    overwrite_opt,
    tolerating_rejections,
    user_errors,
    workdir_opt,
)
from m9.cli.stages import evaluate_summary, ignored, k_summary, updated


@click.command()
@input_opt(default=None, help="Image folder or s3:// prefix (default: the bundled sample).")
@workdir_opt(help="Folder or s3:// URI; each stage writes into its own subfolder.")
@options(*RUN_OPTIONS)
@overwrite_opt
@user_errors
def run(input_, workdir, overwrite, **settings):
    """Ingest, embed, reduce, duplicates, evaluate and report in a row, then print a summary.

    Example: m9 run --input ~/fruits-360 --workdir m9-out --actors 2 --k 50
    """
    from m9.stages.pipeline import RunConfig, sample_dir
    from m9.stages.pipeline import run as run_pipeline

    cfg = RunConfig(
        input=input_ or sample_dir(),
        workdir=workdir,
        overwrite=overwrite,
        settings={stage: config_fields(cfg_type, settings) for stage, cfg_type in RunConfig.stage_types().items()},
    )
    result, too_many = tolerating_rejections(run_pipeline, cfg)
    st = result.stages
    emb, red = st["embed"].counts, st["reduce"].details
    reached = ", ".join(f"{t}: k={v}" for t, v in red["smallest_k_reaching"].items() if v) or "none within k"
    from m9.stages import contract

    lines = [
        "m9 run finished",
        f"  images found      {st['ingest'].counts['files_found']} ({ignored(st['ingest'])}){updated(st['ingest'])}",
        f"  embedded          {emb['embedded']}  ({emb.get('computed', 0)} computed, {emb.get('reused', 0)} reused)",
        f"  rejected          {emb['rejected']}  (reasons in {cfg.stage_dir('embed')}/{contract.ERRORS})",
        f"  model loads       {emb['model_loads']}",
        f"  variance          {100 * red['total_explained']:.1f} % by {k_summary(red)}  "
        f"(thresholds reached: {reached})",
        f"  duplicates        {duplicates_line(st['duplicates'].counts)}",
        f"  outputs           {cfg.stage_dir('ingest')}, {cfg.stage_dir('embed')}, {cfg.stage_dir('reduce')}, "
        f"{cfg.stage_dir('duplicates')}",
        "  wall time (s)     " + ", ".join(f"{n} {t}" for n, t in result.wall_s.items()),
    ]
    if result.evaluation:
        lines.append(f"  kNN accuracy      {evaluate_summary(result.evaluation)}  ({result.evaluation['protocol']})")
        lines += without_leaked(result.evaluation)
    lines.append(f"  report            {result.report}")
    click.echo("\n".join(lines))
    if too_many:
        raise click.ClickException(str(too_many))


COMMANDS = (run,)
