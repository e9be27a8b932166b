"""Command lines of the tools users run (``tools/*.py`` and the console scripts of setup.py)."""
