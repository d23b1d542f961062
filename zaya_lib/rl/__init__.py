"""zaya_lib.rl"""
