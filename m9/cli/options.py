"""What the commands share: each option declared once, the parsed option types, and the one-line errors.

A stage's options are listed once here (INGEST_OPTIONS, EMBED_OPTIONS, REDUCE_OPTIONS …); the stage's command
and `m9 run` both take them with `@options(…)`, and `config_fields` hands each value to the config field of the
same name, so an option added to a stage's list reaches `m9 run` and the stage's config with no other change.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import click

from m9.config import (
    BASES,
    DEFAULT_ACTORS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_BYTES_PER_FILE,
    DEFAULT_DECODE_MEMORY,
    DEFAULT_IMAGES_PER_FILE,
    DEFAULT_K,
    DEFAULT_NEIGHBORS,
    DEFAULT_RUNTIME,
    DEFAULT_WORKDIR,
    IMAGE_EXTENSIONS,
    PRECISIONS,
    RUNTIMES,
)
from m9.errors import M9Error, TooManyRejectedError


def user_errors(fn):
    """Turn m9's user-facing exceptions, and S3 outages that outlast the retries, into click's one-line
    `Error: …` with exit code 1 (`-v` logs the traceback as well)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except M9Error as exc:
            raise click.ClickException(str(exc)) from None
        except Exception as exc:
            from m9.io.storage import outage

            error = outage(exc)
            if error is None:
                raise
            logging.getLogger("m9").debug("the S3 failure in full", exc_info=True)
            raise click.ClickException(str(error)) from None

    return wrapper


def tolerating_rejections(stage_fn, cfg) -> tuple[Any, TooManyRejectedError | None]:
    """Run a stage; one failed only by --max-errors still wrote everything, so return its result for the
    summary together with the error to raise after it."""
    try:
        return stage_fn(cfg), None
    except TooManyRejectedError as exc:
        return exc.result, exc


def options(*decorators: Callable) -> Callable:
    """Apply option decorators in the order given (the order `--help` lists them)."""

    def apply(fn: Callable) -> Callable:
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn

    return apply


#: Options whose one value fills several config fields.
_SPLIT: dict[str, Callable[[Any], dict[str, Any]]] = {
    # --k is a number of components or auto:SHARE (then k is None and variance_target the share).
    "k": lambda value: {"k": value[0], "variance_target": value[1]},
}


