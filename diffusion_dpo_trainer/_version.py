"""The package version, in a module that imports nothing: setup.py reads it without installing the package, and
`__init__`, the CLI and the evaluation report import it without loading the library."""

__version__ = "0.1.0"
