"""The compute dtypes a checkpoint can be served or trained in, and the weight quantizations, by name.

Torch-free, so that command lines (`python -m server --help`) can list them without importing torch;
`model/config.py` maps them to torch dtypes.
"""

DTYPE_NAMES = ("float32", "bfloat16", "float16")

QUANTIZATIONS = ("int8",)
"""Weight-only quantizations (`model/quantization.py`); none is the default."""
