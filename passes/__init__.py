"""Built-in passes. Importing this package registers them by name."""
from . import calibrate, cle, cleanup, fold_bn, mixed_precision, quantize, sensitivity, smooth  # noqa: F401
