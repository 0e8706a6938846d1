"""What a (pruned) model does: held-out evaluation, statistics, calibration, geometry and interventions."""
