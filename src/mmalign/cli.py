"""`mmalign`: caption, embed and search with a trained checkpoint, outside the DVC pipeline.

The console command of pyproject.toml, so it lives in the package; it is the one library module that
imports click (as tracking.py is for mlflow) and holds no ML logic: the work is in inference.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

import click

DEVICES = ("cpu", "cuda", "mps", "auto")
TABLE_SUFFIXES = (".csv", ".jsonl")
EMBED_SUFFIXES = (".npy", ".parquet")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A problem the user can fix ends the command with its one-line message, not a traceback."""
    from .serving.inference import InputError

    try:
        yield
    except InputError as e:
        raise click.ClickException(str(e)) from None


def check_suffix(output: Path | None, allowed: Sequence[str]) -> None:
    """Fail before any model loads when the output format is unknown."""
    if output is not None and output.suffix.lower() not in allowed:
        raise click.BadParameter(f"{output}: the file name must end in {' or '.join(allowed)}",
                                 param_hint="'--output'")


def write_table(rows: list[dict], output: Path) -> None:
    """rows -> .csv or .jsonl, atomically."""
    import pandas as pd

    from .utils import atomic_path

    with atomic_path(output) as tmp:
        if output.suffix.lower() == ".csv":
            pd.DataFrame(rows).to_csv(tmp, index=False)
        else:
            tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def report(message: str) -> None:
    click.echo(message, err=True)  # stdout carries results only, so it can be piped


model_option = click.option("--model", type=click.Path(path_type=Path, file_okay=False), default=None,
                            help="An exported model directory (`mmalign export`); replaces --aligner/--projector "
                                 "and works from any directory.")
aligner_option = click.option("--aligner", default="models/aligner", show_default=True,
                              type=click.Path(path_type=Path, file_okay=False), help="Phase 1 checkpoint directory.")
device_option = click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                             help="Where the models run (auto: cuda, then mps, then cpu).")
strict_option = click.option("--strict", is_flag=True,
                             help="Stop at the first unreadable image or audio file instead of skipping it with a "
                                  "warning.")
audio_help = "An audio file (.wav, .flac, .ogg, .mp3) or a directory of them (repeatable)."
dim_option = click.option("--dim", type=click.IntRange(min=1), default=None,
                          help="Matryoshka embedding size: a prefix of the aligned embedding, re-normalised. "
                               "One of the trained sizes (the checkpoint's mrl_dims); default: the full d_align.")


