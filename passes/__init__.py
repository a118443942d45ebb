"""Built-in passes, one module per pass family. Importing this package imports every module
in it, which registers its passes by name."""
import importlib
import pkgutil

for _m in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_m}")
