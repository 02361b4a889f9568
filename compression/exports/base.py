"""The export framework: a catalog of exporters and the record of one export.

An exporter turns a folder written by `save_compressed` (the packed model) into the
layout another runtime loads: `gguf` (llama.cpp), `compressed-tensors` (vLLM and
transformers), `gptq` (transformers + optimum/gptqmodel). Each one is a module with

    def export(source: Path, out: Path) -> dict[str, float]

that writes into the folder `out` and returns its figures (e.g. the error added by a
requantization), measured while exporting. Under `export_model`, `out` is an empty
temporary folder beside the target, renamed into place once the exporter returned and
its manifest was written, so a failed or killed export leaves nothing at the target.
An exporter that cannot express a model raises `NotExportableError` saying why. Each reads the weights through the weight
formats (`compression/formats/`), never through a byte layout of its own.

The catalog maps a format name to the exporter's module path, imported only when that
format is asked for: the CLI and the recipe parser list and validate the formats
without importing `gguf`, `compressed_tensors` or torch.

`export_model` checks the source folder against its manifest first, runs the exporter,
then hashes what it wrote into the export's manifest: `ExportRecord.sha256` is that
manifest's digest (`compression/integrity.py`), the same kind of content hash a
registered version carries for its model folder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from importlib import import_module
from pathlib import Path
from types import MappingProxyType
from typing import cast

from pydantic import BaseModel, ConfigDict

from squeezeflow.compression.integrity import (
    MANIFEST,
    atomic_folder,
    has_manifest,
    verify_folder,
    write_manifest,
)

log = logging.getLogger(__name__)

Exporter = Callable[[Path, Path], dict[str, float]]

# format name -> module holding `export(source, out)`; read-only, imported lazily.
EXPORTERS: Mapping[str, str] = MappingProxyType({
    "gguf": "squeezeflow.compression.exports.gguf",
    "compressed-tensors": "squeezeflow.compression.exports.compressed_tensors",
    "gptq": "squeezeflow.compression.exports.gptq",
})


class UnknownExportFormatError(ValueError):
    """An export format the catalog does not know; the message lists the known ones."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown export format {name!r}; valid formats: {', '.join(export_formats())}")
        self.name = name


class NotExportableError(ValueError):
    """The model cannot be written in the asked format; the message says why (raised by
    the exporters, e.g. `gptq` for a model without integer-quantized Linears)."""


class ExportRecord(BaseModel):
    """One export: which format, where it was written, its content digest, its figures."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: str
    folder: Path
    sha256: str  # digest of the folder's manifest (compression/integrity.py)
    figures: dict[str, float]


def export_formats() -> list[str]:
    """The format names `export_model` accepts, in catalog order."""
    return list(EXPORTERS)


def exporter(name: str) -> Exporter:
    """The `export` function of format `name` (its module imported now)."""
    if name not in EXPORTERS:
        raise UnknownExportFormatError(name)
    module = import_module(EXPORTERS[name])
    return cast(Exporter, module.export)


def export_model(source: Path, format: str, out: Path) -> ExportRecord:  # noqa: A002 - the CLI's word
    """Export the squeezeflow folder `source` to `format` under `out`.

    The source is verified against its manifest before anything is written (an
    IntegrityError names the file that changed); a source without a manifest is refused,
    since its content could not be vouched for in the export's record.
    """
    source, out = Path(source), Path(out)
    export = exporter(format)  # unknown format: refused before any file is read
    if not has_manifest(source):
        raise FileNotFoundError(f"{source} has no {MANIFEST}: export reads folders written by "
                                "save_compressed (or a registered version's model folder)")
    verify_folder(source)  # IntegrityError naming the file that changed since it was saved
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise FileExistsError(f"export folder {out} must lie outside the source folder {source}")
    if out.is_dir() and any(out.iterdir()) and not has_manifest(out):
        # an earlier export (it has a manifest) is replaced; anything else is not ours to delete
        raise FileExistsError(f"export folder {out} exists and is not an earlier export; "
                              "choose a new folder or remove it")
    log.info("exporting %s as %s to %s", source, format, out)
    # whole or not at all: a killed or failed export never leaves a half folder at `out`
    with atomic_folder(out) as partial:
        figures = export(source, partial)
        digest = write_manifest(partial)  # every file the exporter wrote, hashed once it finished
    return ExportRecord(format=format, folder=out, sha256=digest,
                        figures={key: float(value) for key, value in figures.items()})
