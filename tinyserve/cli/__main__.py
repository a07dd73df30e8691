"""``python -m tinyserve.cli ...`` is the ``tinyserve`` command (as ``python -m tinyserve``)."""
import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
