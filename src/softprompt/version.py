"""The package version, in its own module so that modules inside softprompt read it without
importing the package's ``__init__`` (which imports them: an import cycle)."""

__version__ = "0.1.0"
