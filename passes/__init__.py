"""Built-in passes. Importing this package registers them by name."""
