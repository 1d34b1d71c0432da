"""``python -m vlmerge.pretrain`` / ``torchrun -m vlmerge.pretrain``: the pretrain command."""

import sys

from .commands import main

sys.exit(main())
