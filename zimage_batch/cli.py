"""The `zimage-batch` command line."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import click

from zimage_batch.inputs.manifest import ManifestError
from zimage_batch.jobspec import FORMATS, JobError, load_job
from zimage_batch.model.checkpoint import ModelSourceError
from zimage_batch.model.variants import VARIANTS
from zimage_batch.output.lease import LeaseHeld
from zimage_batch.output.ledger import JobMismatch
from zimage_batch.output.overlaps import OverlappingShards
from zimage_batch.storage import StorageError
from zimage_batch.text import first_line, plural

# Errors with a message meant for the user: printed as one line, no traceback.
USER_ERRORS = (JobError, ManifestError, ModelSourceError, StorageError, JobMismatch, FileExistsError, LeaseHeld,
               OverlappingShards)


def _fail(exc: BaseException) -> None:
    click.echo(f"error: {first_line(exc)}", err=True)
    sys.exit(2)


def _quiet_libraries(load: bool = False) -> None:
    """Quiet diffusers/transformers. Unless `load`, they are not imported here (torch takes
    seconds to import, and `run` must refuse a bad manifest at once): their verbosity is set
    through the environment, which they read when they are first imported."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if not load and not ("diffusers" in sys.modules and "transformers" in sys.modules):
        return
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


class OneLineErrors(click.Group):
    """Every failure ends in one `error:` line on stderr: click's usage errors, which
    it prints as a usage block, and unexpected exceptions, which would print a traceback."""

    def main(self, args: list[str] | None = None, prog_name: str | None = None, **extra: Any) -> None:  # type: ignore[override]
        extra.pop("standalone_mode", None)
        try:
            code = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # bare `zimage-batch`: the help
            click.echo(exc.ctx.get_help() if exc.ctx else exc.format_message())
            sys.exit(0)
        except click.UsageError as exc:
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            click.echo(f"error: {exc.format_message()}{where}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except (click.Abort, KeyboardInterrupt):
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - one line, not a traceback
            logging.getLogger(__name__).debug("failed", exc_info=True)
            click.echo(f"error: {type(exc).__name__}: {first_line(str(exc))}", err=True)
            sys.exit(1)
        sys.exit(code or 0)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Batch inference for the Z-Image family on Ray: Parquet manifests in, images and metadata out."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("job_file", required=False, type=click.Path(dir_okay=False))
@click.option("--manifest", help="Parquet file or folder, local or s3://")
@click.option("--output", help="Output folder, local or s3://")
@click.option("--model", help="A hub id (default Tongyi-MAI/Z-Image-Turbo), a local or s3:// folder, or "
              "tiny:<variant> (random weights: noise, for tests)")
@click.option("--variant", type=click.Choice(list(VARIANTS)), help="Variant of the model (inferred when omitted)")
@click.option("--format", "format_", type=click.Choice(FORMATS), help="Output format (default files)")
@click.option("--workers", type=int, help="Workers (default: one per GPU, or 1 on CPU)")
@click.option("--batch-size", type=int, help="Rows per batch (default: from device memory)")
@click.option("--shard-size", type=int, help="Rows per shard (default 1000)")
@click.option("--address", help="Ray cluster address (default: start a local cluster)")
@click.option("--verbose", is_flag=True, help="Also print Ray's own warnings (they are in Ray's logs either way)")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Any job setting, e.g. --set width=512")
@click.option("--overwrite", is_flag=True, default=None, help="Replace a different job's output in OUTPUT")
@click.option("--wait", is_flag=True, default=None,
              help="When another run is writing OUTPUT, wait for it to end instead of refusing")
def run(job_file: str | None, format_: str | None, settings: tuple[str, ...], **flags: Any) -> None:
    """Run a job: JOB_FILE (YAML) and/or flags; flags override the file."""
    _quiet_libraries()
    from zimage_batch.run.cluster import quiet_ray
    from zimage_batch.run.driver import run_job

    quiet_ray(flags.pop("verbose"))

    try:
        job = load_job(job_file, {**flags, "format": format_}, list(settings))
        summary = run_job(job, echo=lambda line: click.echo(line))
    except USER_ERRORS as exc:
        _fail(exc)
    except KeyboardInterrupt:
        click.echo("error: interrupted; run again to resume", err=True)
        sys.exit(130)
    click.echo(
        f"done: {summary.rows_ok} ok, {summary.rows_error} error"
        f"{f', {summary.rows_filtered} filtered' if summary.rows_filtered else ''} of {summary.rows_total} rows"
        f"{_images_note(summary)}; "
        f"{plural(summary.shards_committed, 'shard')} committed in {summary.elapsed_s:.1f}s"
    )
    for worker in summary.workers:
        click.echo(f"worker {worker['worker']}: busy {worker['busy_fraction']:.0%} of {worker['wall_s']:.1f}s")
    for shard, reason in summary.failed.items():
        click.echo(f"failed shard {shard}: {reason}", err=True)
    if summary.problem:
        click.echo(f"error: {summary.problem}", err=True)
    click.echo(f"output: {summary.output}")
    _write_card(summary.output)
    if job.report:
        _write_report(summary.output)
    if summary.throughput is not None:  # the last line: the same figures as status and the report
        click.echo(f"throughput: {summary.throughput.text()}")
    sys.exit(summary.exit_code)


def _images_note(summary: Any) -> str:
    """' (4,000 images)' when rows draw several images (then ok and error count images)."""
    images = summary.rows_ok + summary.rows_error + summary.rows_filtered
    return f" ({images:,} images)" if summary.rows_done is not None and images != summary.rows_done else ""


def _write_report(output: str) -> None:
    """Write OUTPUT/report.html and say where; a failure here is reported, not fatal."""
    from zimage_batch.output.report import write_report

    try:
        click.echo(f"report: {write_report(output)}")
    except Exception as exc:  # noqa: BLE001 - the job itself is done
        click.echo(f"warning: could not write the report: {first_line(exc)}", err=True)


def _write_card(output: str) -> None:
    """Write OUTPUT/README.md, the dataset card `load_dataset(OUTPUT)` reads; a failure is reported, not fatal."""
    from zimage_batch.output.dataset_card import write_dataset_card

    try:
        click.echo(f"dataset card: {write_dataset_card(output)}")
    except Exception as exc:  # noqa: BLE001 - the job itself is done
        click.echo(f"warning: could not write the dataset card: {first_line(exc)}", err=True)


@main.command("status")
@click.argument("output")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON")
def status_command(output: str, as_json: bool) -> None:
    """Shards and rows done / failed / left of the job in OUTPUT, throughput so far, last errors.

    Reads OUTPUT only: works while the job runs, from any machine, and after it ended."""
    from zimage_batch.output.status import NoJob, format_status, status

    try:
        figures = status(output)
    except (NoJob, ValueError, *USER_ERRORS) as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(figures, indent=2, ensure_ascii=False))
    else:
        for line in format_status(figures):
            click.echo(line)
    if figures.get("overlaps"):
        click.echo(f"error: {figures['overlaps']}", err=True)
        sys.exit(1)


