"""The command line: argument parsing and rendering only; logic lives in ``controller``."""
