"""zaya_lib.data"""
