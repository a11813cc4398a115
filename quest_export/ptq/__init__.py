"""Stage A: weight and activation calibration, AdaRound/BRECQ, and the ptq / qdiffusion baselines."""
