"""Measuring tools: the benchmark and the GPU check."""
