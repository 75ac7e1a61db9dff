"""The ``husk`` command, apart from the runtime: host check, config, image, cleanup.

- ``main``: argument parsing and the subcommands;
- ``check``: what this host offers a sandbox;
- ``local_images``: OCI images made locally (no registry) for ``ctr image import``.
"""