@main.command("report")
@click.argument("output")
def report_command(output: str) -> None:
    """Write OUTPUT/report.html: gallery (prompt, seed, id), errors, throughput, workers, settings."""
    from zimage_batch.output.report import write_report
    from zimage_batch.output.status import NoJob, status

    try:
        location = write_report(output)
        figures = status(output)
    except (NoJob, ValueError, *USER_ERRORS) as exc:
        _fail(exc)
    click.echo(f"report: {location}")
    if figures.get("overlaps"):
        click.echo(f"error: {figures['overlaps']}", err=True)
        sys.exit(1)


@main.command("repair")
@click.argument("output")
@click.option("--wait", is_flag=True, help="When a run is writing OUTPUT, wait for it to end instead of refusing")
def repair_command(output: str, wait: bool) -> None:
    """Remove the later of overlapping committed shards (left by older versions or a run that
    lost its lease), so that each row is in OUTPUT once; the next run redraws rows left uncovered."""
    from zimage_batch.output.repair import NothingToRepair, repair
    from zimage_batch.storage import open_storage

    try:
        storage = open_storage(output)
        removed = repair(storage, echo=click.echo, wait=wait)
    except (NothingToRepair, ValueError, *USER_ERRORS) as exc:
        _fail(exc)
    if not removed:
        click.echo(f"{storage.uri}: no overlapping shards, nothing to repair")
        return
    click.echo(f"{storage.uri}: removed {len(removed)} overlapping shard{'s' if len(removed) > 1 else ''}; "
               "each row is now there at most once; run the job again to generate the rows only they held")


