"""Tests of modeling_polyglu.benchmarks: every suite end to end at tiny sizes, and the harness."""
