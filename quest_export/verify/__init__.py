"""Verification: metrics, comparison tiers and the harness. Torch is imported only inside the
fake-quant reference runner and the classifier, so checking a bundle against its recorded
references works without torch."""