@main.command()
@click.argument("manifest", required=False)
@click.option("--job", "job_file", type=click.Path(dir_okay=False), help="A job file: its manifest or template")
@click.option("--variant", type=click.Choice(list(VARIANTS)), help="Variant of the model (default: the job's, or turbo)")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Job defaults, e.g. --set width=512")
def validate(manifest: str | None, job_file: str | None, variant: str | None, settings: tuple[str, ...]) -> None:
    """Check MANIFEST (schema and every value), or a job file's manifest or template, without a
    model or a GPU."""
    from zimage_batch.run.estimate import count_images, estimate
    from zimage_batch.run.preflight import check_manifest

    try:
        overrides = {"manifest": manifest, "output": "-", "variant": variant or (None if job_file else "turbo")}
        job = load_job(job_file, overrides, list(settings))
        m, resolved = check_manifest(job, warn=lambda line: click.echo(line, err=True))
    except USER_ERRORS as exc:
        _fail(exc)
    if resolved.template is not None:
        click.echo(f"ok: {plural(m.num_rows, 'row')} expanded from template {resolved.template.name!r} "
                   f"({resolved.template.describe()}) in {plural(len(m.files), 'part')}")
    else:
        click.echo(f"ok: {plural(m.num_rows, 'row')} in {plural(len(m.files), 'file')}, {m.kind} manifest")
    images, _ = count_images(m, job.num_images)
    click.echo(estimate(m.num_rows, images, images, job.gpu_seconds_per_image).line())


@main.command("make-tiny-model")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--variant", type=click.Choice(list(VARIANTS)), default="turbo", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--lora", "loras", multiple=True, metavar="NAME",
              help="Also write DIRECTORY/NAME.safetensors, a random LoRA adapter for this model (repeatable); "
                   "with a checkpoint already in DIRECTORY, only the adapters are written")
@click.option("--lora-format", type=click.Choice(["diffusers", "kohya"]), default="diffusers", show_default=True,
              help="Key layout of the adapters: diffusers/PEFT, or the community lora_unet_ one")
@click.option("--controlnet", "controlnet", type=click.Choice(["1.0", "2.0", "2.1"]),
              help="Write a tiny ControlNet Union of this version instead (matching the tiny models): "
                   "one .safetensors file when DIRECTORY ends in .safetensors, else a diffusers folder")
@click.option("--scorer", type=click.Choice(["clip", "aesthetic", "nsfw"]),
              help="Write a tiny scorer of this kind instead (for scores: tests and demos): a transformers folder "
                   "(clip, nsfw), or for aesthetic DIRECTORY/aesthetic.safetensors (or DIRECTORY itself if it ends "
                   "in .safetensors)")
@click.option("--prompt-model", is_flag=True,
              help="Write a tiny random causal LM (Qwen3 layout, chat template) for prompt_expansion instead")
@click.option("--segmenter", is_flag=True,
              help="Write a tiny random CLIPSeg folder instead (the `segmenter` of masks from words)")
