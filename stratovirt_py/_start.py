"""The native front end's way into the Python VMM: ``python -I -S _start.py ARGS``.

``-I -S`` is the cheapest interpreter start (no site module, no environment
lookups), so the paths site would add are set here: this package's parent and the
interpreter's own site-packages (where cffi lives).  Nothing else is imported.
"""

import sys


def _paths() -> None:
    import os
    parent = __file__.rsplit("/", 2)[0]
    # without site, sys.prefix is the base interpreter's even in a venv
    venv = os.path.dirname(os.path.dirname(sys.executable))
    prefix = venv if os.path.exists(os.path.join(venv, "pyvenv.cfg")) else sys.prefix
    site = f"{prefix}/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"
    sys.path[:0] = [p for p in (parent, site) if p not in sys.path]


if __name__ == "__main__":
    _paths()
    from stratovirt_py.cli import main
    main(sys.argv[1:])