def embedding_options(command):
    """The options embed and search share: batch size, which checkpoint, where it runs, bad-file policy."""
    for option in reversed((click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True),
                            aligner_option, model_option, device_option, strict_option)):
        command = option(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mmalign")
def mmalign() -> None:
    """Use a trained mmalign checkpoint: caption images and audio, embed images, audio or texts, search images
    or audio by text.

    Checkpoints name their frozen models by the paths `dvc repro` wrote (relative to the repo root),
    so run these commands from the repo root, or export the model (`mmalign export --out DIR`) and pass
    `--model DIR` from anywhere.
    """
    # Nothing heavy here: this runs before a subcommand's --help too, which must not import torch.
    level = os.environ.get("MMALIGN_LOG_LEVEL", "WARNING").upper()
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def quiet_loading() -> None:
    """No "Loading weights" bar per model; the bars of the work itself stay. Called once a command runs."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def report_skipped(skipped: list[tuple[Path, str]] | None, modality: str | None = "image") -> None:
    """One warning naming the files left out; `modality` None: files of several modalities."""
    if skipped:
        from .serving.inference import plural

        report(f"warning: skipped {len(skipped)} unreadable {plural(modality, len(skipped))}: "
               + ", ".join(str(p) for p, _ in skipped) + " (--strict stops at the first instead)")


def checkpoints(model: Path | None, aligner: Path, projector: Path | None = None) -> tuple[Path, Path | None]:
    """--model DIR (an export) or the --aligner/--projector checkpoint directories."""
    if model is None:
        return aligner, projector
    from .serving.inference import model_dirs

    with user_errors():
        return model_dirs(model)


def kept(paths: list[Path], skipped: list[tuple[Path, str]] | None) -> list[Path]:
    gone = {p for p, _ in skipped or ()}
    return [p for p in paths if p not in gone]


@mmalign.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@aligner_option
@click.option("--projector", default="models/projector", show_default=True,
              type=click.Path(path_type=Path, file_okay=False), help="Phase 2 checkpoint directory.")
@click.option("--prompt", default=None,
              help="Prompt for the LLM. Default: the one the projector was trained with for the file's modality.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=48, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="captions.csv or captions.jsonl (columns image, caption; audio instead of image when every "
                   "file is audio, file when they mix). Default: stdout, one 'FILE<TAB>CAPTION' line per file.")
@model_option
@device_option
@strict_option
def caption(files: tuple[Path, ...], aligner: Path, projector: Path, prompt: str | None, max_new_tokens: int,
            batch_size: int, output: Path | None, model: Path | None, device: str, strict: bool) -> None:
    """Caption FILES (images, audio clips, or directories of them) with a trained aligner + projector + LLM.

    A file is audio by its extension (.wav, .flac, .ogg, .mp3), else an image; a list may mix them. A
    directory stands for its files of the modalities the aligner was trained on.
    Greedy decoding: the same files always get the same captions. An unreadable file is skipped with
    a warning (no row in the output), unless --strict.
    """
    check_suffix(output, TABLE_SUFFIXES)
    quiet_loading()
    from .serving.inference import (caption_files, list_files, load_captioner, modalities_of, modality_of,
                                    resolve_device, trained_modalities)

    aligner, projector = checkpoints(model, aligner, projector)
    if projector is None:
        raise click.UsageError(f"the model in {model} has no projector (an aligner-only export): it cannot caption")
    skipped: list | None = None if strict else []
    with user_errors():
        # a directory holds the files of the modalities the aligner was trained on; a file named is captioned
        paths = list_files(files, ("image", "audio"), expand=trained_modalities(aligner))
        found = modalities_of(paths)
        mm = load_captioner(aligner, projector, device=resolve_device(device), need=found)
        captions = caption_files(mm, paths, prompt, max_new_tokens, batch_size, skipped)
    paths = kept(paths, skipped)
    report_skipped(skipped, modality_of(p for p, _ in skipped or ()))
    if output is None:
        for path, text in zip(paths, captions):
            click.echo(f"{path}\t{text}")
        return
    column = found[0] if len(found) == 1 else "file"
    write_table([{column: str(p), "caption": c} for p, c in zip(paths, captions)], output)
    report(f"wrote {len(captions)} captions to {output}")


@mmalign.command()
@click.argument("more", nargs=-1, metavar="[MORE]...")
@click.option("--images", multiple=True, type=click.Path(path_type=Path),
              help="An image file or a directory of images (repeatable).")
@click.option("--audio", multiple=True, type=click.Path(path_type=Path), help=audio_help)
@click.option("--texts", multiple=True,
              help="A text, or a file with one text per line (repeatable).")
@dim_option
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="out.npy (float32 array, one row per input, in input order) or out.parquet "
                   "(columns image, audio or text, and embedding).")
@embedding_options
def embed(more: tuple[str, ...], images: tuple[Path, ...], audio: tuple[Path, ...], texts: tuple[str, ...],
          dim: int | None, output: Path, batch_size: int, aligner: Path, model: Path | None, device: str,
          strict: bool) -> None:
    """Embed images, audio or texts into the aligned space, unit-norm, at a chosen Matryoshka size.

    Give one of --images, --audio or --texts; further arguments (MORE) add to that list, so a shell glob
    works: `mmalign embed --images photos/*.jpg -o photos.npy`. Directories are searched recursively, files
    come in sorted order. An unreadable image or audio file is skipped with a warning (no row in the output),
    unless --strict.
    """
    given = {kind: values for kind, values in (("image", images), ("audio", audio), ("text", texts)) if values}
    if len(given) != 1:
        raise click.UsageError("give either --images, --audio or --texts (one of them, not more)")
    check_suffix(output, EMBED_SUFFIXES)
    quiet_loading()
    import numpy as np

    from .serving.inference import embed_files, embed_texts, list_files, load_aligner, read_texts, resolve_device
    from .utils import atomic_path

    [(kind, values)] = given.items()
    aligner = checkpoints(model, aligner)[0]
    skipped: list | None = None if strict else []
    with user_errors():
        items: list = read_texts([*values, *more]) if kind == "text" else list_files([*values, *more], (kind,))
        net = load_aligner(aligner, (kind,), device=resolve_device(device), dim=dim)
        if kind == "text":
            z = embed_texts(net, items, dim, batch_size)
        else:
            z = embed_files(net, items, kind, dim, batch_size, skipped)
            items = kept(items, skipped)
        z = z.numpy().astype(np.float32)  # (N, dim)
    report_skipped(skipped, kind)
    with atomic_path(output) as tmp:
        if output.suffix.lower() == ".npy":
            with open(tmp, "wb") as f:  # np.save on a path would append .npy to the temporary name
                np.save(f, z)
        else:
            import pandas as pd

            pd.DataFrame({kind: [str(i) for i in items], "embedding": list(z)}).to_parquet(tmp, index=False)
    report(f"wrote {z.shape[0]} {kind} embeddings of size {z.shape[1]} to {output}")


@mmalign.command()
@click.argument("query")
@click.option("--images", multiple=True, type=click.Path(path_type=Path),
              help="A directory of images, or an image file (repeatable).")
@click.option("--audio", multiple=True, type=click.Path(path_type=Path), help=audio_help)
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True)
@dim_option
@click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="results.csv or results.jsonl (columns rank, score, image or audio). Default: stdout, "
                   "one 'SCORE<TAB>FILE' line per result, best first.")
@embedding_options
def search(query: str, images: tuple[Path, ...], audio: tuple[Path, ...], top_k: int, dim: int | None,
           output: Path | None, batch_size: int, aligner: Path, model: Path | None, device: str, strict: bool) -> None:
    """Rank the images under --images (or the audio files under --audio) by how well they match the text
    QUERY (cosine similarity). An unreadable file is skipped with a warning, unless --strict."""
    if bool(images) == bool(audio):
        raise click.UsageError("give either --images or --audio (one of them, not both)")
    check_suffix(output, TABLE_SUFFIXES)
    quiet_loading()
    from .serving.inference import embed_files, embed_texts, list_files, load_aligner, plural, rank, resolve_device

    modality = "image" if images else "audio"
    aligner = checkpoints(model, aligner)[0]
    skipped: list | None = None if strict else []
    with user_errors():
        paths = list_files(images or audio, (modality,))
        net = load_aligner(aligner, (modality, "text"), device=resolve_device(device), dim=dim)
        z_items = embed_files(net, paths, modality, dim, batch_size, skipped)  # (N, dim)
        z_query = embed_texts(net, [query], dim)[0]  # (dim,)
    paths = kept(paths, skipped)
    report_skipped(skipped, modality)
    indices, scores = rank(z_query, z_items, top_k)
    rows = [{"rank": r + 1, "score": round(s, 6), modality: str(paths[i])}
            for r, (i, s) in enumerate(zip(indices, scores))]
    if output is None:
        for row in rows:
            click.echo(f"{row['score']:.4f}\t{row[modality]}")
        return
    write_table(rows, output)
    report(f"wrote the top {len(rows)} of {len(paths)} {plural(modality, len(paths))} to {output}")


@mmalign.command()
@click.option("--out", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="The directory to write (replaced if it exists).")
@aligner_option
@click.option("--projector", default="models/projector", show_default=True,
              type=click.Path(path_type=Path, file_okay=False), help="Phase 2 checkpoint directory.")
@click.option("--no-projector", is_flag=True, help="Export the aligner alone (embed and search only).")
@click.option("--copy-models", is_flag=True,
              help="Copy the local frozen models (vision tower, LLM) into the directory, so it can move to "
                   "another machine. Default: name them by absolute path. Hub ids stay hub ids.")
def export(out: Path, aligner: Path, projector: Path, no_projector: bool, copy_models: bool) -> None:
    """Write a trained model as one directory that loads from any working directory.

    Use it with `mmalign caption --model OUT` (and embed/search), or in Python:
    `mmalign.from_pretrained(OUT)`. Run it where the checkpoints were trained (the repo root).
    """
    from .serving.export import export_model

    try:
        export_model(aligner, None if no_projector else projector, out, copy_models=copy_models)
    except FileNotFoundError as e:
        raise click.ClickException(str(e)) from None
    report(f"exported the model to {out}" + (" (frozen models copied in)" if copy_models else ""))


@mmalign.command()
@click.argument("target", required=False)
@click.option("--experiment", default="mmalign", show_default=True,
              help="The experiment to pick the best evaluate run from when TARGET is not given.")
@click.option("--name", default="mmalign-captioner", show_default=True, help="Registered model name.")
@click.option("--alias", default="champion", show_default=True, help="The alias the new version gets.")
@click.option("--metric", default="CIDEr", show_default=True,
              help="Headline metric (eval/metrics.json key) that picks the best run, highest first.")
def register(target: str | None, experiment: str, name: str, alias: str, metric: str) -> None:
    """Register a trained captioner in the MLflow Model Registry and point an alias at it.

    TARGET: an evaluate run id, or an experiment name (the best finished evaluate run by --metric).
    The version's description holds the headline metrics beside their baselines, a params hash and the
    data; serve it with `mlflow models serve -m models:/NAME@ALIAS`. Uses the repo's MLflow store
    (run from the repo root) or MLFLOW_TRACKING_URI.
    """
    from .serving.registry import register as register_model

    try:
        version = register_model(target, experiment, name, alias, metric)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    report(f"registered models:/{name}/{version.version} (alias @{alias}) from run {version.run_id}:\n"
           + version.description)
    click.echo(f"models:/{name}@{alias}")


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point of `mmalign` (pyproject.toml [project.scripts])."""
    from .entry import process_env

    process_env()
    mmalign.main(args=list(argv) if argv is not None else None, prog_name="mmalign")


if __name__ == "__main__":
    main()
