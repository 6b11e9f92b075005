"""``python -m torchdkm``: the ``torchdkm`` command (torchrun ... -m torchdkm compress RECIPE works too)."""
import sys

from .app.cli import main

sys.exit(main())
