"""The compute dtypes a checkpoint can be served or trained in, by name.

Torch-free, so that command lines (`python -m server --help`) can list them without importing torch;
`model/config.py` maps them to torch dtypes.
"""

DTYPE_NAMES = ("float32", "bfloat16", "float16")
