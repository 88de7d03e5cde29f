"""`m9 bench`: the embed engines timed side by side against the bare model's ceiling."""

from __future__ import annotations

import click

from m9.bench.config import CEILING_BATCHES, CEILING_IMAGES, DEFAULT_ENGINES
from m9.cli.options import actors_opt, batch_opt, input_opt, output_opt, precision_opt, runtime_opt, user_errors
from m9.stages import contract


def _int_list(ctx, param, value):
    if value is None:
        return None
    try:
        numbers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated whole numbers, e.g. 1000,4000") from None
    if not numbers or min(numbers) < 1:
        raise click.BadParameter(f"{value!r}: expected positive whole numbers")
    return tuple(numbers)


@click.command()
@input_opt(default=None, help="Output of `m9 ingest` (Parquet folder); default: the bundled sample, ingested.")
@click.option(
    "--engines",
    default=",".join(DEFAULT_ENGINES),
    show_default=True,
    help="Comma-separated engines to run. ray runs on --runtime (m9 embed's default path), ray-keras on Keras; "
    "spark-udf is the seed's UDF with m9's knobs on Keras, spark-udf-onnx the same on ONNX Runtime, "
    "spark-udf-defaults the seed's UDF with Keras', Spark's and TensorFlow's defaults (batch 32, Arrow batch "
    "10,000, TensorFlow's thread pools); ceiling is the faster of ceiling-keras and ceiling-onnx (the bare "
    "model, searched), which it runs; ceiling-int8 and ray-int8 are the bare model and the ray engine on the "
    "int8 model (ONNX Runtime).",
)
@actors_opt
@batch_opt
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use the first N images (by image_id).")
@click.option(
    "--repeat",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Runs per engine; the run with the best steady rate is reported.",
)
@output_opt(
    default=contract.default_output(contract.BENCH_DIR),
    show_default=True,
    help="Folder for bench.json, bench.md and bench.png (scaling.json, scaling.md).",
)
@click.option(
    "--scaling",
    default=None,
    callback=_int_list,
    metavar="N,N,…",
    help="Instead of the engine table: the ray engine at each size (rows re-used if the input has fewer).",
)
@click.option(
    "--ceiling-batches",
    default=",".join(map(str, CEILING_BATCHES)),
    show_default=True,
    callback=_int_list,
    metavar="B,B,…",
    help="Batch sizes the ceiling's search tries.",
)
@click.option(
    "--ceiling-images",
    type=click.IntRange(min=1),
    default=CEILING_IMAGES,
    show_default=True,
    help="Images each ceiling configuration is timed over.",
)
@runtime_opt
@precision_opt
@user_errors
def bench(
    input_,
    engines,
    actors,
    batch_size,
    limit,
    repeat,
    output,
    scaling,
    ceiling_batches,
    ceiling_images,
    runtime,
    precision,
):
    """Time the embed engines (Ray, Spark UDF, Spark predict_batch_udf) on each runtime against the bare
    model's ceiling, and m9's default knobs against the best setting found on this machine.

    Example: m9 bench --input m9-out/images --limit 1000
    """
    from m9.bench import BenchConfig
    from m9.bench import bench as run_bench
    from m9.bench.scaling import scaling as run_scaling

    cfg = BenchConfig(
        input=input_,
        output=output,
        engines=tuple(e.strip() for e in engines.split(",") if e.strip()),
        actors=actors,
        batch_size=batch_size,
        limit=limit,
        repeat=repeat,
        ceiling_batches=ceiling_batches,
        ceiling_images=ceiling_images,
        runtime=runtime,
        precision=precision,
    )

    def progress(line: str) -> None:
        click.echo(line, err=True)

    if scaling:
        result = run_scaling(cfg, list(scaling), progress)
        click.echo(
            f"scaling: steady per-image cost spread {100 * result['steady_cost_spread']:.1f} % over "
            f"{', '.join(str(s) for s in scaling)} images; tables in {output}/scaling.md"
        )
        return
    result = run_bench(cfg, progress)
    click.echo(
        f"bench: {result['images']} images, engines {'agree' if result['agree'] else 'DISAGREE'} "
        f"(max |Δ| {result['max_abs_diff']:.1e}); report in {output}/bench.md"
    )
    if not result["agree"]:
        raise click.ClickException("engines produced different features")


COMMANDS = (bench,)
