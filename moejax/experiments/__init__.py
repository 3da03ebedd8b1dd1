"""Experiments that train several configs and write their results into docs/."""
