"""zaya_lib.train"""
