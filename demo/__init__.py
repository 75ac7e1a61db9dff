"""The README's first command (``python3 demo/run.py``): install husk and run a container."""
