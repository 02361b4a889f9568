"""`squeeze export MODEL_URI --format FORMAT --out DIR`: a compressed model in another runtime's layout.

MODEL_URI is a registered version (`models:/NAME/VERSION` or `models:/NAME@alias`) or a
local folder written by `save_compressed`. Before anything is exported the source is
verified: a registered version's download against its `squeezeflow.model_sha256` tag
(`registry/fetch.py`), a local folder against its manifest. A registered version then
records the export: the tag `squeezeflow.export.<format>.sha256` and the folder as
artifacts of its run (`registry/exports.py`).

Exit codes: 0 exported; 2 refused (unknown format, bad URI, a file that does not match
its hash, a model the format cannot hold), with a message naming the problem.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

EXIT_INVALID = 2  # the same code as an invalid recipe: nothing was exported

console = Console()
errors = Console(stderr=True)
log = logging.getLogger(__name__)


def _refuse(message: str) -> typer.Exit:
    errors.print(f"[bold red]export refused[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(EXIT_INVALID)


def export(
    model_uri: Annotated[str, typer.Argument(
        help="models:/NAME/VERSION, models:/NAME@alias, or a folder written by save_compressed",
        show_default=False)],
    format: Annotated[str, typer.Option(  # noqa: A002 - the option's name
        "--format", help="gguf, compressed-tensors or gptq", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="the folder to write", show_default=False)],
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI")] = None,
) -> None:
    """Export a compressed model for llama.cpp (gguf), vLLM (compressed-tensors) or GPTQ loaders."""
    from squeezeflow.compression.exports import export_formats

    if format not in export_formats():
        raise _refuse(f"unknown format {format!r}; valid formats: {', '.join(export_formats())}")
    registered = model_uri.startswith("models:/")
    if registered:
        record = _export_registered(model_uri, format, out, tracking_uri)
    else:
        folder = Path(model_uri).expanduser()
        if not folder.is_dir():
            raise _refuse(f"{model_uri} is neither a registered version (models:/NAME/VERSION, "
                          "models:/NAME@alias) nor a folder")
        record = _export(folder, format, out)
    console.print(f"[green]exported[/] {model_uri} as {format} to {record.folder}")
    console.print(f"  sha256 {record.sha256}")
    for name, value in sorted(record.figures.items()):
        console.print(f"  {name} {value:.6g}")
    if registered:
        from squeezeflow.registry.exports import EXPORTS_ARTIFACT_DIR, export_tag, record_export

        record_export(model_uri, record, tracking_uri)
        console.print(f"  recorded on {model_uri}: tag {export_tag(format)}, artifacts "
                      f"{EXPORTS_ARTIFACT_DIR}/{format}/ of its run", soft_wrap=True)


def _export_registered(uri: str, format: str, out: Path,  # noqa: A002
                       tracking_uri: str | None):  # type: ignore[no-untyped-def]
    from squeezeflow.compression.integrity import IntegrityError
    from squeezeflow.registry.exports import find_version
    from squeezeflow.registry.fetch import download_model
    from squeezeflow.settings import apply_defaults

    apply_defaults()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file is noise
    try:
        find_version(uri, tracking_uri)
    except LookupError as error:
        raise _refuse(str(error)) from None
    with tempfile.TemporaryDirectory(prefix="squeezeflow-export-") as scratch:
        try:
            folder = download_model(uri, tracking_uri, Path(scratch))
        except IntegrityError as error:  # names the file that differs from the version's hash
            raise _refuse(f"{uri} does not match its registered hash: {error.file}: "
                          f"{error.reason}") from None
        except FileNotFoundError as error:
            raise _refuse(str(error)) from None
        return _export(folder, format, out)


def _export(folder: Path, format: str, out: Path):  # type: ignore[no-untyped-def]  # noqa: A002
    from squeezeflow.compression.exports import NotExportableError, export_model
    from squeezeflow.compression.integrity import IntegrityError

    try:
        return export_model(folder, format, out)
    except IntegrityError as error:
        raise _refuse(f"{folder} does not match its manifest: {error.file}: {error.reason}") from None
    except (NotExportableError, FileNotFoundError, FileExistsError) as error:
        raise _refuse(str(error)) from None