def config_fields(cfg_type: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of the config dataclass cfg_type that the command's option values (click's parameter
    names) give: each option fills the field of its own name."""
    expanded: dict[str, Any] = {}
    for name, value in values.items():
        expanded.update(_SPLIT[name](value) if name in _SPLIT else {name: value})
    names = {f.name for f in dataclasses.fields(cfg_type)}
    return {name: value for name, value in expanded.items() if name in names}


class _Parsed(click.ParamType):
    """A click type whose text a library function parses, raising ValueError with the message to show."""

    #: Values that are already parsed (a default, or a value passed in by a caller).
    parsed: tuple[type, ...] = ()

    def parse(self, text: str):
        raise NotImplementedError

    def convert(self, value, param, ctx):
        if isinstance(value, self.parsed):
            return value
        try:
            return self.parse(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class Extensions(_Parsed):
    """Comma-separated file extensions, e.g. jpg,png,webp."""

    name = "EXT,EXT,…"
    parsed = (tuple,)

    def parse(self, text: str):
        from m9.stages.listing import parse_extensions

        return parse_extensions(text)


class MaxErrors(_Parsed):
    """A count of images (`10`) or a fraction of them (`0.05`)."""

    name = "N|FRACTION"
    parsed = (int, float)

    def parse(self, text: str):
        from m9.config import parse_max_errors

        return parse_max_errors(text)


class Components(_Parsed):
    """`--k`: a number of components (`50`) or `auto:0.95` (as many as reach that share of the variance)."""

    name = "N|auto:SHARE"
    parsed = (tuple,)

    def parse(self, text: str):
        from m9.config import parse_k

        return parse_k(text)


def input_opt(**attrs) -> Callable:
    """`--input`: what a command reads (its default and help differ per command)."""
    return click.option("--input", "input_", metavar="SRC", **attrs)


def output_opt(**attrs) -> Callable:
    """`--output`: where a command writes (its default and help differ per command)."""
    return click.option("--output", **attrs)


workdir_opt = functools.partial(click.option, "--workdir", default=DEFAULT_WORKDIR, show_default=True)

overwrite_opt = click.option("--overwrite", is_flag=True, help="Replace what the output folder holds.")

# --- ingest -------------------------------------------------------------------------------------------------

images_per_file_opt = click.option(
    "--images-per-file",
    type=click.IntRange(min=1),
    default=DEFAULT_IMAGES_PER_FILE,
    show_default=True,
    help="At most this many images per Parquet file.",
)
bytes_per_file_opt = click.option(
    "--bytes-per-file",
    type=click.IntRange(min=1),
    default=DEFAULT_BYTES_PER_FILE,
    show_default=True,
    metavar="BYTES",
    help="At most about this many bytes of images per Parquet file (beside --images-per-file; whichever "
    "gives more files).",
)
extensions_opt = click.option(
    "--extensions",
    type=Extensions(),
    default=",".join(IMAGE_EXTENSIONS),
    show_default=True,
    help="File extensions taken as images (any case); other files are counted as ignored.",
)

# --- embed --------------------------------------------------------------------------------------------------

actors_opt = click.option(
    "--actors",
    type=click.IntRange(min=1),
    default=DEFAULT_ACTORS,
    show_default=True,
    help="Ray actors in the pool; each loads the model once.",
)
batch_opt = click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Images per forward pass.",
)
ray_opt = click.option(
    "--ray-address",
    default=None,
    metavar="ADDR",
    help="Ray cluster to join (`auto` on a cluster node, host:port); default: a local Ray.",
)
weights_opt = click.option(
    "--weights",
    type=click.Path(dir_okay=False),
    default=None,
    help="MobileNetV2 no-top Keras weights file (.h5 / .weights.h5) to use instead of the verified cache. "
    "With --runtime onnx it is converted to ONNX once (cached by the file's sha256) and checked against Keras.",
)
runtime_opt = click.option(
    "--runtime",
    type=click.Choice(RUNTIMES),
    default=DEFAULT_RUNTIME,
    show_default=True,
    help="What runs the forward pass: onnx (ONNX Runtime on the checked conversion; no TensorFlow in the "
    "actors) or keras (TensorFlow, the reference). Features agree within 1e-4 on photographs.",
)
precision_opt = click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default=PRECISIONS[0],
    show_default=True,
    help="Number format of the model: fp32, or int8 (onnx only; made once per cache and kept only if its "
    "features are within cosine 0.98 of fp32's; faster on CPUs with VNNI, docs/model.md).",
)
max_errors_opt = click.option(
    "--max-errors",
    type=MaxErrors(),
    default=None,
    help="Fail (exit 1, after writing everything) if more images than this are rejected: a count like 10 "
    "or a fraction like 0.05. Default: any number.",
)
decode_memory_opt = click.option(
    "--decode-memory",
    "decode_memory_mb",
    type=click.IntRange(min=1),
    default=DEFAULT_DECODE_MEMORY,
    show_default=True,
    metavar="MB",
    help="Most memory one image's decode may take, estimated from its header; a larger image is rejected "
    "with a reason naming this option (the default embeds a 13,000×13,000 drawing).",
)
store_opt = click.option(
    "--store",
    default="auto",
    show_default=True,
    metavar="auto|URI|none",
    help="Feature store asked by sha256 before the model runs, so an image's bytes are embedded once per "
    "model, ever: auto ($M9_STORE if set, else ~/.cache/m9/store for a local output, s3://BUCKET/store for "
    "an s3:// one), a folder or s3:// URI, or none. The output is the same either way.",
)

# --- reduce -------------------------------------------------------------------------------------------------

k_opt = click.option(
    "--k",
    type=Components(),
    default=DEFAULT_K,
    show_default=True,
    help="Principal components to keep, or auto:0.95 for the smallest number that explains 95 % of the "
    "variance (chosen from one PCA fit with every component; the choice and why are in variance.json).",
)

basis_opt = click.option(
    "--basis",
    type=click.Choice(BASES),
    default=BASES[0],
    show_default=True,
    help="When the input changed: refit PCA on it, or keep the basis (mean and components) the output holds "
    "and project onto it, so the coordinates of unchanged images stay exactly put (keep fits when there is "
    "no basis yet; variance.json then gives the kept components' share of the new data's variance).",
)

# --- evaluate -----------------------------------------------------------------------------------------------

neighbors_opt = click.option(
    "--neighbors",
    type=click.IntRange(min=1),
    default=DEFAULT_NEIGHBORS,
    show_default=True,
    help="Neighbours that vote in the k-nearest-neighbour classifier.",
)

#: Each stage's options that `m9 run` takes too (the stage's command may take more: where it reads and
#: writes, and ingest's --images-per-file), in the order `--help` lists them.
INGEST_OPTIONS = (bytes_per_file_opt, extensions_opt)
EMBED_OPTIONS = (
    actors_opt,
    batch_opt,
    ray_opt,
    weights_opt,
    runtime_opt,
    precision_opt,
    max_errors_opt,
    decode_memory_opt,
    store_opt,
)
REDUCE_OPTIONS = (k_opt, basis_opt)
RUN_OPTIONS = (*INGEST_OPTIONS, *EMBED_OPTIONS, *REDUCE_OPTIONS)
