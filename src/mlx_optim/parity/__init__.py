"""Parity with torch.optim: the table of configurations and the closed-loop harness.

Used by the test suite and by ``mlx-optim verify``. Importing it imports torch (the
``test`` extra); the rest of mlx_optim never does.
"""
