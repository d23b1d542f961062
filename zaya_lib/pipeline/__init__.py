"""zaya_lib.pipeline"""
