"""Built-in passes. Importing this package registers them by name."""
from . import calibrate, cleanup, fold_bn, mixed_precision, quantize, sensitivity  # noqa: F401
