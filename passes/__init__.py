"""Built-in passes. Importing this package registers them by name."""
from . import calibrate, cleanup, fold_bn, quantize  # noqa: F401
