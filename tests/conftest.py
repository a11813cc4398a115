"""Suite-wide settings. Tiny UNets run faster on one thread than on two busy ones (9 ms vs ~350 ms per
forward measured on a loaded 2-core machine), so tests use one torch thread unless a test sets its own."""

import importlib.util

if importlib.util.find_spec("torch") is not None:
    import torch

    torch.set_num_threads(1)
