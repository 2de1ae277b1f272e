"""Fake ais_bench (tests only): see ais_bench/infer/interface.py."""
