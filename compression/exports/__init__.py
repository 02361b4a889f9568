"""Exporters: a packed squeezeflow folder written out in other runtimes' layouts.

`base.py` holds the catalog (format name -> exporter module, imported lazily) and
`export_model`; each format's exporter is one module in this folder with
`export(source: Path, out: Path) -> dict[str, float]`.
"""

from squeezeflow.compression.exports.base import (
    EXPORTERS,
    Exporter,
    ExportRecord,
    NotExportableError,
    UnknownExportFormatError,
    export_formats,
    export_model,
    exporter,
)

__all__ = [
    "EXPORTERS", "ExportRecord", "Exporter", "NotExportableError", "UnknownExportFormatError", "export_formats",
    "export_model", "exporter",
]
