"""Regenerate every reference output of the official code (not run in CI).

    .venv/bin/python tests/reference/make_official_outputs.py --official-root OFFICIAL --deps DEPS

``OFFICIAL`` holds one checkout per repository, named as in ``OFFICIAL_COMMITS``
(``OFFICIAL/VAR``, ``OFFICIAL/mar``, ``OFFICIAL/DiT``, ``OFFICIAL/sd3.5``), each at the
commit given there; ``DEPS`` the packages the official code imports that this project
does not install (see ``official_env.py``). Each family's script runs in its own
process, since the official repositories use the same top-level module names
(``models``, ``diffusion``). The files land in ``tests/reference/official/``, where
``tests/test_official_*.py`` compare minilib against them.

``--only dit var`` regenerates some families only.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAMILIES = {  # family: (script, checkout folder)
    "var": ("make_official_var.py", "VAR"),
    "mar": ("make_official_mar.py", "mar"),
    "dit": ("make_official_dit.py", "DiT"),
    "sd3": ("make_official_sd3.py", "sd3.5"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-root", required=True, type=Path, help="folder with the four official checkouts")
    parser.add_argument("--deps", required=True, type=Path, help="folder of the no-deps packages (timm, ...)")
    parser.add_argument("--only", nargs="+", choices=sorted(FAMILIES), default=sorted(FAMILIES))
    args = parser.parse_args()
    failed = []
    for family in args.only:
        script, folder = FAMILIES[family]
        command = [sys.executable, str(HERE / script), "--official", str(args.official_root / folder),
                   "--deps", str(args.deps)]
        print(f"==> {family}: {' '.join(command)}", flush=True)
        if subprocess.run(command).returncode != 0:
            failed.append(family)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
