"""``python -m mlx_optim``: the ``mlx-optim`` command."""

from mlx_optim.cli import main

raise SystemExit(main())