def make_tiny_model_command(directory: str, variant: str, seed: int, loras: tuple[str, ...], lora_format: str,
                            controlnet: str | None, scorer: str | None, prompt_model: bool, segmenter: bool) -> None:
    """Write a tiny random-init checkpoint of VARIANT to DIRECTORY (draws noise; for tests and demos)."""
    if "://" in directory:
        _fail(ValueError(f"make-tiny-model writes a local folder, not {directory}; copy it there afterwards "
                         "(e.g. aws s3 sync DIR s3://...), and --model takes the s3:// folder"))
    _quiet_libraries(load=True)
    if prompt_model:
        from zimage_batch.model.prompt_model import make_tiny_prompt_model

        click.echo(f"tiny prompt-expansion model (random: it writes noise) written to "
                   f"{make_tiny_prompt_model(directory, seed)}")
        return
    from zimage_batch.inputs.lora_spec import LoraSpecError, check_adapter_name
    from zimage_batch.model.tiny import make_tiny_model
    from zimage_batch.model.tiny_adapters import make_tiny_adapter
    from zimage_batch.model.tiny_controlnet import make_tiny_controlnet

    try:
        if scorer:
            from zimage_batch.curate.tiny import make_tiny_scorer

            click.echo(f"tiny {scorer} scorer written to {make_tiny_scorer(directory, scorer, seed)}")
            return
        if segmenter:
            from zimage_batch.model.segmenter import make_tiny_segmenter

            click.echo(f"tiny CLIPSeg segmenter written to {make_tiny_segmenter(directory, seed)}")
            return
        if controlnet:
            folder = not directory.endswith(".safetensors")
            path = make_tiny_controlnet(directory, controlnet, seed, folder=folder)
            click.echo(f"tiny ControlNet {controlnet} {'folder' if folder else 'file'} written to {path}")
            return
        for name in loras:
            check_adapter_name(name)
        if not (loras and os.path.isfile(os.path.join(directory, "model_index.json"))):
            click.echo(f"tiny {variant} checkpoint written to {make_tiny_model(directory, variant, seed)}")
        for name in loras:
            path = make_tiny_adapter(directory, os.path.join(directory, f"{name}.safetensors"), name, lora_format)
            click.echo(f"tiny LoRA adapter {name!r} ({lora_format} keys) written to {path}")
    except (LoraSpecError, *USER_ERRORS) as exc:
        _fail(exc)


@main.command("dedup")
@click.argument("output")
@click.option("--threshold", type=float, default=0.95, show_default=True,
              help="Cosine similarity of CLIP image embeddings at or over which two images are near-duplicates")
def dedup_command(output: str, threshold: float) -> None:
    """Find near-duplicate images in OUTPUT (a job run with embeddings: true) and write the pairs
    to OUTPUT/duplicates.parquet; committed shards are only read."""
    from zimage_batch.output.dedup import DedupError, dedup

    try:
        result = dedup(output, threshold)
    except (DedupError, *USER_ERRORS) as exc:
        _fail(exc)
    click.echo(f"dedup: {result.pairs} pair(s) at cosine >= {threshold} among {result.images} images "
               f"({result.seconds:.1f} s); written to {output.rstrip('/')}/{result.key}")


@main.command()
@click.argument("job_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--address", required=True, help="Ray dashboard / Jobs API address, e.g. http://HEAD:8265")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Job settings passed to the run")
@click.option("--pip", multiple=True, help="Extra pip requirements for the job's runtime environment")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Follow the job's logs until it ends")
@click.option("--verbose", is_flag=True, help="Also print Ray's own warnings")
def submit(job_file: str, address: str, settings: tuple[str, ...], pip: tuple[str, ...], wait: bool,
           verbose: bool) -> None:
    """Run JOB_FILE on a Ray cluster through the Ray Jobs API."""
    from zimage_batch.run.cluster import quiet_ray
    from zimage_batch.submit import submit_job

    quiet_ray(verbose)

    try:
        code = submit_job(job_file, address, list(settings), wait=wait, pip=list(pip), echo=click.echo)
    except USER_ERRORS as exc:
        _fail(exc)
    except (ConnectionError, RuntimeError) as exc:
        _fail(RuntimeError(f"cannot submit to {address}: {exc}"))
    sys.exit(code)


if __name__ == "__main__":
    main()
