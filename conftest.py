"""pytest defaults for the whole repository.

Notebook kernels started by nbval inherit this process's environment, so a plain
`pytest` run uses the small `ci` budget too. `tools/make.py test` sets the same
variables explicitly.
"""

import os

os.environ.setdefault("MINILIB_BUDGET", "ci")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
