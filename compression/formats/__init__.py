"""Weight formats: one registered class per stored weight layout (see `base.py`).

The built-in formats are imported here, explicitly; a new format is one module in
this folder and one import line below.
"""

from squeezeflow.compression.formats.base import (
    FORMATS,
    FormatRegistry,
    StoredLinear,
    Take,
    UnknownFormatError,
    WeightFormat,
    register_format,
    remaining_tensors,
    stored_linears,
)
from squeezeflow.compression.formats.bitstack import BitStackFormat
from squeezeflow.compression.formats.codebook import CodebookFormat
from squeezeflow.compression.formats.integer import IntegerFormat
from squeezeflow.compression.formats.rps import RPSFormat
from squeezeflow.compression.formats.ternary import TernaryFormat

__all__ = [
    "FORMATS", "BitStackFormat", "CodebookFormat", "FormatRegistry", "IntegerFormat", "RPSFormat", "StoredLinear", "Take",
    "TernaryFormat", "UnknownFormatError", "WeightFormat", "register_format", "remaining_tensors",
    "stored_linears",
]
